"""The sidecar's spool writer and the dead_letter config: group commit, full, unwritable, path-qualified errors."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, DeadLetterConfig, load_config
from proxy.config.units import Size
from proxy.deadletter.record import Entry, encode_entry
from proxy.deadletter.spool import Spool
from proxy.telemetry.metrics import Metrics


def _record(entry_id: str, body: bytes = b"{}") -> bytes:
    return encode_entry(Entry(id=entry_id, ts=1e12, route="r", listener="main", method="PUT", target="/",
                              headers=[], body=body, idempotency_key=None, traceparent=None, attempts=1,
                              error="overflow", message="", omitted=[]))


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_burst_is_made_durable_in_fewer_fsyncs_than_records(tmp_path: Path) -> None:
    metrics = Metrics(process_collectors=False)
    spool = Spool(DeadLetterConfig(dir=str(tmp_path)), metrics)
    counter = metrics.dead_letters.labels(route="r", result="spooled")
    futures = [spool.submit(_record(f"id{i}"), counter) for i in range(200)]
    assert all(f is not None for f in futures)
    assert all(await asyncio.gather(*[f for f in futures if f is not None]))
    assert spool.records == 200 and spool.commits < 200  # group commit
    assert _metric(metrics, "outrigger_dead_letters_total", route="r", result="spooled") == 200
    assert _metric(metrics, "outrigger_dead_letter_entries") == 200
    assert _metric(metrics, "outrigger_dead_letter_spool_bytes") == _disk_bytes(tmp_path)
    assert _metric(metrics, "outrigger_dead_letter_oldest_entry_timestamp_seconds") > 0
    spool.close()


async def test_a_full_spool_refuses_new_entries_and_keeps_the_old(tmp_path: Path) -> None:
    metrics = Metrics(process_collectors=False)
    spool = Spool(DeadLetterConfig(dir=str(tmp_path), max_bytes=Size(64 * 1024)), metrics)
    counter = metrics.dead_letters.labels(route="r", result="spooled")
    big = b"x" * 20_000
    accepted = []
    for i in range(5):
        future = spool.submit(_record(f"id{i}", big), counter)
        if future is not None:
            accepted.append(await future)
    assert accepted == [True, True, True]  # the fourth would pass 64KiB
    before = _contents(tmp_path)
    later = spool.submit(_record("later"), counter)  # a small one still fits
    assert later is not None and await later
    after = _contents(tmp_path)
    assert {name: after[name][:len(data)] for name, data in before.items()} == before  # old bytes untouched
    spool.close()


async def test_an_unwritable_spool_fails_only_its_batch_and_logs_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(process_collectors=False)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = Spool(DeadLetterConfig(dir=str(spool_dir)), metrics)
    counter = metrics.dead_letters.labels(route="r", result="spooled")
    os.rmdir(spool_dir)  # the volume went away while running
    caplog.set_level(logging.ERROR, "outrigger.deadletter")
    results = []
    for i in range(3):
        future = spool.submit(_record(f"id{i}"), counter)
        assert future is not None
        results.append(await asyncio.wait_for(future, 5))
    assert results == [False, False, False]
    assert _metric(metrics, "outrigger_dead_letter_write_errors_total") == 3
    assert len([r for r in caplog.records if "write failed" in r.message]) == 1  # once a minute, not per request
    assert spool.snapshot()["last_error"]
    spool.close()


async def test_close_commits_what_is_queued_and_ends_the_writer_thread(tmp_path: Path) -> None:
    metrics = Metrics(process_collectors=False)
    spool = Spool(DeadLetterConfig(dir=str(tmp_path)), metrics)
    counter = metrics.dead_letters.labels(route="r", result="spooled")
    futures = [spool.submit(_record(f"id{i}"), counter) for i in range(50)]
    spool.stop()  # on the loop, right behind the submits: nothing queued may be dropped
    await asyncio.to_thread(spool.close)
    assert not spool.running
    assert all(await asyncio.gather(*[f for f in futures if f is not None]))
    assert spool.records == 50 and _disk_bytes(tmp_path) == sum(len(_record(f"id{i}")) for i in range(50))


async def test_a_closed_spool_hands_late_entries_to_its_successor(tmp_path: Path) -> None:
    """A request routed before a reload may reach the spool after the old one closed: it lands in the new one."""
    metrics = Metrics(process_collectors=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Spool(DeadLetterConfig(dir=str(tmp_path / "old")), metrics)
    new = Spool(DeadLetterConfig(dir=str(tmp_path / "new")), metrics)
    counter = metrics.dead_letters.labels(route="r", result="spooled")
    old.successor = new
    old.stop()
    late = old.submit(_record("late"), counter)
    assert late is not None and await late
    await asyncio.to_thread(old.close)
    assert not old.running and new.running
    assert _disk_bytes(tmp_path / "old") == 0 and new.records == 1
    new.close()
    removed = Spool(DeadLetterConfig(dir=str(tmp_path / "new")), metrics)
    removed.close()  # closed with no successor (dead_letter removed): refused, never queued to a dead thread
    assert removed.submit(_record("refused"), counter) is None


def _config(tmp_path: Path, **top: Any) -> dict[str, Any]:
    route = {"name": "webhooks", "upstream": "svc", "dead_letter": {"on": ["upstream_timeout", "http_5xx"]}}
    data: dict[str, Any] = {"version": 1, "upstreams": {"svc": {"url": "http://127.0.0.1:1"}},
                            "listeners": [{"name": "main", "address": "127.0.0.1:0", "routes": [route]}]}
    data.update(top)
    return data


def _issues(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(yaml.safe_dump(copy.deepcopy(data)), env={})
    return [str(issue) for issue in info.value.issues]


def test_a_missing_spool_directory_is_a_config_error_naming_dead_letter_dir(tmp_path: Path) -> None:
    [issue] = _issues(_config(tmp_path, dead_letter={"dir": str(tmp_path / "absent")}))
    assert issue.startswith("dead_letter.dir: directory not found")


def test_an_unwritable_spool_directory_is_a_config_error_naming_dead_letter_dir(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    # root writes through directory permissions, but not into /proc
    [issue] = _issues(_config(tmp_path, dead_letter={"dir": "/proc" if os.geteuid() == 0 else str(locked)}))
    assert issue.startswith("dead_letter.dir: not writable")


def test_an_unknown_on_value_lists_the_valid_ones(tmp_path: Path) -> None:
    data = _config(tmp_path, dead_letter={"dir": str(tmp_path)})
    data["listeners"][0]["routes"][0]["dead_letter"]["on"] = ["upstream_timeout", "http_4xx"]
    [issue] = _issues(data)
    assert issue.startswith("listeners[0].routes[0].dead_letter.on: on lists an unknown outcome 'http_4xx'; valid: ")
    assert "upstream_connect_failure" in issue and "http_5xx" in issue


def test_a_route_dead_letter_needs_the_top_level_spool(tmp_path: Path) -> None:
    [issue] = _issues(_config(tmp_path))
    assert issue.startswith("listeners[0].routes[0].dead_letter: needs the top-level dead_letter.dir")


def test_dead_letter_config_loads_with_the_documented_units(tmp_path: Path) -> None:
    data = _config(tmp_path, dead_letter={"dir": str(tmp_path), "max_bytes": "1GiB", "max_age": "7d"})
    data["listeners"][0]["routes"][0]["dead_letter"].update(max_body="1MiB", omit_headers=["authorization"])
    config = load_config(yaml.safe_dump(data), env={})
    assert config.dead_letter is not None and float(config.dead_letter.max_age) == 7 * 86400
    route = config.listeners[0].routes[0].dead_letter
    assert route is not None and route.max_body == 1024 * 1024 and route.unsafe_methods is False
