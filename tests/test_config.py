"""Configuration is read once, refuses what is missing or malformed, and names the variable."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, GatewayConfig, RemoteSettings, ShipperConfig, StoreKeeperConfig

BASE = {
    "PHOTOFERRY_AMQP_URL": "amqp://u:p@broker/",
    "PHOTOFERRY_STORE_ENDPOINT": "http://minio:9000",
    "PHOTOFERRY_STORE_ACCESS_KEY": "a",
    "PHOTOFERRY_STORE_SECRET_KEY": "b",
    "PHOTOFERRY_DEVICE_SECRET": "s3cret",
}


def test_defaults() -> None:
    config = GatewayConfig.from_env(BASE)
    assert config.port == 8080
    assert config.max_image_bytes == 16 * 2**20
    assert config.store.bucket == "photoferry"
    assert config.device_secret == "s3cret"


def test_gateway_refuses_to_start_without_a_device_secret() -> None:
    env = {k: v for k, v in BASE.items() if k != "PHOTOFERRY_DEVICE_SECRET"}
    with pytest.raises(ConfigError, match="PHOTOFERRY_DEVICE_SECRET"):
        GatewayConfig.from_env(env)
    assert GatewayConfig.from_env({**env, "PHOTOFERRY_DEVICE_AUTH": "off"}).device_secret is None


@pytest.mark.parametrize(
    ("name", "value"),
    [("PHOTOFERRY_MAX_IMAGE_BYTES", "lots"), ("PHOTOFERRY_GATEWAY_PORT", "70000"),
     ("PHOTOFERRY_STORE_ENDPOINT", "minio:9000"), ("PHOTOFERRY_GATEWAY_MAX_INFLIGHT", "0"),
     ("PHOTOFERRY_DEVICE_AUTH", "maybe"), ("PHOTOFERRY_PUBLISH_TIMEOUT", "soon"),
     ("PHOTOFERRY_LOG_LEVEL", "chatty"), ("PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE", "0"),
     ("PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE", "inf"), ("PHOTOFERRY_DEVICE_BURST", "0"),
     ("PHOTOFERRY_DEVICE_MAX_INFLIGHT", "some"), ("PHOTOFERRY_DEVICE_SECRET_PREVIOUS", "s3cret"),
     ("PHOTOFERRY_GATEWAY_TLS_CERT", "/etc/tls/gateway.pem")],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        GatewayConfig.from_env({**BASE, name: value})


@pytest.mark.parametrize("name", ["PHOTOFERRY_AMQP_URL", "PHOTOFERRY_STORE_ENDPOINT", "PHOTOFERRY_STORE_ACCESS_KEY"])
def test_missing_connection_settings_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        GatewayConfig.from_env({k: v for k, v in BASE.items() if k != name})


def test_an_optional_endpoint_is_none_when_unset_and_a_url_when_set() -> None:
    keeper_env = {**BASE, "PHOTOFERRY_ADMIN_TOKEN": "t"}
    assert StoreKeeperConfig.from_env(keeper_env).store_metrics_url is None
    url = "http://minio:9000/minio/v2/metrics/cluster"
    assert StoreKeeperConfig.from_env({**keeper_env, "PHOTOFERRY_STORE_METRICS_URL": url}).store_metrics_url == url
    with pytest.raises(ConfigError, match="PHOTOFERRY_STORE_METRICS_URL"):
        StoreKeeperConfig.from_env({**keeper_env, "PHOTOFERRY_STORE_METRICS_URL": "minio:9000"})
    assert RemoteSettings.from_env({"PHOTOFERRY_S3_BUCKET": "b"}).endpoint is None
    with pytest.raises(ConfigError, match="PHOTOFERRY_S3_ENDPOINT"):
        RemoteSettings.from_env({"PHOTOFERRY_S3_BUCKET": "b", "PHOTOFERRY_S3_ENDPOINT": "s3.local"})


def test_secrets_and_tls_settings() -> None:
    config = GatewayConfig.from_env({**BASE, "PHOTOFERRY_DEVICE_SECRET_PREVIOUS": "old",
                                     "PHOTOFERRY_GATEWAY_TLS_CERT": "/tls/c.pem",
                                     "PHOTOFERRY_GATEWAY_TLS_KEY": "/tls/k"})
    assert config.device_secret_previous == "old"
    assert config.tls is not None and (config.tls.cert, config.tls.key) == ("/tls/c.pem", "/tls/k")
    assert GatewayConfig.from_env(BASE).tls is None
    limits = GatewayConfig.from_env(BASE).device_limits
    assert (limits.photos_per_minute, limits.burst, limits.max_inflight) == (30, 60, 2)
    keeper = StoreKeeperConfig.from_env({**BASE, "PHOTOFERRY_ADMIN_TOKEN": "t", "PHOTOFERRY_ADMIN_TOKEN_PREVIOUS": "o"})
    assert keeper.admin_token_previous == "o"
    with pytest.raises(ConfigError, match="PHOTOFERRY_ADMIN_TOKEN_PREVIOUS"):
        StoreKeeperConfig.from_env({**BASE, "PHOTOFERRY_ADMIN_TOKEN": "t", "PHOTOFERRY_ADMIN_TOKEN_PREVIOUS": "t"})


SHIPPER = {**BASE, "PHOTOFERRY_S3_BUCKET": "b"}


def test_the_band_above_the_cap_is_off_unless_a_ceiling_above_the_cap_is_set() -> None:
    config = ShipperConfig.from_env(SHIPPER)
    assert config.schedule.ceiling == 0
    assert config.delay_target == 0.005
    config = ShipperConfig.from_env({**SHIPPER, "PHOTOFERRY_SHIP_RATE": "40Mbit", "PHOTOFERRY_SHIP_CEILING": "160Mbit",
                                     "PHOTOFERRY_SHIP_DELAY_TARGET": "20ms"})
    assert (config.schedule.ceiling, config.delay_target) == (20e6, 0.020)
    keeper = StoreKeeperConfig.from_env({**BASE, "PHOTOFERRY_ADMIN_TOKEN": "t", "PHOTOFERRY_SHIP_CEILING": "160Mbit"})
    assert keeper.schedule.ceiling == 20e6  # the keeper reports the band too
    assert ShipperConfig.from_env({**SHIPPER, "PHOTOFERRY_SHIP_CEILING": "off"}).schedule.ceiling == 0


@pytest.mark.parametrize(("name", "value", "words"), [
    ("PHOTOFERRY_SHIP_CEILING", "40Mbit", "must be above PHOTOFERRY_SHIP_RATE"),
    ("PHOTOFERRY_SHIP_CEILING", "1MB", "must be above PHOTOFERRY_SHIP_RATE"),
    ("PHOTOFERRY_SHIP_CEILING", "fast", "PHOTOFERRY_SHIP_CEILING"),
    ("PHOTOFERRY_SHIP_DELAY_TARGET", "0ms", "PHOTOFERRY_SHIP_DELAY_TARGET"),
    ("PHOTOFERRY_SHIP_DELAY_TARGET", "2s", "at most 1s"),
    ("PHOTOFERRY_SHIP_DELAY_TARGET", "soon", "PHOTOFERRY_SHIP_DELAY_TARGET"),
    ("PHOTOFERRY_SHIP_SCHEDULE", "08:00-18:00=40Mbit..20Mbit", "PHOTOFERRY_SHIP_SCHEDULE"),
])
def test_a_band_setting_that_cannot_work_is_refused_with_its_name(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ShipperConfig.from_env({**SHIPPER, name: value})
