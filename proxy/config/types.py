"""Frozen, typed config objects: the shape of ``outrigger.yaml``.

These are *config* types only; the runtime objects built from them live in
``proxy.app`` and ``proxy.policies``.  Invariants that involve a single block
are checked in ``__post_init__`` (so msgspec reports them at the block's
path), with the rules of ``proxy.config.validators``; cross-references (routes
naming upstreams, duplicate addresses) are checked by ``proxy.config.checks``.
Duration fields hold seconds as floats.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from proxy.config.units import Duration, Size, parse_duration
from proxy.config.validators import HeaderName, Name, at_least, not_above, positive

__all__ = [
    "AccessLogConfig", "AdaptiveConcurrencyConfig", "AdaptiveTimeoutConfig", "AdminConfig", "BackoffConfig",
    "BudgetConfig", "CircuitBreakerConfig", "ConcurrencyConfig", "Config", "DeadLetterConfig", "DiscoveryConfig",
    "DrainConfig", "FailureRateConfig", "FallbackConfig", "HedgeConfig", "IdempotencyConfig", "LimitsConfig",
    "ListenerConfig", "MatchConfig", "OpenDurationConfig", "OutlierDetectionConfig", "OutlierFailureRateConfig",
    "PolicyDefaults", "RateLimitConfig", "RateLimitKey", "RedisConfig", "RetryConfig", "RouteConfig",
    "RouteDeadLetterConfig", "SlowCallConfig", "TelemetryConfig", "TimeoutConfig", "TlsConfig", "TracingConfig",
    "UpstreamConfig",
]

RetryOn = Literal["connect-failure", "reset", "timeout", "gateway-error", "5xx", "retriable-status-codes"]
StatusCode = Annotated[int, msgspec.Meta(ge=100, le=599)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
QueryParamName = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^&=#\s]+\Z")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class Block(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for every config block: immutable and strict about unknown keys."""


# --- policy blocks (see the "Resilience policies" section of the README) ---


Percentile = Annotated[float, msgspec.Meta(gt=0.0, lt=100.0)]


class AdaptiveTimeoutConfig(Block, frozen=True):
    """``timeout.adaptive``: the attempt timeout learned from recent latencies (docs/adaptive.md)."""

    percentile: Percentile = 99.0
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    min: Duration = Duration(0.02)
    window: Duration = Duration(30.0)
    min_samples: PositiveInt = 50

    def __post_init__(self) -> None:
        positive("min", self.min)
        positive("window", self.window)


class TimeoutConfig(Block, frozen=True):
    connect: Duration = Duration(1.0)
    attempt: Duration = Duration(2.0)
    total: Duration = Duration(5.0)
    idle: Duration = Duration(30.0)
    adaptive: AdaptiveTimeoutConfig | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "attempt", "total", "idle"):
            positive(name, getattr(self, name))
        not_above("attempt", self.attempt, "total", self.total, relation="is longer than")
        if self.adaptive is not None:
            not_above("adaptive.min", self.adaptive.min, "attempt", self.attempt, relation="is above",
                      why="the ceiling of the adaptive timeout")


class HedgeConfig(Block, frozen=True):
    """``hedge``: backup requests for slow idempotent attempts (docs/adaptive.md)."""

    delay: str | float = "auto"  # "auto" (the route's observed percentile) or a duration
    percentile: Percentile = 95.0
    max_extra_load: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.05
    max_hedges: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1

    def __post_init__(self) -> None:
        if self.delay != "auto":
            positive("delay", self.delay_s or 0.0)

    @property
    def delay_s(self) -> float | None:
        """The fixed delay in seconds; None for ``auto``.  Raises ValueError for a malformed one."""
        return None if self.delay == "auto" else float(parse_duration(self.delay))


class BackoffConfig(Block, frozen=True):
    base: Duration = Duration(0.025)
    max: Duration = Duration(0.25)
    jitter: Literal["full", "equal", "decorrelated", "none"] = "full"

    def __post_init__(self) -> None:
        not_above("base", self.base, "max", self.max)


class BudgetConfig(Block, frozen=True):
    ratio: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.2
    min_per_second: Annotated[float, msgspec.Meta(ge=0.0)] = 10.0
    window: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        positive("window", self.window)


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
    other_endpoint: bool = True  # a retry prefers an endpoint this request has not tried yet


