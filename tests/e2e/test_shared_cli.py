"""`outrigger validate` on shared-state configs, as users run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.sidecar import base_config


def validate(tmp_path: Path, data: dict[str, object]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "outrigger.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run([sys.executable, "-m", "proxy", "validate", str(path)], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://cache:6379/0"})


def test_validate_rejects_global_scope_and_redis_store_without_redis_url_and_unknown_on_store_error(
        tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9", rate_limit={"scope": "global", "on_store_error": "retry"},
                       idempotency={"store": "redis"})
    proc = validate(tmp_path, data)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "listeners[0].routes[0].rate_limit.on_store_error" in output
    data = base_config("http://127.0.0.1:9", rate_limit={"scope": "global"}, idempotency={"store": "redis"})
    output = (proc := validate(tmp_path, data)).stdout + proc.stderr
    assert proc.returncode != 0
    assert "listeners[0].routes[0].rate_limit.scope: scope: global needs a top-level redis.url" in output
    assert "listeners[0].routes[0].idempotency.store: store: redis needs a top-level redis.url" in output


def test_validate_accepts_a_shared_state_config_with_redis_url_from_the_environment(tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9", rate_limit={"scope": "global", "name": "partner-api"},
                       idempotency={"store": "redis", "ttl": "24h"})
    data["redis"] = {"url": "${REDIS_URL}", "timeout": "20ms"}
    proc = validate(tmp_path, data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
