"""The spool's files: checksummed records, torn tails skipped, 0600 files, append-only state, safe compaction."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from proxy.deadletter.index import SpoolIndex
from proxy.deadletter.record import Entry, Mark, encode_entry, encode_mark, scan
from proxy.deadletter.segment import SegmentWriter


def _entry(entry_id: str, ts: float = 1000.0, route: str = "webhooks", body: bytes = b"{}") -> Entry:
    return Entry(id=entry_id, ts=ts, route=route, listener="main", method="POST", target="/hook",
                 headers=[("idempotency-key", entry_id)], body=body, idempotency_key=entry_id,
                 traceparent=None, attempts=3, error="upstream_timeout", message="m", omitted=[])


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.dlq"))


def test_records_round_trip_and_a_flipped_payload_byte_fails_the_checksum() -> None:
    data = encode_entry(_entry("a")) + encode_entry(_entry("b"))
    assert [r[1] for r in scan(data).records] == [1, 1]
    broken = bytearray(data)
    broken[len(data) - 3] ^= 0x01  # inside b's payload
    found = scan(bytes(broken))
    assert len(found.records) == 1 and found.torn
    assert found.end == len(encode_entry(_entry("a")))


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 40])
def test_a_torn_tail_is_skipped_and_the_records_before_it_are_kept(tmp_path: Path, cut: int) -> None:
    writer = SegmentWriter(str(tmp_path), 1 << 20)
    writer.append(encode_entry(_entry("whole")))
    writer.append(encode_entry(_entry("torn", body=b"x" * 100)))
    writer.close()
    segment = _segments(tmp_path)[0]
    size = segment.stat().st_size
    with segment.open("r+b") as handle:  # a crash mid-write: the second record is cut short
        handle.truncate(size - (len(encode_entry(_entry("torn", body=b"x" * 100))) - cut))
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert list(index.entries) == ["whole"]
    assert index.read(index.entries["whole"]).id == "whole"
    assert sum(index.torn_bytes().values()) == cut


def test_segment_files_and_their_directory_entries_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        writer = SegmentWriter(str(tmp_path), 1 << 20)
        writer.append(encode_entry(_entry("a")))
        writer.close()
    finally:
        os.umask(old)
    [segment] = _segments(tmp_path)
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".tmp-*"))  # created under a temporary name, then renamed


def test_state_changes_are_appended_marks_read_across_segments(tmp_path: Path) -> None:
    sidecar = SegmentWriter(str(tmp_path), 1 << 20)
    sidecar.append(encode_entry(_entry("a")) + encode_entry(_entry("b")) + encode_entry(_entry("c")))
    (entries_segment,) = _segments(tmp_path)  # the only one yet: names do not sort by creation
    before = entries_segment.read_bytes()
    cli = SegmentWriter(str(tmp_path), 1 << 20)
    cli.append(encode_mark(Mark(id="a", ts=1.0, kind="replay_failed", detail="answered 503")))
    cli.append(encode_mark(Mark(id="a", ts=2.0, kind="done")) + encode_mark(Mark(id="b", ts=2.0, kind="purged")))
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert [ref.id for ref in index.live(expired_before=0.0)] == ["c"]
    assert index.state("a").replays == 1 and index.state("a").done
    assert entries_segment.read_bytes() == before  # the entries' segment was never rewritten
    sidecar.close()
    cli.close()


def test_max_age_expires_entries_without_touching_them(tmp_path: Path) -> None:
    writer = SegmentWriter(str(tmp_path), 1 << 20)
    writer.append(encode_entry(_entry("old", ts=100.0)) + encode_entry(_entry("new", ts=200.0)))
    writer.close()
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert [ref.id for ref in index.live(expired_before=150.0)] == ["new"]


def test_compaction_keeps_a_mark_while_the_entry_it_resolves_survives(tmp_path: Path) -> None:
    entries = SegmentWriter(str(tmp_path), 1 << 20)
    entries.append(encode_entry(_entry("done-one")) + encode_entry(_entry("waiting")))
    entries.close()
    marks = SegmentWriter(str(tmp_path), 1 << 20)
    marks.append(encode_mark(Mark(id="done-one", ts=1.0, kind="done")))
    marks.close()
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert index.compact(expired_before=0.0) == 0  # deleting the mark would bring done-one back
    assert len(_segments(tmp_path)) == 2
    index.refresh()
    assert [ref.id for ref in index.live(0.0)] == ["waiting"]


def test_compaction_deletes_resolved_segments_but_never_one_its_writer_holds(tmp_path: Path) -> None:
    held = SegmentWriter(str(tmp_path), 1 << 20)  # a live sidecar's segment
    held.append(encode_entry(_entry("x")))
    closed = SegmentWriter(str(tmp_path), 1 << 20)
    closed.append(encode_entry(_entry("y")))
    closed.close()
    purge = SegmentWriter(str(tmp_path), 1 << 20)
    purge.append(encode_mark(Mark(id="x", ts=1.0, kind="purged")) + encode_mark(Mark(id="y", ts=1.0, kind="purged")))
    purge.close()
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert index.compact(expired_before=0.0) > 0
    left = [p.name for p in _segments(tmp_path)]
    assert held.name in left and closed.name not in left
    held.close()
    index.refresh()
    index.compact(expired_before=0.0)
    assert _segments(tmp_path) == []


def test_a_failed_append_retires_the_segment_so_later_records_stay_readable(tmp_path: Path) -> None:
    writer = SegmentWriter(str(tmp_path), 1 << 20)
    writer.append(encode_entry(_entry("first")))
    first = writer.name
    assert writer._fd is not None
    os.close(writer._fd)  # the disk goes away under the writer
    writer._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(OSError):
        writer.append(encode_entry(_entry("lost")))
    writer.append(encode_entry(_entry("second")))
    assert writer.name != first
    writer.close()
    index = SpoolIndex(str(tmp_path))
    index.refresh()
    assert sorted(index.entries) == ["first", "second"]


def test_the_writer_holds_an_exclusive_flock_on_its_segment(tmp_path: Path) -> None:
    writer = SegmentWriter(str(tmp_path), 1 << 20)
    writer.append(encode_entry(_entry("a")))
    fd = os.open(_segments(tmp_path)[0], os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        writer.close()