class FailureRateConfig(Block, frozen=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    window: Duration = Duration(10.0)
    min_requests: PositiveInt = 20

    def __post_init__(self) -> None:
        positive("window", self.window)


class SlowCallConfig(Block, frozen=True):
    duration: Duration = Duration(1.0)
    rate_threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.8
    window: Duration = Duration(10.0)
    min_requests: PositiveInt = 20

    def __post_init__(self) -> None:
        positive("duration", self.duration)
        positive("window", self.window)


class OpenDurationConfig(Block, frozen=True):
    min: Duration = Duration(1.0)
    max: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        positive("min", self.min)
        not_above("min", self.min, "max", self.max)


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
    header: HeaderName


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
        positive("ttl", self.ttl)


class AdaptiveConcurrencyConfig(Block, frozen=True):
    """``concurrency.adaptive``: an AIMD limit under ``max_active`` (docs/adaptive.md)."""

    algorithm: Literal["aimd"] = "aimd"
    initial: PositiveInt = 20
    min: PositiveInt = 4
    decrease_ratio: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.9

    def __post_init__(self) -> None:
        not_above("min", self.min, "initial", self.initial, seconds=False, relation="is above")


class ConcurrencyConfig(Block, frozen=True):
    max_active: PositiveInt = 100
    max_pending: Annotated[int, msgspec.Meta(ge=0)] = 100
    pending_timeout: Duration = Duration(1.0)
    adaptive: AdaptiveConcurrencyConfig | None = None

    def __post_init__(self) -> None:
        if self.adaptive is not None:
            not_above("adaptive.initial", self.adaptive.initial, "max_active", self.max_active, seconds=False,
                      relation="is above", why="the ceiling of the adaptive limit")


FallbackOn = Literal[
    "circuit_open", "overflow", "upstream_connect_failure", "upstream_reset", "upstream_timeout",
    "upstream_protocol_error", "upstream_tls_error", "deadline_exceeded",
]


class FallbackConfig(Block, frozen=True):
    status: StatusCode = 503
    body: str = '{"degraded": true}'
    content_type: str = "application/json"
    on: tuple[FallbackOn, ...] = ("circuit_open",)


DEAD_LETTER_ON = (
    "upstream_connect_failure", "upstream_timeout", "upstream_reset", "upstream_protocol_error",
    "upstream_tls_error", "deadline_exceeded", "circuit_open", "overflow", "http_5xx",
)


class RouteDeadLetterConfig(Block, frozen=True):
    """A route's ``dead_letter:``: which final outcomes are spooled (see docs/dead-letter.md)."""

    on: tuple[str, ...] = (
        "upstream_connect_failure", "upstream_timeout", "upstream_reset", "deadline_exceeded",
        "circuit_open", "overflow",
    )
    unsafe_methods: bool = False
    max_body: Size = Size(1024 * 1024)
    omit_headers: tuple[str, ...] = ("authorization", "cookie", "proxy-authorization")

    def __post_init__(self) -> None:
        unknown = [value for value in self.on if value not in DEAD_LETTER_ON]
        if unknown:  # checked here, not as a Literal, so the message can list the valid values
            raise ValueError(f"on lists an unknown outcome {unknown[0]!r}; valid: {', '.join(DEAD_LETTER_ON)}")
        if not self.on:
            raise ValueError("on: list at least one outcome (or remove dead_letter to switch it off)")


class DeadLetterConfig(Block, frozen=True):
    """Top-level ``dead_letter:``: the spool shared by every route that enables it."""

    dir: Annotated[str, msgspec.Meta(min_length=1)]
    max_bytes: Size = Size(1024**3)
    max_age: Duration = Duration(7 * 86400.0)

    def __post_init__(self) -> None:
        positive("max_age", self.max_age)
        at_least("max_bytes", int(self.max_bytes), 64 * 1024, "64KiB")


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


class DiscoveryConfig(Block, frozen=True):
    refresh: Duration = Duration(5.0)
    # DNS servers to ask (``host:port``) instead of the system resolver; mainly for tests and
    # for clusters whose resolver is not the pod's.
    nameservers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        positive("refresh", self.refresh)


class OutlierFailureRateConfig(Block, frozen=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.85
    min_requests: PositiveInt = 20
    window: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        positive("window", self.window)


class OutlierDetectionConfig(Block, frozen=True):
    consecutive_failures: PositiveInt = 5  # connect failures, resets, timeouts, 502/503/504
    failure_rate: OutlierFailureRateConfig | None = msgspec.field(default_factory=OutlierFailureRateConfig)
    base_ejection: Duration = Duration(30.0)  # x the number of ejections so far, capped by max_ejection
    max_ejection: Duration = Duration(300.0)
    max_ejected_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] = 50  # and never the last endpoint

    def __post_init__(self) -> None:
        positive("base_ejection", self.base_ejection)
        not_above("base_ejection", self.base_ejection, "max_ejection", self.max_ejection, relation="is longer than")


LoadBalancer = Literal["p2c_ewma", "least_request", "round_robin"]


class UpstreamConfig(Block, frozen=True):
    url: str
    max_connections: PositiveInt = 100  # per endpoint where there are several
    idle_timeout: Duration = Duration(4.0)  # pool keep-alive; shorter than typical server idle timeouts
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    circuit_breaker: CircuitBreakerConfig | None = None
    concurrency: ConcurrencyConfig | None = None
    # Endpoints (docs/endpoints.md): a static list, or the url's host re-resolved by discovery.
    endpoints: tuple[str, ...] | None = None
    discovery: DiscoveryConfig | None = None
    load_balancer: LoadBalancer = "p2c_ewma"
    outlier_detection: OutlierDetectionConfig | None = msgspec.field(default_factory=OutlierDetectionConfig)
    slow_start: Duration = Duration(30.0)  # 0: off
    preconnect: Annotated[int, msgspec.Meta(ge=0)] = 0  # idle connections kept warm per endpoint

    # Cross-field checks (addresses, an empty list, preconnect vs max_connections) are made by
    # the loader, so that each error names its own key.

    @property
    def multi_endpoint(self) -> bool:
        """Balanced over several endpoints (a static list or discovery), not one pool for the url."""
        return self.endpoints is not None or self.discovery is not None


class MatchConfig(Block, frozen=True):
    path_prefix: Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*\Z")] = "/"
    methods: tuple[Annotated[str, msgspec.Meta(pattern=r"^[A-Z]+\Z")], ...] | None = None
    headers: dict[str, str] | None = None


class RouteConfig(Block, frozen=True):
    name: Name
    upstream: str
    match: MatchConfig = msgspec.field(default_factory=MatchConfig)
    rewrite_prefix: Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*\Z")] | None = None
    timeout: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = msgspec.field(default_factory=CircuitBreakerConfig)
    rate_limit: RateLimitConfig | None = None
    fallback: FallbackConfig | None = None
    hedge: HedgeConfig | None = None
    dead_letter: RouteDeadLetterConfig | None = None
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
    """The listener edge's limits (docs/edge.md has the table)."""

    max_header_bytes: Size = Size(64 * 1024)
    max_headers: PositiveInt = 100
    max_body_bytes: Size | None = None
    header_read_timeout: Duration = Duration(10.0)
    # An app connection with no request in flight is closed after this long (nginx: 75s, Envoy: 1h).
    keepalive_timeout: Duration = Duration(60.0)
    # App connections open at once per listener; connections beyond it are closed as they are accepted.
    max_connections: PositiveInt = 4096
    # Requests one connection may have parsed and waiting behind the one being served.
    max_pipelined: PositiveInt = 16
    # The app sent no body bytes, or read no response bytes, for this long: the request ends (408 client_timeout).
    client_idle_timeout: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        at_least("max_header_bytes", int(self.max_header_bytes), 1024, "1KiB",
                 why="every request would be refused with 431")
        for name in ("header_read_timeout", "keepalive_timeout", "client_idle_timeout"):
            positive(name, getattr(self, name))


class TracingConfig(Block, frozen=True):
    enabled: bool = True
    exporter: Literal["otlp", "console", "none"] = "otlp"
    protocol: Literal["grpc", "http/protobuf", "http"] | None = None
    endpoint: str | None = None
    sample_ratio: Ratio | None = None
    # Query parameters whose values spans record as REDACTED, beside the semantic conventions' list.
    redact_query_params: tuple[QueryParamName, ...] = ()


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
        positive("timeout", self.timeout)


class Config(Block, frozen=True):
    version: Literal[1]
    listeners: tuple[ListenerConfig, ...]
    upstreams: dict[Name, UpstreamConfig]
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    drain: DrainConfig = msgspec.field(default_factory=DrainConfig)
    defaults: PolicyDefaults = msgspec.field(default_factory=PolicyDefaults)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    dead_letter: DeadLetterConfig | None = None
    redis: RedisConfig | None = None
