"""The admin status page, rendered by a real browser (Debian's headless chromium) against a live sidecar.

The sidecar has an open breaker, a rate-limited route and some traffic; the
test reads the DOM the page's script built from /status.  Set
``OUTRIGGER_STATUS_SCREENSHOT=docs/images/status-page.png`` to refresh the
screenshot in the docs from the same run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from html.parser import HTMLParser
from typing import Any

import aiohttp

from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("OUTRIGGER_STATUS_SCREENSHOT")
SCREENSHOT_PATH = os.path.abspath(SCREENSHOT) if SCREENSHOT else None


class Rows(HTMLParser):
    """Table rows by their data-* key (``route:orders``), each a list of (cell classes, cell text)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str, str]]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[tuple[str, str]] | None = None
        self._cell: list[str] | None = None
        self._cell_class = ""
        self.text: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table or ""] = []
        elif tag == "tr":
            self._row = []
            for key in ("data-route", "data-upstream", "data-listener"):
                if a.get(key):
                    self.rows[f"{key[5:]}:{a[key]}"] = self._row
        elif tag == "td":
            self._cell, self._cell_class = [], a.get("class") or ""
        if a.get("id") in ("version", "readiness", "error"):
            self._id = a["id"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append((self._cell_class, "".join(self._cell).strip()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._table is not None and self._row:
                self.tables[self._table].append([text for _, text in self._row])
            self._row = None
        elif tag in ("b", "span"):
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._id is not None:
            self.text[self._id] = self.text.get(self._id, "") + data

    def cell(self, row: str, cls: str) -> str:
        return next(text for classes, text in self.rows[row] if cls in classes.split())


async def chromium(url: str, *extra: str) -> str:
    """The DOM after the page's script ran (a few seconds of virtual time: several /status polls)."""
    with tempfile.TemporaryDirectory(prefix="outrigger-chromium-") as profile:
        assert CHROMIUM is not None
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=3000", *extra, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out.decode()


async def test_status_page_in_a_real_browser_shows_an_open_breaker_routes_and_live_numbers(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    assert CHROMIUM, "chromium is needed (.ci/run installs it: apt-get install chromium)"
    config = base_config(upstream.url, name="orders", match={"path_prefix": "/orders"}, retry={"max_attempts": 1})
    config["upstreams"]["svc"]["circuit_breaker"] = {"consecutive_failures": 2,
                                                     "open_duration": {"min": "60s", "max": "90s"}}
    config["upstreams"]["users"] = {"url": upstream.url}
    config["listeners"][0]["routes"].append({"name": "users", "match": {"path_prefix": "/users"},
                                             "upstream": "users",
                                             "rate_limit": {"requests_per_second": 0.01, "burst": 20}})
    sidecar = await sidecar_factory(config)
    base = f"http://127.0.0.1:{sidecar.port('main')}"
    upstream.script(Reply(503), Reply(503))
    for path in ["/orders/1"] * 5 + ["/users/1"] * 4:
        async with client.get(base + path) as resp:
            await resp.read()

    url = f"http://127.0.0.1:{sidecar.admin_port}/"
    dom = Rows()
    dom.feed(await chromium(url, "--dump-dom"))
    if SCREENSHOT_PATH:
        await chromium(url, f"--screenshot={SCREENSHOT_PATH}", "--window-size=1280,820",
                       "--hide-scrollbars")

    assert dom.text.get("readiness") == "ready" and not dom.text.get("error")
    assert dom.cell("upstream:svc", "breaker-state") == "open"
    assert re.fullmatch(r"\d+\.\d s", dom.cell("upstream:svc", "time-in-state"))
    assert dom.cell("upstream:users", "breaker-state") == "closed"
    assert (dom.cell("upstream:svc", "bulkhead-active"), dom.cell("upstream:svc", "bulkhead-pending")) == ("0", "0")
    assert dom.cell("route:orders", "requests") == "5" and dom.cell("route:users", "requests") == "4"
    assert dom.cell("route:orders", "error-rate") == "100.0 %"  # 2 upstream 503s, 3 fast-fails
    assert dom.cell("route:users", "error-rate") == "0.0 %"
    assert re.fullmatch(r"\d+\.\d ms", dom.cell("route:orders", "p99"))
    assert re.fullmatch(r"\d+\.\d", dom.cell("route:users", "req-rate"))  # two polls in: a live rate
    assert 15.9 <= float(dom.cell("route:users", "rate-limit")) <= 16.5  # 20 burst, 4 taken, slow refill
    assert dom.cell("route:orders", "retry-budget").isdigit()
    assert [text for _, text in dom.rows["listener:main"]] == ["main", f"127.0.0.1:{sidecar.port('main')}", "0"]
    (transition,) = dom.tables["transitions"]
    assert transition[1:4] == ["svc", "closed", "open"] and "2 consecutive failures" in transition[4]
