"""Command line: ``outrigger run|validate|demo|demo-upstream|wait-ready|sleep|dlq``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

from proxy import __version__
from proxy.config import ConfigError, load_config_file, parse_address
from proxy.config.units import parse_duration

DEFAULT_CONFIG = "./config/outrigger.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_HELP = f"config file (default: $OUTRIGGER_CONFIG, then {DEFAULT_CONFIG})"


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("OUTRIGGER_CONFIG") or DEFAULT_CONFIG


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _print_errors(exc: ConfigError) -> None:
    print(f"outrigger: {exc.source}: {len(exc.issues)} error(s)", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    import prometheus_client

    from proxy.lifecycle.sidecar import Sidecar
    from proxy.logs import configure_logging

    args.log_level = args.log_level.lower()
    if args.log_level not in LOG_LEVELS:  # the default comes from $OUTRIGGER_LOG_LEVEL, which argparse never checks
        print(f"outrigger: OUTRIGGER_LOG_LEVEL: unknown level {args.log_level!r}; use one of {', '.join(LOG_LEVELS)}",
              file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    # One series per counter and histogram, not two: the *_created twins only double what Prometheus stores.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    path = _config_path(args.config)
    try:
        config = load_config_file(path)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    _use_uvloop()

    async def main() -> None:
        sidecar = Sidecar(config, config_path=path, watch_interval_s=args.watch_interval)
        await sidecar.run_until_signalled()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"outrigger: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    if args.path is not None and args.config is not None and args.path != args.config:
        print("outrigger: validate: give the config file once, as --config FILE or as FILE", file=sys.stderr)
        return 2
    path = _config_path(args.config or args.path)  # the same lookup as `run`
    try:
        config = load_config_file(path)
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    routes = sum(len(lst.routes) for lst in config.listeners)
    print(f"outrigger: {path} is valid: {len(config.listeners)} listener(s), {routes} route(s), "
          f"{len(config.upstreams)} upstream(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo.runner import run_demo
    return run_demo(duration_s=args.duration, concurrency=args.concurrency, failure_rate=args.failure_rate)


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from proxy.demo.upstream import FlakyBehaviour, serve_forever
    behaviour = FlakyBehaviour(failure_rate=args.failure_rate, reset_rate=args.reset_rate,
                               latency_s=args.latency, slow_rate=args.slow_rate, slow_latency_s=args.slow_latency)
    asyncio.run(serve_forever(args.host, args.port, behaviour))
    return 0


def cmd_wait_ready(args: argparse.Namespace) -> int:
    """Block until /readyz answers 200 (for the legacy-sidecar postStart hook)."""
    import urllib.error  # only here: `outrigger run` starts faster without urllib.request
    import urllib.request
    host, port = parse_address(args.address)
    url = f"http://{host}:{port}/readyz"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    print(f"outrigger: {url} not ready after {args.timeout:g}s", file=sys.stderr)
    return 1


def cmd_sleep(args: argparse.Namespace) -> int:
    """Sleep (for preStop hooks in an image without a shell)."""
    time.sleep(args.seconds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrigger", description="A resilience sidecar for outbound HTTP.")
    parser.add_argument("--version", action="version", version=f"outrigger {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", help=CONFIG_HELP)
    run.add_argument("--watch-interval", type=parse_duration, default=2.0,
                     help="how often to poll the config file for changes; 0 disables polling (SIGHUP still reloads)")
    run.add_argument("--log-level", default=os.environ.get("OUTRIGGER_LOG_LEVEL", "info"), type=str.lower,
                     choices=LOG_LEVELS, help="log level (default: $OUTRIGGER_LOG_LEVEL, then info)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a config file and exit")
    validate.add_argument("path", nargs="?", help="config file (or --config FILE)")
    validate.add_argument("--config", help=CONFIG_HELP)
    validate.set_defaults(func=cmd_validate)

    demo = sub.add_parser("demo", help="show the sidecar fixing a flaky upstream")
    demo.add_argument("--duration", type=parse_duration, default=20.0, help="how long to drive traffic (20s)")
    demo.add_argument("--concurrency", type=int, default=4, help="concurrent callers per column (4)")
    demo.add_argument("--failure-rate", type=float, default=0.2, help="share of upstream 503s (0.2)")
    demo.set_defaults(func=cmd_demo)

    up = sub.add_parser("demo-upstream", help="run the flaky demo upstream on its own")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--failure-rate", type=float, default=0.2, help="share answered 503")
    up.add_argument("--reset-rate", type=float, default=0.02, help="share whose connection is reset")
    up.add_argument("--latency", type=parse_duration, default=0.005, help="base latency (5ms)")
    up.add_argument("--slow-rate", type=float, default=0.02, help="share answered slowly")
    up.add_argument("--slow-latency", type=parse_duration, default=2.0, help="latency of slow answers (2s)")
    up.set_defaults(func=cmd_demo_upstream)

    wait = sub.add_parser("wait-ready", help="wait until the admin /readyz answers 200")
    wait.add_argument("--address", default="127.0.0.1:9901", type=_address,
                      help="the admin address, host:port (127.0.0.1:9901)")
    wait.add_argument("--timeout", type=parse_duration, default=60.0)
    wait.set_defaults(func=cmd_wait_ready)

    sleep = sub.add_parser("sleep", help="sleep N seconds (preStop hook helper)")
    sleep.add_argument("seconds", type=parse_duration)
    sleep.set_defaults(func=cmd_sleep)

    from proxy.deadletter.cli import add_dlq_parser
    add_dlq_parser(sub, CONFIG_HELP, _config_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
