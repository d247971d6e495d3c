"""schemathesis against the gateway's own /openapi.json: no server errors, answers as documented."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from devtools.servers import ServiceProcess
from services.common.photos import DEVICE_ID_PATTERN
from services.gateway.app import load_openapi
from tests.helpers import auth

pytestmark = pytest.mark.servers


def _packable(value: Any) -> Any:
    """What msgpack can encode: generated binary values as bytes, integers past 64 bits as text
    (no device can send those in msgpack; as text they stay just as wrong for the schema)."""
    value = getattr(value, "data", value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, dict):
        return {_packable(k): _packable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_packable(v) for v in value]
    return value


@schemathesis.serializer("application/msgpack")
def msgpack_serializer(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    return msgpack.packb(_packable(value), use_bin_type=True)


# The document the gateway serves at /openapi.json (test_gateway_api checks it is served).
schema = schemathesis.openapi.from_dict(orjson.loads(load_openapi()))


@schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_gateway_answers_as_its_spec_says(case: schemathesis.Case, gateway: ServiceProcess) -> None:
    # A device signs with its own id, so bodies that name a valid device get its token:
    # the generated data then reaches the checks behind authentication.
    device = "cam-001"
    if isinstance(case.body, dict) and isinstance(case.body.get("device_id"), str):
        if DEVICE_ID_PATTERN.fullmatch(case.body["device_id"]):
            device = case.body["device_id"]
    # Positive-data acceptance is not checked: the spec cannot say that an image must
    # start with JPEG, PNG or WebP magic bytes, so schema-valid random bytes rightly get 415.
    case.call_and_validate(base_url=gateway.url, headers=auth(device),
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
