"""Frozen, typed config objects: the shape of ``outrigger.yaml``.

These are *config* types only; the runtime objects built from them live in
``proxy.app`` and ``proxy.policies``.  Invariants that involve a single block
are checked in ``__post_init__`` (so msgspec reports them at the block's
path); cross-references (routes naming upstreams, duplicate addresses) are
checked by ``proxy.config.loader``.  Duration fields hold seconds as floats.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from proxy.config.units import Duration, Size

__all__ = [
    "AccessLogConfig",
    "AdminConfig",
    "BackoffConfig",
    "BudgetConfig",
    "CircuitBreakerConfig",
    "ConcurrencyConfig",
    "Config",
    "DrainConfig",
    "FailureRateConfig",
    "FallbackConfig",
    "IdempotencyConfig",
    "LimitsConfig",
    "ListenerConfig",
    "MatchConfig",
    "OpenDurationConfig",
    "PolicyDefaults",
    "RateLimitConfig",
    "RateLimitKey",
    "RedisConfig",
    "RetryConfig",
    "RouteConfig",
    "SlowCallConfig",
    "TelemetryConfig",
    "TimeoutConfig",
    "TlsConfig",
    "TracingConfig",
    "UpstreamConfig",
]

RetryOn = Literal["connect-failure", "reset", "timeout", "gateway-error", "5xx", "retriable-status-codes"]
StatusCode = Annotated[int, msgspec.Meta(ge=100, le=599)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class Block(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for every config block: immutable and strict about unknown keys."""


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")


# --- policy blocks (see the "Resilience policies" section of the README) ---


class TimeoutConfig(Block, frozen=True):
    connect: Duration = Duration(1.0)
    attempt: Duration = Duration(2.0)
    total: Duration = Duration(5.0)
    idle: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        for name in ("connect", "attempt", "total", "idle"):
            _positive(name, getattr(self, name))
        if self.attempt > self.total:
            raise ValueError(f"attempt ({self.attempt:g}s) is longer than total ({self.total:g}s)")


class BackoffConfig(Block, frozen=True):
    base: Duration = Duration(0.025)
    max: Duration = Duration(0.25)
    jitter: Literal["full", "equal", "decorrelated", "none"] = "full"

    def __post_init__(self) -> None:
        if self.base > self.max:
            raise ValueError(f"base ({self.base:g}s) is larger than max ({self.max:g}s)")


class BudgetConfig(Block, frozen=True):
    ratio: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.2
    min_per_second: Annotated[float, msgspec.Meta(ge=0.0)] = 10.0
    window: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        _positive("window", self.window)


class RetryConfig(Block, frozen=True):
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    retry_on: tuple[RetryOn, ...] = (
        "connect-failure", "reset", "timeout", "gateway-error", "retriable-status-codes",
    )
    retriable_status_codes: tuple[StatusCode, ...] = (429, 503)
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)
    respect_retry_after: bool = True
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    retry_non_idempotent: bool = False
    buffer_limit: Size = Size(64 * 1024)


class FailureRateConfig(Block, frozen=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    window: Duration = Duration(10.0)
    min_requests: PositiveInt = 20

    def __post_init__(self) -> None:
        _positive("window", self.window)


class SlowCallConfig(Block, frozen=True):
    duration: Duration = Duration(1.0)
    rate_threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.8
    window: Duration = Duration(10.0)
    min_requests: PositiveInt = 20

    def __post_init__(self) -> None:
        _positive("duration", self.duration)
        _positive("window", self.window)


class OpenDurationConfig(Block, frozen=True):
    min: Duration = Duration(1.0)
    max: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        _positive("min", self.min)
        if self.min > self.max:
            raise ValueError(f"min ({self.min:g}s) is larger than max ({self.max:g}s)")


class CircuitBreakerConfig(Block, frozen=True):
    enabled: bool = True
    scope: Literal["upstream", "route"] = "upstream"
    consecutive_failures: PositiveInt = 5
    failure_rate: FailureRateConfig | None = None
    slow_call: SlowCallConfig | None = None
    open_duration: OpenDurationConfig = msgspec.field(default_factory=OpenDurationConfig)
    half_open_requests: PositiveInt = 1
    failure_status_codes: tuple[StatusCode, ...] = (500, 502, 503, 504)


class RateLimitKey(Block, frozen=True):
    header: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]


class RateLimitConfig(Block, frozen=True):
    requests_per_second: Annotated[float, msgspec.Meta(gt=0.0)] = 100.0
    burst: PositiveInt = 100
    key: RateLimitKey | None = None
    max_keys: PositiveInt = 10_000
    mode: Literal["reject", "queue"] = "reject"
    max_wait: Duration = Duration(0.1)
    # Shared state (docs/shared-state.md): `global` leases tokens from one Redis-side limit per `name`.
    scope: Literal["local", "global"] = "local"
    name: Name | None = None  # key of the shared limit; default: the route name
    on_store_error: Literal["local", "open", "closed"] = "local"
    shadow: bool = False  # count and log would-be 429s, never refuse


