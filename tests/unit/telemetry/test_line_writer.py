"""The log writer: a stalled reader costs bounded memory and dropped (counted) lines, never the caller's time."""

from __future__ import annotations

import io
import threading

from proxy.telemetry import line_writer
from proxy.telemetry.line_writer import LineWriter


class StalledStream(io.StringIO):
    """A stream whose reader stalls until ``release`` is set, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


def test_lines_beyond_the_bound_are_dropped_and_counted_while_the_reader_stalls() -> None:
    stream = StalledStream()
    writer = LineWriter(stream, "access", max_bytes=100)
    before = line_writer.dropped_lines["access"]
    assert writer.write(["first line\n"]) == 1
    assert stream.entered.wait(5)  # the thread is stuck in the write, holding "first line"
    lines = [f"line {i:02d} of ten\n" for i in range(10)]  # 15 bytes each: 6 fit in 100
    assert writer.write(lines) == 6  # returned at once, though the stream is stalled
    assert writer.write(["one more line\n"]) == 0  # 14 more bytes do not fit either
    assert line_writer.dropped_lines["access"] - before == 5
    stream.release.set()
    assert writer.wait_written(5)
    assert stream.getvalue() == "first line\n" + "".join(lines[:6])
