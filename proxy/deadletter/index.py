"""The spool as readers see it: which entries exist, their state, and compaction.

Used by the sidecar's spool writer thread (for the gauges and compaction) and
by ``outrigger dlq``.  ``refresh`` reads only the bytes appended since the last
call, segment by segment, and stops at a segment's first invalid record: a
torn tail after a crash, or a record another process is still writing (it is
read again next time, so nothing half-written is ever taken for an entry).

Compaction deletes whole segments, never rewrites one: a segment goes when
every entry in it is resolved (done, purged or past ``max_age``) and none of
its marks still resolves an entry in a segment that stays.  A segment its
writer still holds (an ``flock`` on it) is never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field

from proxy.deadletter.record import KIND_ENTRY, Entry, Mark, decode_entry, decode_mark, scan

__all__ = ["EntryRef", "SpoolIndex", "locked_by_writer"]

SEGMENT_PREFIX, SEGMENT_SUFFIX = "seg-", ".dlq"


@dataclass(slots=True)
class EntryRef:
    id: str
    ts: float
    route: str
    error: str
    segment: str
    offset: int


@dataclass(slots=True)
class EntryState:
    done: bool = False
    purged: bool = False
    replays: int = 0  # failed replays
    last_replay_error: str = ""


@dataclass(slots=True)
class _Segment:
    read_to: int = 0  # valid records end here
    size: int = 0  # bytes on disk at the last refresh
    entries: list[str] = field(default_factory=list)
    marked: set[str] = field(default_factory=set)  # ids its marks refer to


def locked_by_writer(path: str) -> bool:
    """Whether a live writer holds ``path`` (its flock); a vanished file counts as not locked."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


class SpoolIndex:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.entries: dict[str, EntryRef] = {}
        self.states: dict[str, EntryState] = {}
        self._segments: dict[str, _Segment] = {}

    def segment_names(self) -> list[str]:
        return sorted(name for name in os.listdir(self.directory)
                      if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX))

    def refresh(self) -> None:
        names = self.segment_names()
        for gone in set(self._segments) - set(names):
            for entry_id in self._segments.pop(gone).entries:
                self.entries.pop(entry_id, None)
        for name in names:
            segment = self._segments.setdefault(name, _Segment())
            try:
                with open(os.path.join(self.directory, name), "rb") as handle:
                    segment.size = os.fstat(handle.fileno()).st_size
                    if segment.size <= segment.read_to:
                        continue
                    handle.seek(segment.read_to)
                    data = handle.read(segment.size - segment.read_to)
            except FileNotFoundError:
                continue  # compacted away meanwhile; dropped on the next refresh
            found = scan(data, segment.read_to)
            for offset, kind, payload in found.records:
                if kind == KIND_ENTRY:
                    entry = decode_entry(payload)
                    self.entries[entry.id] = EntryRef(entry.id, entry.ts, entry.route, entry.error, name, offset)
                    segment.entries.append(entry.id)
                else:
                    mark = decode_mark(payload)
                    self._apply(mark)
                    segment.marked.add(mark.id)
            segment.read_to = found.end

    def _apply(self, mark: Mark) -> None:
        state = self.states.setdefault(mark.id, EntryState())
        if mark.kind == "done":
            state.done = True
        elif mark.kind == "purged":
            state.purged = True
        else:
            state.replays += 1
            state.last_replay_error = mark.detail

    def state(self, entry_id: str) -> EntryState:
        return self.states.get(entry_id) or EntryState()

    def resolved(self, ref: EntryRef, expired_before: float) -> bool:
        state = self.states.get(ref.id)
        return ref.ts < expired_before or (state is not None and (state.done or state.purged))

    def live(self, expired_before: float) -> list[EntryRef]:
        """Entries still waiting for a replay, oldest first."""
        refs = [ref for ref in self.entries.values() if not self.resolved(ref, expired_before)]
        refs.sort(key=lambda ref: (ref.ts, ref.id))
        return refs

    def torn_bytes(self) -> dict[str, int]:
        """Bytes after the last valid record, per segment no live writer holds: skipped torn tails."""
        return {name: seg.size - seg.read_to for name, seg in self._segments.items()
                if seg.size > seg.read_to and not locked_by_writer(os.path.join(self.directory, name))}

    def total_bytes(self) -> int:
        return sum(seg.size for seg in self._segments.values())

    def read(self, ref: EntryRef) -> Entry:
        with open(os.path.join(self.directory, ref.segment), "rb") as handle:
            handle.seek(ref.offset)
            head = handle.read(12)
            length = int.from_bytes(head[4:8], "big")
            found = scan(head + handle.read(length), ref.offset)
        if not found.records:
            raise ValueError(f"entry {ref.id}: record at {ref.segment}:{ref.offset} no longer valid")
        return decode_entry(found.records[0][2])

    def compact(self, expired_before: float) -> int:
        """Delete every segment that holds nothing unresolved; returns bytes freed."""
        deletable = {name for name, seg in self._segments.items()
                     if all(self.resolved(self.entries[i], expired_before) for i in seg.entries if i in self.entries)}
        changed = True
        while changed:  # a mark must outlive the entry it resolves
            changed = False
            for name in list(deletable):
                if any(self.entries[i].segment not in deletable
                       for i in self._segments[name].marked if i in self.entries):
                    deletable.discard(name)
                    changed = True
        freed = 0
        for name in sorted(deletable):
            path = os.path.join(self.directory, name)
            if locked_by_writer(path):
                continue  # its writer may still append to it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            segment = self._segments.pop(name)
            freed += segment.size
            for entry_id in segment.entries:
                self.entries.pop(entry_id, None)
        return freed
