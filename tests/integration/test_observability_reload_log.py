"""Every reload is logged with its trigger, its result and what changed (file watcher and API)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from pathlib import Path

import pytest
import yaml

from tests.support.sidecar import base_config, start_sidecar, to_config
from tests.support.upstream import ScriptedUpstream


async def _wait_for_record(caplog: pytest.LogCaptureFixture, start: str) -> logging.LogRecord:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.getMessage().startswith(start):
                return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"no log line {start!r}: {[r.getMessage() for r in caplog.records]}")


async def test_watcher_reloads_log_trigger_result_and_a_summary_of_the_changes(
        tmp_path: Path, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outrigger")
    data = base_config(upstream.url)
    path = tmp_path / "outrigger.yaml"
    path.write_text(yaml.safe_dump(data))
    sidecar = await start_sidecar(data, config_path=str(path), watch_interval_s=0.05)
    try:
        changed = copy.deepcopy(data)
        changed["upstreams"]["other"] = {"url": upstream.url}
        changed["listeners"][0]["routes"][0]["timeout"] = {"total": "3s"}
        path.write_text(yaml.safe_dump(changed))
        record = await _wait_for_record(caplog, "config reloaded (watcher)")
        assert record.trigger == "watcher"  # type: ignore[attr-defined]
        assert record.details == {"result": "success", "upstreams": {"added": ["other"]},  # type: ignore[attr-defined]
                                  "policies": {"default": ["timeout"]}}
        assert "upstreams added: other; policies: default (timeout)" in record.getMessage()

        broken = copy.deepcopy(changed)
        broken["listeners"][0]["routes"][0]["upstream"] = "nope"
        path.write_text(yaml.safe_dump(broken))
        record = await _wait_for_record(caplog, "config reload rejected")
        assert record.levelno == logging.ERROR and record.trigger == "watcher"  # type: ignore[attr-defined]
        assert record.details == {"result": "failure"}  # type: ignore[attr-defined]

        caplog.clear()
        assert await sidecar.apply(to_config(changed))
        record = await _wait_for_record(caplog, "config reloaded (api): nothing changed")
        assert record.trigger == "api"  # type: ignore[attr-defined]
    finally:
        await sidecar.stop()
