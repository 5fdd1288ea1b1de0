"""``outrigger dlq list|show|replay|purge``: the spool from a shell in the pod.

The spool directory and ``max_age`` come from the config (``--config``, as
for ``run``; ``--dir`` overrides the directory).  These commands only read
segments and append marks of their own; they never rewrite what the sidecar
wrote, so they are safe to run while it serves.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from proxy.config import Config, ConfigError, load_config_file, parse_address
from proxy.config.units import parse_duration
from proxy.deadletter.index import EntryRef, SpoolIndex
from proxy.deadletter.record import Entry, Mark, encode_mark
from proxy.deadletter.segment import SegmentWriter

__all__ = ["add_dlq_parser"]

_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1", "": "127.0.0.1"}


def _time(text: str) -> float:
    """``1h`` (that long ago) or an ISO 8601 time, as unix seconds."""
    try:
        return time.time() - parse_duration(text)
    except (TypeError, ValueError):
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like '1h' or an ISO 8601 time, got {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Spool:
    """What a command needs: the config, the directory, an index read once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.config_path: str = args.config_path(args.config)
        self.config: Config | None = None
        try:
            self.config = load_config_file(self.config_path)
        except ConfigError as exc:
            if args.dir is None:
                print(f"outrigger: {exc.source}: {len(exc.issues)} error(s)", file=sys.stderr)
                for issue in exc.issues:
                    print(f"  {issue}", file=sys.stderr)
                raise SystemExit(1) from None
            print(f"outrigger: warning: {self.config_path} did not load ({len(exc.issues)} error(s)); "
                  f"using --dir {args.dir}", file=sys.stderr)
        spool = self.config.dead_letter if self.config is not None else None
        if args.dir is None and spool is None:
            raise SystemExit(f"outrigger: dead_letter is not configured in {self.config_path}; "
                             "add a top-level dead_letter.dir or pass --dir")
        self.directory: str = args.dir or (spool.dir if spool is not None else "")
        max_age = spool.max_age if spool is not None else 7 * 86400.0
        self.expired_before = time.time() - max_age
        self.index = SpoolIndex(self.directory)
        try:
            self.index.refresh()
        except OSError as exc:
            where = "--dir" if args.dir else "dead_letter.dir"
            raise SystemExit(f"outrigger: {where} {self.directory}: cannot read the spool: "
                             f"{exc.strerror or exc}") from None

    def select(self, route: str | None = None, since: float | None = None, before: float | None = None,
               entry_id: str | None = None) -> list[EntryRef]:
        return [ref for ref in self.index.live(self.expired_before)
                if (route is None or ref.route == route) and (entry_id is None or ref.id == entry_id)
                and (since is None or ref.ts >= since) and (before is None or ref.ts < before)]

    def listener_url(self, entry: Entry) -> str:
        listeners = self.config.listeners if self.config is not None else ()
        if not listeners:
            raise SystemExit("outrigger: no listener in the config to replay through; pass --to URL")
        listener = next((lst for lst in listeners if lst.name == entry.listener), listeners[0])
        host, port = parse_address(listener.address)
        host = _WILDCARD_HOSTS.get(host, host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _summary(spool: _Spool, ref: EntryRef, entry: Entry) -> dict[str, Any]:
    state = spool.index.state(ref.id)
    return {"id": entry.id, "time": _iso(entry.ts), "route": entry.route, "listener": entry.listener,
            "method": entry.method, "target": entry.target, "error": entry.error, "attempts": entry.attempts,
            "replays": state.replays, "idempotency_key": entry.idempotency_key, "body_bytes": len(entry.body)}


def cmd_list(args: argparse.Namespace) -> int:
    spool = _Spool(args)
    rows = [_summary(spool, ref, spool.index.read(ref)) for ref in spool.select(args.route, args.since)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<21}  {'TIME':<24}  {'ROUTE':<16}  {'ERROR':<24}  {'REPLAYS':>7}  REQUEST")
    for row in rows:
        print(f"{row['id']:<21}  {row['time']:<24}  {row['route']:<16}  {row['error']:<24}  {row['replays']:>7}  "
              f"{row['method']} {row['target']}")
    torn = spool.index.torn_bytes()
    extra = f"; skipped torn tails: {sum(torn.values())} bytes in {len(torn)} segment(s)" if torn else ""
    print(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} waiting{extra}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    spool = _Spool(args)
    ref = spool.index.entries.get(args.id)
    if ref is None:
        print(f"outrigger: no entry {args.id} in {spool.directory}", file=sys.stderr)
        return 1
    entry = spool.index.read(ref)
    state = spool.index.state(ref.id)
    data = _summary(spool, ref, entry)
    try:
        body: dict[str, str] = {"text": entry.body.decode()}
    except UnicodeDecodeError:
        body = {"base64": base64.b64encode(entry.body).decode()}
    data.update(headers=entry.headers, omitted_headers=entry.omitted, traceparent=entry.traceparent,
                message=entry.message, body=body, last_replay_error=state.last_replay_error or None,
                state="done" if state.done else "purged" if state.purged else
                "expired" if ref.ts < spool.expired_before else "waiting")
    print(json.dumps(data, indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from proxy.deadletter.replay import SidecarUnreachable, replay  # http.client: not for every `outrigger run`
    spool = _Spool(args)
    refs = spool.select(args.route, args.since, entry_id=args.id)
    if args.id is not None and not refs:
        print(f"outrigger: no waiting entry {args.id}", file=sys.stderr)
        return 1
    try:
        report = replay(spool.directory, refs, index=spool.index, expired_before=spool.expired_before,
                        target_for=(lambda entry: args.to) if args.to else spool.listener_url,
                        rate=args.rate, dry_run=args.dry_run, progress=print)
    except SidecarUnreachable as exc:
        print(f"outrigger: {exc}", file=sys.stderr)
        return 1
    for entry in report.dry_run:
        print(f"would replay {entry.id} {entry.method} {entry.target} (route {entry.route}) "
              f"to {args.to or spool.listener_url(entry)}")
    print(f"replayed: {len(report.done)} done, {len(report.failed)} failed (kept), "
          f"{len(report.busy)} busy in another replay" + (f", {len(report.dry_run)} dry-run" if args.dry_run else ""),
          file=sys.stderr)
    return 1 if report.failed else 0


def cmd_purge(args: argparse.Namespace) -> int:
    spool = _Spool(args)
    refs = spool.select(args.route, before=args.before)
    writer = SegmentWriter(spool.directory, 64 * 1024 * 1024)
    try:
        if refs:  # one durable append for them all
            writer.append(b"".join(encode_mark(Mark(id=ref.id, ts=time.time(), kind="purged")) for ref in refs))
    finally:
        writer.close()
    spool.index.refresh()
    freed = spool.index.compact(spool.expired_before)
    print(f"purged {len(refs)} entr{'y' if len(refs) == 1 else 'ies'}; freed {freed} bytes")
    return 0


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of replays per second, got {text!r}")
    return rate


def add_dlq_parser(sub: Any, config_help: str, config_path: Callable[[str | None], str]) -> None:
    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead-letter entries")
    commands = dlq.add_subparsers(dest="dlq_command", required=True)

    def command(name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=helptext)
        parser.add_argument("--config", help=config_help)
        parser.add_argument("--dir", help="the spool directory (default: the config's dead_letter.dir)")
        parser.set_defaults(func=func, config_path=config_path)
        return parser

    listing = command("list", "list waiting entries, oldest first", cmd_list)
    listing.add_argument("--route")
    listing.add_argument("--since", type=_time, help="spooled after this: '1h' ago or an ISO 8601 time")
    listing.add_argument("--json", action="store_true")
    show = command("show", "show one entry, headers and body included", cmd_show)
    show.add_argument("id")
    again = command("replay", "send waiting entries through the sidecar again", cmd_replay)
    which = again.add_mutually_exclusive_group()
    which.add_argument("--route")
    which.add_argument("--id")
    again.add_argument("--since", type=_time, help="only entries spooled after this ('1h' or ISO 8601)")
    again.add_argument("--to", help="base URL of the sidecar listener (default: the entry's listener in the config)")
    again.add_argument("--rate", type=_rate, default=10.0, help="at most this many replays per second (10)")
    again.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    purge = command("purge", "drop waiting entries and free their space", cmd_purge)
    purge.add_argument("--route")
    purge.add_argument("--before", type=_time, help="only entries spooled before this ('1h' ago or ISO 8601)")
