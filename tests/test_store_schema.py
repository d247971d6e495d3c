"""schemathesis against the store keeper's own /openapi.json, with the operator token: no server
errors, every answer as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from devtools.servers import ServiceProcess
from services.store.api import load_openapi
from tests.conftest import start_service, stop_cleanly
from tests.helpers import ADMIN_TOKEN, Site

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def keeper(site: Site, logs: Path) -> Iterator[ServiceProcess]:
    service = start_service("store", site.env(), logs)
    yield service
    stop_cleanly(service)


def test_the_keeper_serves_its_spec(keeper: ServiceProcess) -> None:
    served = requests.get(f"{keeper.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == orjson.loads(load_openapi())
    assert {"/api/status", "/api/shipping/rate", "/api/devices/denied/{device_id}"} <= set(served.json()["paths"])


schema = schemathesis.openapi.from_dict(orjson.loads(load_openapi()))


@schema.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_the_operator_api_answers_as_its_spec_says(case: schemathesis.Case, keeper: ServiceProcess) -> None:
    # Positive-data acceptance is not checked: the spec cannot say that a rate's unit must be one
    # the keeper knows, or that a pause's end must lie in the future, so such bodies rightly get 400.
    case.call_and_validate(base_url=keeper.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
