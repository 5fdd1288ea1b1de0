"""``outrigger demo``, the README's first command, run as users run it (shortened to a few seconds).

The demo starts the flaky upstream and a sidecar on free ports, drives both,
and must show the sidecar turning the flaky upstream into a reliable one: a
higher success rate than calling directly, the sidecar's own retry counters
and one retried request as its trace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CONSOLE_SCRIPT = Path(sys.executable).with_name("outrigger")


def _rates(output: str) -> tuple[float, float]:
    match = re.search(r"success rate\s+([\d.]+)%\s+([\d.]+)%", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def test_demo_shows_the_sidecar_fixing_the_flaky_upstream(tmp_path: Path) -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "demo", "--duration", "2s"], capture_output=True, text=True,
                            timeout=60, check=False, cwd=tmp_path)
    output = result.stdout
    assert result.returncode == 0, (output, result.stderr[-2000:])

    direct, via = _rates(output)
    assert via > direct, output  # 20% 503s, 3% resets and 2% slow answers hurt the direct column
    assert via >= 95.0, output
    assert direct < 95.0, output  # the upstream really was flaky

    retries = dict(re.findall(r'outrigger_retries_total\{reason="(\w+)"\} (\d+)', output))
    assert int(retries.get("http_503", "0")) > 0, output

    # One retried request as its trace: a SERVER span with a failed first attempt and a later one.
    trace = output.partition("One retried request, as its trace")[2]
    assert re.search(r"SERVER GET /\s+-> \d{3}", trace), output  # {method} {http.route}
    assert re.search(r"CLIENT GET attempt 1 -> \w+ \([\d.]+ ms\)", trace), output
    assert "CLIENT GET attempt 2 -> " in trace, output
    assert re.search(r"event backoff \([\d.]+ ms\)", trace), output

    # Not a terminal: progress comes as whole lines (none for a 2 s run), never carriage returns.
    assert "\r" not in output
