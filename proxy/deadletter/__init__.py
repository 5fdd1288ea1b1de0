"""Dead-letter spool: failed requests kept on disk, listed and replayed (docs/dead-letter.md).

Request path: ``policy`` (a route's outermost policy) -> ``spool`` (writer
thread, group commit) -> ``segment`` / ``record`` (the files).  Outside the
sidecar: ``cli`` and ``replay`` read the files through ``index``.
"""

HEADER = "x-outrigger-dead-letter"  # on the failure the app gets: the entry's id, once durable
REPLAY_HEADER = "x-outrigger-replay"  # on a replayed request: the entry's id
REPLAY_OF_HEADER = "x-outrigger-replay-of-traceparent"  # the original trace, linked from the replay's span
