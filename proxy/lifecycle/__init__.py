"""The process around the request path: start, reload, drain and stop (``sidecar``), the admin server
(``admin``: probes, metrics, /config, /status) and its status page (``status_page``)."""
