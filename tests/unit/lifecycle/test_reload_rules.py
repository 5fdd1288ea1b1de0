"""The reload's pure rules: which version of the file is a new attempt, and what a reload may change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from proxy.lifecycle.reload import ConfigFile, effective, file_state
from tests.support.sidecar import base_config, to_config


def _state(content: str, mtime: int = 1) -> tuple[Any, ...]:
    return (mtime, 42, len(content), f"digest-of-{content}")


def test_the_version_the_sidecar_started_with_is_no_new_attempt_for_any_trigger() -> None:
    file = ConfigFile()
    file.started(_state("v1"))
    assert not file.begin(_state("v1", mtime=2), "sighup")
    assert not file.begin(_state("v1", mtime=3), "watcher")
    assert file.succeeded


def test_an_edit_is_attempted_once_whichever_trigger_reads_it_first() -> None:
    file = ConfigFile()
    file.started(_state("v1"))
    assert file.begin(_state("v2"), "watcher")
    file.finish(False, draining=False)
    assert not file.begin(_state("v2"), "watcher")
    assert not file.succeeded  # what "nothing to reload" reports: the last attempt failed


def test_a_version_rejected_for_itself_is_not_tried_again_on_sighup() -> None:
    """A bad file fails in the loader, before ``finish``: it stays a failure, not one outside the file."""
    file = ConfigFile()
    file.started(_state("v1"))
    assert file.begin(_state("bad"), "watcher")
    assert not file.failed_outside
    assert not file.begin(_state("bad"), "sighup")


def test_a_version_that_failed_for_a_cause_outside_the_file_is_tried_again_on_sighup_not_by_the_watcher() -> None:
    file = ConfigFile()
    file.started(_state("v1"))
    assert file.begin(_state("v2"), "sighup")
    file.finish(False, draining=False)  # e.g. a port was busy at bind
    assert file.failed_outside
    assert not file.begin(_state("v2"), "watcher")
    assert file.begin(_state("v2"), "sighup")
    file.finish(True, draining=False)
    assert file.succeeded and not file.failed_outside
    assert not file.begin(_state("v2"), "sighup")


def test_a_failure_while_draining_is_not_counted_as_one_outside_the_file() -> None:
    file = ConfigFile()
    assert file.begin(_state("v2"), "api")
    file.finish(False, draining=True)
    assert not file.failed_outside


def test_the_watcher_reloads_only_a_readable_file_that_is_not_as_last_read() -> None:
    file = ConfigFile()
    file.started(_state("v1"))
    assert not file.changed(_state("v1"))
    assert not file.changed(None)  # unreadable for now (a ConfigMap swap under way)
    assert file.changed(_state("v1", mtime=2))  # touched: reloaded, and then found unchanged
    file.begin(_state("v1", mtime=2), "watcher")
    assert not file.changed(_state("v1", mtime=2))


def test_an_unreadable_file_after_a_readable_one_is_a_new_attempt() -> None:
    file = ConfigFile()
    file.started(_state("v1"))
    assert file.begin(None, "sighup")  # attempted, and the loader then reports it cannot read it


def test_file_state_tells_versions_apart_by_content_and_is_none_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "outrigger.yaml"
    path.write_text("a: 1\n")
    first = file_state(str(path))
    assert first is not None
    path.write_text("a: 2\n")
    os.utime(path, ns=(first[0], first[0]))  # same mtime and size: only the digest differs
    second = file_state(str(path))
    assert second is not None and second[-1] != first[-1]
    assert file_state(str(tmp_path / "missing.yaml")) is None


def test_effective_keeps_admin_telemetry_and_parser_limits_and_takes_everything_else(
        caplog: pytest.LogCaptureFixture) -> None:
    active_data = base_config("http://127.0.0.1:1")
    new_data = base_config("http://127.0.0.1:2")
    new_data["admin"] = {"address": "127.0.0.1:9999"}
    new_data["telemetry"]["access_log"] = {"enabled": True}
    new_data["limits"] = {"max_headers": 7, "max_header_bytes": "1KiB", "header_read_timeout": "1s",
                          "keepalive_timeout": "3s"}
    active, new = to_config(active_data), to_config(new_data)
    result = effective(new, active)
    assert result.admin == active.admin
    assert result.telemetry == active.telemetry
    assert (result.limits.max_headers, result.limits.max_header_bytes, result.limits.header_read_timeout) == (
        active.limits.max_headers, active.limits.max_header_bytes, active.limits.header_read_timeout)
    assert result.limits.keepalive_timeout == 3.0  # not a parser limit: applied
    assert result.upstreams["svc"].url == "http://127.0.0.1:2"
    assert "changes to admin, telemetry, limits.max_header_bytes" in caplog.text


def test_effective_warns_of_nothing_when_only_reloadable_parts_change(caplog: pytest.LogCaptureFixture) -> None:
    active = to_config(base_config("http://127.0.0.1:1"))
    new = to_config(base_config("http://127.0.0.1:2"))
    assert effective(new, active) == new
    assert "take effect on restart only" not in caplog.text
