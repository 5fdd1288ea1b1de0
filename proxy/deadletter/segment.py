"""One process's own segment file: create, append + fdatasync, rotate.

A segment is created under a temporary name, locked (``flock``) and only
then renamed into place, so a compaction in another process can never see
it unlocked and delete it under its writer.  The lock is held for as long as
the segment is this process's current one.  Files are created 0600.

A failed append truncates the segment back to its last good record (best
effort) and retires it; the next append starts a new segment, so records
written later are never stranded behind a broken one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable

from proxy.deadletter.record import segment_name

__all__ = ["SegmentWriter"]

FILE_MODE = 0o600


class SegmentWriter:
    def __init__(self, directory: str, rotate_bytes: int, wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self._wall = wall
        self._fd: int | None = None
        self._size = 0
        self.name: str | None = None

    def append(self, data: bytes) -> None:
        """Write ``data`` (whole records) and make it durable; OSError when it is not."""
        if self._fd is None or (self._size and self._size + len(data) > self.rotate_bytes):
            self._open()
        fd = self._fd
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)
        except OSError:
            self._retire(truncate=True)
            raise
        self._size += len(data)

    def _open(self) -> None:
        self._retire(truncate=False)
        name = segment_name(self._wall())
        temporary = os.path.join(self.directory, f".tmp-{name}")
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(temporary, os.path.join(self.directory, name))
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # the new name itself survives a power cut
            finally:
                os.close(directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._fd, self._size, self.name = fd, 0, name

    def _retire(self, *, truncate: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if truncate:
            with contextlib.suppress(OSError):  # readers stop at the torn record anyway
                os.ftruncate(fd, self._size)
        os.close(fd)

    def close(self) -> None:
        self._retire(truncate=False)
