"""The dead-letter spool's on-disk format: record framing, checksum, the record kinds.

A spool directory holds append-only *segment* files named
``seg-<unix ms, 13 digits>-<pid>-<random>.dlq``; each is written by exactly
one process (the sidecar, or one ``outrigger dlq`` run), so a torn record can
only ever be at a segment's tail.  A segment is a sequence of records::

    magic "OD" (2) | version 1 (1) | kind (1) | payload length (u32 BE) | CRC-32 of payload (u32 BE) | payload

The payload is msgpack.  Kind 1 is an ``Entry`` (a failed request, body
inline); kind 2 is a ``Mark`` (a later state change of an entry: ``done``,
``replay_failed`` or ``purged``).  State changes are appended, never written
over an entry.  A reader stops at the first frame that is short, has a bad
magic, version or length, or whose checksum does not match: that is the torn
tail of a crash (or a record still being written), and nothing after it in
that segment is trusted.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Literal

import msgspec

__all__ = [
    "FRAME", "KIND_ENTRY", "KIND_MARK", "MAX_PAYLOAD", "Entry", "Mark", "Scan", "decode_entry", "decode_mark",
    "encode_entry", "encode_mark", "new_id", "scan", "segment_name",
]

MAGIC = b"OD"
VERSION = 1
KIND_ENTRY = 1
KIND_MARK = 2
FRAME = struct.Struct(">2sBBII")
MAX_PAYLOAD = 256 * 1024 * 1024  # a length beyond this is garbage, not a record


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One request that finally failed, as it will be replayed."""

    id: str
    ts: float  # wall clock (unix seconds) when it was spooled
    route: str
    listener: str
    method: str
    target: str  # path + query to send to the listener (the route's rewrite undone)
    headers: list[tuple[str, str]]  # as sent upstream, less omit_headers and the sidecar's x-forwarded-*
    body: bytes
    idempotency_key: str | None
    traceparent: str | None  # the failed request's SERVER span (or the app's), for the replay's span link
    attempts: int
    error: str  # the outcome: an x-outrigger-error code, or http_<status>
    message: str
    omitted: list[str]  # names of the headers that were not stored (omit_headers)


class Mark(msgspec.Struct, frozen=True, kw_only=True):
    """A state change of an entry, appended after it (possibly in another process's segment)."""

    id: str
    ts: float
    kind: Literal["done", "replay_failed", "purged"]
    detail: str = ""


_entry_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(Entry)
_mark_decoder = msgspec.msgpack.Decoder(Mark)


def new_id(wall: float) -> str:
    """Time-ordered and unique across processes: 11 hex digits of unix ms plus 40 random bits."""
    return f"{int(wall * 1000):011x}{os.urandom(5).hex()}"


def segment_name(wall: float) -> str:
    return f"seg-{int(wall * 1000):013d}-{os.getpid()}-{os.urandom(3).hex()}.dlq"


def _frame(kind: int, payload: bytes) -> bytes:
    return FRAME.pack(MAGIC, VERSION, kind, len(payload), zlib.crc32(payload)) + payload


def encode_entry(entry: Entry) -> bytes:
    return _frame(KIND_ENTRY, _entry_encoder.encode(entry))


def encode_mark(mark: Mark) -> bytes:
    return _frame(KIND_MARK, _entry_encoder.encode(mark))


def decode_entry(payload: bytes | memoryview) -> Entry:
    return _entry_decoder.decode(payload)


def decode_mark(payload: bytes | memoryview) -> Mark:
    return _mark_decoder.decode(payload)


class Scan(msgspec.Struct):
    """The valid records found in a buffer, and where the valid prefix ends."""

    records: list[tuple[int, int, memoryview]]  # (offset of the frame, kind, payload)
    end: int  # offset just past the last valid record
    torn: bool  # bytes after ``end`` that are not a whole valid record


def scan(data: bytes, base: int = 0) -> Scan:
    """Every whole, checksummed record at the start of ``data`` (offsets relative to ``base``)."""
    view = memoryview(data)
    records: list[tuple[int, int, memoryview]] = []
    pos, size = 0, len(data)
    while pos + FRAME.size <= size:
        magic, version, kind, length, crc = FRAME.unpack_from(data, pos)
        if magic != MAGIC or version != VERSION or kind not in (KIND_ENTRY, KIND_MARK) or length > MAX_PAYLOAD:
            break
        start = pos + FRAME.size
        if start + length > size:
            break
        payload = view[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        records.append((base + pos, kind, payload))
        pos = start + length
    return Scan(records, base + pos, pos < size)
