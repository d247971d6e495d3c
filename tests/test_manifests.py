"""The k3s manifests, rendered and validated offline against the Kubernetes schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = "1.31.0"  # k3s stable at the time of writing; schemas cover 1.25 to 1.37
OURS = ("gateway", "store", "shipper")

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (with kustomize 5) renders the manifests; the machine image has it, Debian's is too old",
)


def render(folder: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy" / "k3s" / folder)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=["base", "site-example"])
def documents(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_every_document_is_valid_for_kubernetes(documents: list[dict[str, Any]]) -> None:
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def workloads(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet")}


def test_every_component_runs_with_probes_limits_and_least_privilege(documents: list[dict[str, Any]]) -> None:
    found = workloads(documents)
    assert set(found) == {*OURS, "rabbitmq", "minio", "jaeger"}
    accounts = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ServiceAccount"}
    for name, workload in found.items():
        pod = workload["spec"]["template"]
        assert pod["metadata"]["labels"]["app"] == name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        # Its own account, which holds no API token: nothing here talks to Kubernetes.
        assert accounts[pod["spec"]["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert pod["spec"]["serviceAccountName"] == name
        for container in pod["spec"]["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"], name


def test_services_get_the_variables_they_read_and_only_their_secrets(documents: list[dict[str, Any]]) -> None:
    config_source = (REPO / "services" / "common" / "config.py").read_text()
    configmap = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
        "photoferry-config"))
    names = set(configmap["data"])
    secrets_by_service: dict[str, set[str]] = {}
    for name in OURS:
        container = workloads(documents)[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{name}"]
        env = {e["name"]: e for e in container["env"]}
        names |= set(env)
        secrets_by_service[name] = {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values() if "valueFrom" in e}
    for variable in names:
        if variable.startswith("PHOTOFERRY_"):
            assert f'"{variable}"' in config_source, f"{variable} is set in the manifests but read nowhere"
    assert "PHOTOFERRY_DEVICE_SECRET" in secrets_by_service["gateway"]
    assert "PHOTOFERRY_ADMIN_TOKEN" in secrets_by_service["store"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets_by_service["shipper"]
    assert "AWS_SECRET_ACCESS_KEY" not in secrets_by_service["gateway"] | secrets_by_service["store"]
    assert "PHOTOFERRY_DEVICE_SECRET" not in secrets_by_service["shipper"] | secrets_by_service["store"]


def test_the_broker_gets_the_repositorys_definitions_and_settings(documents: list[dict[str, Any]]) -> None:
    configmap = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
        "rabbitmq-config"))
    assert json.loads(configmap["data"]["definitions.json"]) == json.loads(
        (REPO / "rabbitmq" / "definitions.json").read_text())
    assert configmap["data"]["rabbitmq.conf"] == (REPO / "rabbitmq" / "rabbitmq.conf").read_text()
    # The generated name carries a content hash, so pods roll when the settings change.
    assert re.fullmatch(r"rabbitmq-config-[a-z0-9]{10}", configmap["metadata"]["name"])


def test_the_shutdown_grace_covers_the_services_own_drain(documents: list[dict[str, Any]]) -> None:
    for name in OURS:
        grace = workloads(documents)[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > 30, f"{name}: the pod must outlive PHOTOFERRY_SHUTDOWN_TIMEOUT (30 s)"


def test_the_night_rate_component_sets_a_schedule_the_services_accept() -> None:
    from services.common.config import rate_schedule

    configmap = next(d for d in render("site-example") if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("photoferry-config"))
    schedule = rate_schedule(configmap["data"])
    assert schedule.windows and schedule.zone.key == "Europe/Berlin"
