"""Soak: 300k requests (success, retry, breaker and rate-limit paths) through ``outrigger run``.

It takes about 35 s on 2 cores, so the full 300k run is part of the default
test run; ``python -m tests.bench.soak`` runs the same soak and writes
tests/bench/results/soak.json.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench.soak import check, run_soak


async def test_300k_mixed_requests_grow_rss_at_most_5_percent_and_leak_no_fd_or_task(tmp_path: Path) -> None:
    result = await run_soak(300_000, checkpoint=100_000, directory=tmp_path)
    print(f"\nsoak: {result['requests']} requests in {result['seconds']} s, RSS MiB {result['rss_mib']} "
          f"({result['rss_growth_pct']}%), fds {result['fds']}, tasks {result['tasks']}")
    assert check(result) == []
