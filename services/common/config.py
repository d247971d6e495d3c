"""Configuration: every service reads its environment here, once, into a frozen object.

Nothing else in the code base reads ``os.environ`` (the OpenTelemetry SDK and boto3
read their own standard ``OTEL_*`` and ``AWS_*`` variables). A missing or malformed
variable stops the service at start with a message naming the variable.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.common.schedule import RateSchedule
from services.common.units import parse_duration, parse_fraction, parse_rate, parse_size

T = TypeVar("T")

Env = Mapping[str, str]


class ConfigError(Exception):
    """A configuration variable is missing or malformed."""


def required(env: Env, name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required but not set")
    return value


def optional(env: Env, name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def parsed(env: Env, name: str, parser: Callable[[str], T], default: str) -> T:
    text = optional(env, name, default)
    try:
        return parser(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def port(env: Env, name: str, default: int) -> int:
    value = parsed(env, name, int, str(default))
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name}: {value} is not a TCP port")
    return value


def positive_int(env: Env, name: str, default: int) -> int:
    value = parsed(env, name, int, str(default))
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, not {value}")
    return value


def positive_number(env: Env, name: str, default: float) -> float:
    value = parsed(env, name, float, str(default))
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name}: must be a number above zero, not {value}")
    return value


def switch(env: Env, name: str, default: bool) -> bool:
    text = optional(env, name, "on" if default else "off").lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name}: {text!r} is neither on nor off")


def positive_duration(env: Env, name: str, default: str) -> float:
    value = parsed(env, name, parse_duration, default)
    if value <= 0:
        raise ConfigError(f"{name}: must be above zero")
    return value


def fresh_window(env: Env) -> float:
    """How long a photo counts as fresh after its receipt (then it joins the backlog)."""
    return positive_duration(env, "PHOTOFERRY_SHIP_FRESH_WINDOW", "10m")


def idle_timeout(env: Env) -> float:
    """How long an HTTP connection may stay open without a complete request head
    (idle between requests, or sending its headers slowly) before it is closed."""
    return positive_duration(env, "PHOTOFERRY_IDLE_TIMEOUT", "15s")


def endpoint_url(env: Env, name: str) -> str:
    value = required(env, name)
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name}: {value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def optional_endpoint_url(env: Env, name: str) -> str | None:
    """An endpoint that may be left unset (None), but is a URL when set."""
    return endpoint_url(env, name) if env.get(name, "").strip() else None


@dataclass(frozen=True)
class LogSettings:
    level: str
    format: str  # "json", "text", or "auto" (JSON unless stdout is a terminal)

    @classmethod
    def from_env(cls, env: Env) -> LogSettings:
        level = optional(env, "PHOTOFERRY_LOG_LEVEL", "info").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"PHOTOFERRY_LOG_LEVEL: {level!r} is not debug, info, warning or error")
        fmt = optional(env, "PHOTOFERRY_LOG_FORMAT", "auto").lower()
        if fmt not in ("auto", "json", "text"):
            raise ConfigError(f"PHOTOFERRY_LOG_FORMAT: {fmt!r} is not auto, json or text")
        return cls(level=level, format=fmt)


@dataclass(frozen=True)
class TracingSettings:
    """What the services need to know of the standard OTEL variables; the SDK reads the rest."""

    disabled: bool
    export_configured: bool

    @classmethod
    def from_env(cls, env: Env) -> TracingSettings:
        return cls(
            disabled=env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true",
            export_configured=bool(
                env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            ),
        )


def store_endpoint(env: Env) -> str:
    """The local store: an S3-protocol URL, or ``file:///path`` for the embedded store."""
    value = required(env, "PHOTOFERRY_STORE_ENDPOINT")
    if value.startswith("file:"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(value).path)
        if not value.startswith("file:///") or not path.startswith("/"):
            raise ConfigError(f"PHOTOFERRY_STORE_ENDPOINT: {value!r} is not file:///an/absolute/path")
        return "file://" + (path.rstrip("/") or "/")
    return endpoint_url(env, "PHOTOFERRY_STORE_ENDPOINT")