class IdempotencyConfig(Block, frozen=True):
    """Route-level Idempotency-Key deduplication (docs/shared-state.md)."""

    store: Literal["redis", "local"] = "local"
    ttl: Duration = Duration(24 * 3600.0)
    max_response_bytes: Size = Size(1024 * 1024)

    def __post_init__(self) -> None:
        _positive("ttl", self.ttl)


class ConcurrencyConfig(Block, frozen=True):
    max_active: PositiveInt = 100
    max_pending: Annotated[int, msgspec.Meta(ge=0)] = 100
    pending_timeout: Duration = Duration(1.0)


FallbackOn = Literal[
    "circuit_open", "overflow", "upstream_connect_failure", "upstream_reset", "upstream_timeout",
    "upstream_protocol_error", "upstream_tls_error", "deadline_exceeded",
]


class FallbackConfig(Block, frozen=True):
    status: StatusCode = 503
    body: str = '{"degraded": true}'
    content_type: str = "application/json"
    on: tuple[FallbackOn, ...] = ("circuit_open",)


class PolicyDefaults(Block, frozen=True):
    """``defaults:``: blocks every route inherits unless it overrides them."""

    timeout: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    rate_limit: RateLimitConfig | None = None
    concurrency: ConcurrencyConfig = msgspec.field(default_factory=ConcurrencyConfig)
    fallback: FallbackConfig | None = None


# --- topology ---


class TlsConfig(Block, frozen=True):
    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together for mTLS")


class UpstreamConfig(Block, frozen=True):
    url: str
    max_connections: PositiveInt = 100
    idle_timeout: Duration = Duration(4.0)  # pool keep-alive; shorter than typical server idle timeouts
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    circuit_breaker: CircuitBreakerConfig | None = None
    concurrency: ConcurrencyConfig | None = None


class MatchConfig(Block, frozen=True):
    path_prefix: Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*$")] = "/"
    methods: tuple[Annotated[str, msgspec.Meta(pattern=r"^[A-Z]+$")], ...] | None = None
    headers: dict[str, str] | None = None


class RouteConfig(Block, frozen=True):
    name: Name
    upstream: str
    match: MatchConfig = msgspec.field(default_factory=MatchConfig)
    rewrite_prefix: Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*$")] | None = None
    timeout: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    rate_limit: RateLimitConfig | None = None
    fallback: FallbackConfig | None = None
    idempotency: IdempotencyConfig | None = None


class ListenerConfig(Block, frozen=True):
    name: Name
    address: str
    routes: tuple[RouteConfig, ...]


class AdminConfig(Block, frozen=True):
    address: str = "127.0.0.1:9901"


class DrainConfig(Block, frozen=True):
    grace: Duration = Duration(5.0)
    timeout: Duration = Duration(30.0)


class LimitsConfig(Block, frozen=True):
    max_header_bytes: Size = Size(64 * 1024)
    max_headers: PositiveInt = 100
    max_body_bytes: Size | None = None
    header_read_timeout: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes ({int(self.max_header_bytes)}) must be at least 1KiB: "
                             "every request would be refused with 431")
        _positive("header_read_timeout", self.header_read_timeout)


class TracingConfig(Block, frozen=True):
    enabled: bool = True
    exporter: Literal["otlp", "console", "none"] = "otlp"
    protocol: Literal["grpc", "http/protobuf", "http"] | None = None
    endpoint: str | None = None
    sample_ratio: Ratio | None = None


class AccessLogConfig(Block, frozen=True):
    enabled: bool = True


class TelemetryConfig(Block, frozen=True):
    service_name: str | None = None
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    access_log: AccessLogConfig = msgspec.field(default_factory=AccessLogConfig)
    propagators: tuple[Literal["tracecontext", "baggage", "b3", "b3multi"], ...] | None = None


class RedisConfig(Block, frozen=True):
    """``redis:``: the shared store of global rate limits and idempotency records."""

    url: str
    timeout: Duration = Duration(0.02)  # per Redis call, never past the request's deadline

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)


class Config(Block, frozen=True):
    version: Literal[1]
    listeners: tuple[ListenerConfig, ...]
    upstreams: dict[Name, UpstreamConfig]
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    drain: DrainConfig = msgspec.field(default_factory=DrainConfig)
    defaults: PolicyDefaults = msgspec.field(default_factory=PolicyDefaults)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    redis: RedisConfig | None = None
