"""The upstream side: from a route's chain to the upstream's socket.

- ``call``: ``UpstreamPool`` (one per configured upstream) and ``UpstreamCall``, the innermost handler of every chain.
- ``pool``: keep-alive pools of connections (one per upstream, or per endpoint).
- ``connection``: one HTTP/1.1 connection on httptools (llhttp), its response and body stream.
- ``tls``: the client TLS context (CA, mTLS, SNI).
- ``endpoints``: several addresses per upstream: discovery, balancing, outlier ejection, warm connections.
"""