@dataclass(frozen=True)
class StoreSettings:
    """The local store: S3-protocol (MinIO on a site), or the embedded store on a file system."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    timeout: float

    @classmethod
    def from_env(cls, env: Env) -> StoreSettings:
        endpoint = store_endpoint(env)
        # The embedded store is a directory: it has no credentials.
        embedded = endpoint.startswith("file://")
        return cls(
            endpoint=endpoint,
            access_key=optional(env, "PHOTOFERRY_STORE_ACCESS_KEY", "") if embedded else required(
                env, "PHOTOFERRY_STORE_ACCESS_KEY"),
            secret_key=optional(env, "PHOTOFERRY_STORE_SECRET_KEY", "") if embedded else required(
                env, "PHOTOFERRY_STORE_SECRET_KEY"),
            bucket=optional(env, "PHOTOFERRY_STORE_BUCKET", "photoferry"),
            region=optional(env, "PHOTOFERRY_STORE_REGION", "us-east-1"),
            timeout=parsed(env, "PHOTOFERRY_STORE_TIMEOUT", parse_duration, "10s"),
        )


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its private key, as PEM files."""

    cert: str
    key: str


def tls_files(env: Env, cert_name: str, key_name: str) -> TlsFiles | None:
    """Both files, or neither (then no TLS)."""
    cert, key = env.get(cert_name, "").strip(), env.get(key_name, "").strip()
    if bool(cert) != bool(key):
        raise ConfigError(f"{cert_name} and {key_name} go together: set both (TLS) or neither")
    return TlsFiles(cert=cert, key=key) if cert else None


@dataclass(frozen=True)
class DeviceLimits:
    """What one device may take of a gateway: a token bucket of photos, and uploads at once."""

    photos_per_minute: float  # sustained
    burst: int  # photos sent at once after a quiet spell (e.g. a camera catching up after an outage)
    max_inflight: int

    @classmethod
    def from_env(cls, env: Env) -> DeviceLimits:
        return cls(
            photos_per_minute=positive_number(env, "PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE", 30),
            burst=positive_int(env, "PHOTOFERRY_DEVICE_BURST", 60),
            max_inflight=positive_int(env, "PHOTOFERRY_DEVICE_MAX_INFLIGHT", 2),
        )


@dataclass(frozen=True)
class GatewayConfig:
    port: int
    amqp_url: str
    store: StoreSettings
    device_secret: str | None  # None only when device auth is switched off
    device_secret_previous: str | None  # accepted alongside the current one while devices move over
    device_limits: DeviceLimits
    tls: TlsFiles | None  # serve HTTPS with these; None: plain HTTP
    max_image_bytes: int
    max_inflight: int
    max_inflight_bytes: int  # memory the uploads in flight may hold, as each really holds it
    publish_timeout: float
    retry_after_s: int
    fresh_window: float  # a new photo waits this long in the fresh queue at most, then joins the backlog
    body_timeout: float  # longest silence while a body arrives
    body_min_rate: float  # bytes per second a body must average, after body_timeout of grace
    idle_timeout: float
    shutdown_timeout: float
    logging: LogSettings
    tracing: TracingSettings

    @classmethod
    def from_env(cls, env: Env) -> GatewayConfig:
        auth_on = switch(env, "PHOTOFERRY_DEVICE_AUTH", default=True)
        secret = env.get("PHOTOFERRY_DEVICE_SECRET", "") or None
        if auth_on and not secret:
            raise ConfigError(
                "PHOTOFERRY_DEVICE_SECRET is required (or set PHOTOFERRY_DEVICE_AUTH=off, "
                "for development only, to accept uploads without device tokens)"
            )
        previous = env.get("PHOTOFERRY_DEVICE_SECRET_PREVIOUS", "") or None
        if previous is not None and previous == secret:
            raise ConfigError("PHOTOFERRY_DEVICE_SECRET_PREVIOUS is the current secret: remove it, or set the old one")
        max_image = parsed(env, "PHOTOFERRY_MAX_IMAGE_BYTES", parse_size, "16MiB")
        if max_image < 1:
            raise ConfigError("PHOTOFERRY_MAX_IMAGE_BYTES: must be at least 1 byte")
        return cls(
            port=port(env, "PHOTOFERRY_GATEWAY_PORT", 8080),
            amqp_url=required(env, "PHOTOFERRY_AMQP_URL"),
            store=StoreSettings.from_env(env),
            device_secret=secret if auth_on else None,
            device_secret_previous=previous if auth_on else None,
            device_limits=DeviceLimits.from_env(env),
            tls=tls_files(env, "PHOTOFERRY_GATEWAY_TLS_CERT", "PHOTOFERRY_GATEWAY_TLS_KEY"),
            max_image_bytes=max_image,
            max_inflight=positive_int(env, "PHOTOFERRY_GATEWAY_MAX_INFLIGHT", 64),
            # Counted as what an upload really holds (about twice its body while it is decoded): the
            # default keeps a gateway's resident memory near 300 MB whatever arrives, well inside the
            # 1 GiB its pod may use (docs/capacity.md).
            max_inflight_bytes=parsed(
                env, "PHOTOFERRY_GATEWAY_MAX_INFLIGHT_BYTES", parse_size, "192MiB"
            ),
            publish_timeout=parsed(env, "PHOTOFERRY_PUBLISH_TIMEOUT", parse_duration, "5s"),
            retry_after_s=positive_int(env, "PHOTOFERRY_RETRY_AFTER", 5),
            fresh_window=fresh_window(env),
            body_timeout=positive_duration(env, "PHOTOFERRY_BODY_TIMEOUT", "10s"),
            body_min_rate=parsed(env, "PHOTOFERRY_BODY_MIN_RATE", parse_rate, "16KiB"),
            idle_timeout=idle_timeout(env),
            shutdown_timeout=parsed(env, "PHOTOFERRY_SHUTDOWN_TIMEOUT", parse_duration, "30s"),
            logging=LogSettings.from_env(env),
            tracing=TracingSettings.from_env(env),
        )


