"""The TLS client context of one upstream, built in one place for the pool and for validation.

Verifying by default (the system's roots, or ``tls.ca_file``); ``tls.verify:
false`` checks nothing.  Either way ``cert_file`` + ``key_file`` are presented
for mTLS.  ``outrigger validate`` builds the same context, so a file that
would fail at start fails there, with its config path.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config.types import TlsConfig

__all__ = ["client_context"]


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    if tls.verify:
        context = ssl.create_default_context(cafile=tls.ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
