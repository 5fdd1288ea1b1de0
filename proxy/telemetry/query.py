"""Query strings on spans: kept, with the values of sensitive parameters replaced by ``REDACTED``.

Used for the SERVER span's ``url.query`` and the CLIENT span's ``url.full``.
The default names are the ones the OpenTelemetry HTTP conventions list (signed
URL credentials); ``telemetry.tracing.redact_query_params`` adds more.  Names
are compared case-insensitively after percent-decoding, so ``%73ig`` is ``sig``;
the query is otherwise recorded byte for byte as the app sent it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_plus

__all__ = ["DEFAULT_REDACTED_PARAMS", "REDACTED", "redact_query", "redaction_set"]

REDACTED = "REDACTED"
DEFAULT_REDACTED_PARAMS = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")


def redaction_set(extra: Iterable[str] = ()) -> frozenset[str]:
    """The lower-cased names to redact: the convention's list plus ``extra``."""
    return frozenset(name.lower() for name in (*DEFAULT_REDACTED_PARAMS, *extra))


def redact_query(query: str, names: frozenset[str]) -> str:
    """``query`` with the value of every parameter named in ``names`` replaced by ``REDACTED``."""
    parts = query.split("&")
    for index, part in enumerate(parts):
        key, sep, _ = part.partition("=")
        if sep and unquote_plus(key).lower() in names:
            parts[index] = f"{key}={REDACTED}"
    return "&".join(parts)