def site_zone(env: Env) -> ZoneInfo:
    name = optional(env, "PHOTOFERRY_TIMEZONE", "UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"PHOTOFERRY_TIMEZONE: {name!r} is not an IANA time zone (e.g. Europe/Berlin)") from None


def rate_schedule(env: Env) -> RateSchedule:
    """The flat cap (PHOTOFERRY_SHIP_RATE) with the time-of-day caps (PHOTOFERRY_SHIP_SCHEDULE),
    the share of it fresh photos get (PHOTOFERRY_SHIP_FRESH_SHARE), and the ceiling of the band
    above it where only idle uplink is used (PHOTOFERRY_SHIP_CEILING); the last two per window too."""
    flat = parsed(env, "PHOTOFERRY_SHIP_RATE", parse_rate, "40Mbit")
    fresh_share = parsed(env, "PHOTOFERRY_SHIP_FRESH_SHARE", parse_fraction, "0.5")
    ceiling = band_ceiling(env, flat)
    text = optional(env, "PHOTOFERRY_SHIP_SCHEDULE", "")
    try:
        return RateSchedule.parse(text, default=flat, zone=site_zone(env), fresh_share=fresh_share, ceiling=ceiling)
    except ValueError as exc:
        raise ConfigError(f"PHOTOFERRY_SHIP_SCHEDULE: {exc}") from None


def band_ceiling(env: Env, flat: float) -> float:
    """PHOTOFERRY_SHIP_CEILING: above the flat cap, or ``off`` (0, the default: no band)."""
    text = optional(env, "PHOTOFERRY_SHIP_CEILING", "off")
    if text.lower() == "off":
        return 0.0
    try:
        ceiling = parse_rate(text)
    except ValueError as exc:
        raise ConfigError(f"PHOTOFERRY_SHIP_CEILING: {exc}") from None
    if ceiling <= flat:
        raise ConfigError(f"PHOTOFERRY_SHIP_CEILING ({text}) must be above PHOTOFERRY_SHIP_RATE "
                          f"({optional(env, 'PHOTOFERRY_SHIP_RATE', '40Mbit')}), or off")
    return ceiling


def delay_target(env: Env) -> float:
    """PHOTOFERRY_SHIP_DELAY_TARGET: the queueing delay above which the band yields (at most 1 s,
    the delay probe's own timeout)."""
    value = positive_duration(env, "PHOTOFERRY_SHIP_DELAY_TARGET", "5ms")
    if value > 1.0:
        raise ConfigError("PHOTOFERRY_SHIP_DELAY_TARGET: at most 1s (a probe waits no longer)")
    return value


@dataclass(frozen=True)
class RemoteSettings:
    """The remote S3; credentials and region come from boto3's standard AWS_* chain."""

    endpoint: str | None  # None means AWS
    bucket: str
    prefix: str
    timeout: float

    @classmethod
    def from_env(cls, env: Env) -> RemoteSettings:
        endpoint = optional_endpoint_url(env, "PHOTOFERRY_S3_ENDPOINT")
        prefix = optional(env, "PHOTOFERRY_S3_PREFIX", "")
        if prefix.startswith("/"):
            raise ConfigError("PHOTOFERRY_S3_PREFIX: an S3 key prefix does not start with '/'")
        return cls(
            endpoint=endpoint,
            bucket=required(env, "PHOTOFERRY_S3_BUCKET"),
            prefix=prefix,
            timeout=parsed(env, "PHOTOFERRY_S3_TIMEOUT", parse_duration, "30s"),
        )


@dataclass(frozen=True)
class ShipperConfig:
    port: int
    amqp_url: str
    store: StoreSettings
    remote: RemoteSettings
    schedule: RateSchedule
    delay_target: float  # queueing delay on the path above which the band above the cap yields
    fresh_window: float  # a fresh photo held past this is demoted to the backlog, not shipped as fresh
    max_concurrency: int  # the prefetch limit: uploads in flight per replica
    multipart_threshold: int
    part_size: int
    max_attempts: int
    max_image_bytes: int
    consumer_timeout: float
    idle_timeout: float
    shutdown_timeout: float
    logging: LogSettings
    tracing: TracingSettings

    @classmethod
    def from_env(cls, env: Env) -> ShipperConfig:
        part_size = parsed(env, "PHOTOFERRY_SHIP_PART_SIZE", parse_size, "8MiB")
        if part_size < 5 * 2**20:
            raise ConfigError("PHOTOFERRY_SHIP_PART_SIZE: S3 parts are at least 5MiB")
        return cls(
            port=port(env, "PHOTOFERRY_SHIPPER_PORT", 8082),
            amqp_url=required(env, "PHOTOFERRY_AMQP_URL"),
            store=StoreSettings.from_env(env),
            remote=RemoteSettings.from_env(env),
            schedule=rate_schedule(env),
            delay_target=delay_target(env),
            fresh_window=fresh_window(env),
            max_concurrency=positive_int(env, "PHOTOFERRY_SHIP_PREFETCH", 8),
            multipart_threshold=parsed(env, "PHOTOFERRY_SHIP_MULTIPART_THRESHOLD", parse_size, "8MiB"),
            part_size=part_size,
            max_attempts=positive_int(env, "PHOTOFERRY_SHIP_MAX_ATTEMPTS", 8),
            max_image_bytes=parsed(env, "PHOTOFERRY_MAX_IMAGE_BYTES", parse_size, "16MiB"),
            # Must match the broker's consumer_timeout (rabbitmq/rabbitmq.conf).
            consumer_timeout=parsed(env, "PHOTOFERRY_CONSUMER_TIMEOUT", parse_duration, "30m"),
            idle_timeout=idle_timeout(env),
            shutdown_timeout=parsed(env, "PHOTOFERRY_SHUTDOWN_TIMEOUT", parse_duration, "30s"),
            logging=LogSettings.from_env(env),
            tracing=TracingSettings.from_env(env),
        )


@dataclass(frozen=True)
class StoreKeeperConfig:
    port: int
    amqp_url: str
    store: StoreSettings
    admin_token: str
    admin_token_previous: str | None  # accepted alongside the current one while operators move over
    reconcile_every: float
    retain: float  # shipped local copies are kept this long after they were stored
    capacity: int
    store_metrics_url: str | None  # MinIO's cluster metrics, for the disk's own figures
    store_metrics_token: str | None
    high_watermark: float
    low_watermark: float
    silent_after: float
    schedule: RateSchedule  # for the ETA to drain
    fresh_window: float
    idle_timeout: float
    shutdown_timeout: float
    logging: LogSettings
    tracing: TracingSettings

    @classmethod
    def from_env(cls, env: Env) -> StoreKeeperConfig:
        token = required(env, "PHOTOFERRY_ADMIN_TOKEN")
        previous_token = env.get("PHOTOFERRY_ADMIN_TOKEN_PREVIOUS", "").strip() or None
        if previous_token == token:
            raise ConfigError("PHOTOFERRY_ADMIN_TOKEN_PREVIOUS is the current token: remove it, or set the old one")
        high = parsed(env, "PHOTOFERRY_STORE_HIGH_WATERMARK", parse_fraction, "0.9")
        low = parsed(env, "PHOTOFERRY_STORE_LOW_WATERMARK", parse_fraction, "0.8")
        if not 0 < low < high <= 1:
            raise ConfigError(
                f"PHOTOFERRY_STORE_LOW_WATERMARK ({low}) must be above 0 and below "
                f"PHOTOFERRY_STORE_HIGH_WATERMARK ({high}), which is at most 1"
            )
        capacity = parsed(env, "PHOTOFERRY_STORE_CAPACITY", parse_size, "1TB")
        if capacity < 1:
            raise ConfigError("PHOTOFERRY_STORE_CAPACITY: must be above zero")
        reconcile_every = parsed(env, "PHOTOFERRY_RECONCILE_EVERY", parse_duration, "1m")
        if reconcile_every <= 0:
            raise ConfigError("PHOTOFERRY_RECONCILE_EVERY: must be above zero")
        return cls(
            port=port(env, "PHOTOFERRY_STORE_PORT", 8081),
            amqp_url=required(env, "PHOTOFERRY_AMQP_URL"),
            store=StoreSettings.from_env(env),
            admin_token=token,
            admin_token_previous=previous_token,
            reconcile_every=reconcile_every,
            retain=parsed(env, "PHOTOFERRY_RETAIN", parse_duration, "7d"),
            capacity=capacity,
            store_metrics_url=optional_endpoint_url(env, "PHOTOFERRY_STORE_METRICS_URL"),
            store_metrics_token=env.get("PHOTOFERRY_STORE_METRICS_TOKEN", "").strip() or None,
            high_watermark=high,
            low_watermark=low,
            silent_after=parsed(env, "PHOTOFERRY_SILENT_AFTER", parse_duration, "10m"),
            schedule=rate_schedule(env),
            fresh_window=fresh_window(env),
            idle_timeout=idle_timeout(env),
            shutdown_timeout=parsed(env, "PHOTOFERRY_SHUTDOWN_TIMEOUT", parse_duration, "30s"),
            logging=LogSettings.from_env(env),
            tracing=TracingSettings.from_env(env),
        )


@dataclass(frozen=True)
class CliConfig:
    """What the ``photoferry`` command needs; each subcommand checks what it uses."""

    device_secret: str | None
    store_url: str  # the store keeper's operator API
    admin_token: str | None
    gateway_url: str  # where ``photoferry fleet`` sends
    gateway_ca_file: str | None  # the CA that signed the gateway's certificate, for https:// gateways
    remote_endpoint: str | None  # the remote S3 that ``photoferry fleet --verify`` checks (None: AWS)
    remote_bucket: str | None
    remote_prefix: str

    @classmethod
    def from_env(cls, env: Env) -> CliConfig:
        return cls(
            device_secret=env.get("PHOTOFERRY_DEVICE_SECRET") or None,
            store_url=optional(env, "PHOTOFERRY_STORE_URL", "http://127.0.0.1:8081").rstrip("/"),
            admin_token=env.get("PHOTOFERRY_ADMIN_TOKEN") or None,
            gateway_url=optional(env, "PHOTOFERRY_GATEWAY_URL", "http://127.0.0.1:8080").rstrip("/"),
            gateway_ca_file=env.get("PHOTOFERRY_GATEWAY_CA_FILE", "").strip() or None,
            remote_endpoint=optional_endpoint_url(env, "PHOTOFERRY_S3_ENDPOINT"),
            remote_bucket=env.get("PHOTOFERRY_S3_BUCKET", "").strip() or None,
            remote_prefix=optional(env, "PHOTOFERRY_S3_PREFIX", ""),
        )
