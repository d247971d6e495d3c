"""The k3s manifests, rendered with kustomize and validated offline: both variants, the examples,
hardening, pinned images, the broker's settings on a read-only root, high availability as the
quorums count it, what an apply cannot change, and who the network policies and k3s's own load
balancer and Traefik let talk to whom."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devtools.manifests import (
    K3S,
    K3S_README,
    REPO,
    Document,
    container_ports,
    named,
    render,
    selects,
    workloads,
)

KUBERNETES = "1.31.0"  # k3s stable at the time of writing; schemas cover 1.25 to 1.37
OURS = ("gateway", "store", "shipper")
FOLDERS = ("variants/site", "variants/ha", "examples/site", "examples/site-seaweedfs", "examples/ha")
CUSTOM_KINDS = {"PrometheusRule", "ServiceMonitor", "HelmChartConfig"}  # not in the core schemas
RABBITMQ_CONF = REPO / "rabbitmq" / "rabbitmq.conf"


@pytest.fixture(scope="module", params=FOLDERS)
def documents(request: pytest.FixtureRequest) -> list[Document]:
    return render(request.param)


def container(workload: Document, name: str | None = None) -> dict[str, Any]:
    found = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in found if name is None or c["name"] == name)


def test_every_document_is_valid_for_kubernetes(documents: list[Document]) -> None:
    for doc in documents:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_every_component_runs_with_probes_limits_and_least_privilege(documents: list[Document]) -> None:
    found = workloads(documents)
    store = "seaweedfs" if "seaweedfs" in found else "minio"
    assert set(found) == {*OURS, "rabbitmq", store, "jaeger"}
    accounts = named(documents, "ServiceAccount")
    for name, workload in found.items():
        pod = workload["spec"]["template"]
        assert pod["metadata"]["labels"]["app"] == name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["serviceAccountName"] == name
        for each in pod["spec"]["containers"]:
            assert each["readinessProbe"] and each["livenessProbe"], name
            assert each["resources"]["requests"] and each["resources"]["limits"], name
            security = each["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"], name
    # Only the clustered broker talks to the Kubernetes API, and may only read Endpoints.
    with_token = {name for name, account in accounts.items() if account.get("automountServiceAccountToken", True)}
    roles = named(documents, "Role")
    if roles:
        assert with_token == {"rabbitmq"}
        assert [rule for role in roles.values() for rule in role["rules"]] == [
            {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get"]}]
        binding = next(iter(named(documents, "RoleBinding").values()))
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rabbitmq", "namespace": "photoferry"}]
    else:
        assert with_token == set()


def test_every_image_is_pinned_and_ours_comes_from_the_site(documents: list[Document]) -> None:
    for name, workload in workloads(documents).items():
        for each in workload["spec"]["template"]["spec"]["containers"]:
            image = each["image"]
            if name in OURS:
                assert image == "registry.local/photoferry:0.1.0", image
            else:
                assert re.fullmatch(r"[a-z0-9.\-/]+:[\w.\-]+@sha256:[0-9a-f]{64}", image), f"{name}: {image}"


def test_services_get_the_variables_they_read_and_only_their_secrets(documents: list[Document]) -> None:
    config_source = (REPO / "services" / "common" / "config.py").read_text()
    configmap = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
        "photoferry-config"))
    names = set(configmap["data"])
    secrets_by_service: dict[str, set[str]] = {}
    for name in OURS:
        each = container(workloads(documents)[name])
        assert each["command"] == ["python", "-m", f"services.{name}"]
        env = {e["name"]: e for e in each["env"]}
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


def test_the_local_store_is_one_service_whatever_server_is_behind_it(documents: list[Document]) -> None:
    service = named(documents, "Service")["local-store"]
    backends = [w for w in workloads(documents).values()
                if w["spec"]["template"]["metadata"]["labels"].get("photoferry.io/role") == "local-store"]
    assert len(backends) == 1 and service["spec"]["selector"] == {"photoferry.io/role": "local-store"}
    assert "s3" in container_ports(backends[0]) and service["spec"]["ports"][0]["targetPort"] == "s3"


def test_the_gateways_stay_behind_their_service_while_a_dependency_is_down(documents: list[Document]) -> None:
    # The device contract answers a broker or store outage with 503 + Retry-After: a gateway
    # whose readiness followed /readyz would leave the Service with no endpoint instead.
    for name in ("gateway", "store"):
        probe = container(workloads(documents)[name])["readinessProbe"]
        assert probe["httpGet"]["path"] == "/healthz", name


# -- the broker ----------------------------------------------------------------------------------

def broker_settings() -> dict[str, str]:
    settings = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_the_broker_logs_nowhere_a_read_only_root_refuses() -> None:
    # A file output makes a node on a read-only root stop at boot ({cannot_log_to_file, ..., erofs});
    # RabbitMQ turns it on for any log.file.* setting, even with the console on.
    settings = broker_settings()
    assert settings.get("log.file") == "false"
    assert [key for key in settings if key.startswith("log.file.")] == []
    assert settings.get("log.console") == "true"


def test_the_broker_gets_the_repositorys_settings_and_no_start_hook(documents: list[Document]) -> None:
    configmap = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
        "rabbitmq-config"))
    assert configmap["data"]["rabbitmq.conf"] == RABBITMQ_CONF.read_text()
    assert json.loads(configmap["data"]["definitions.json"]) == json.loads(
        (REPO / "rabbitmq" / "definitions.json").read_text())
    # The generated name carries a content hash, so pods roll when the settings change.
    assert re.fullmatch(r"rabbitmq-config-[a-z0-9]{10}", configmap["metadata"]["name"])
    broker = workloads(documents)["rabbitmq"]
    mounts = {m["mountPath"]: m for m in container(broker)["volumeMounts"]}
    assert mounts["/etc/rabbitmq/conf.d/10-photoferry.conf"]["subPath"] == "rabbitmq.conf"
    # postStart runs while the node boots (a failed hook kills the container) and holds back the
    # pod's IP, which peer discovery needs: the services declare the topology themselves.
    assert "postStart" not in container(broker).get("lifecycle", {})
    assert "/var/log/rabbitmq" not in mounts, "the log directory stays read-only, as the image runs it"


def test_the_shutdown_grace_covers_the_services_own_drain(documents: list[Document]) -> None:
    for name in OURS:
        grace = workloads(documents)[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > 30, f"{name}: the pod must outlive PHOTOFERRY_SHUTDOWN_TIMEOUT (30 s)"


def test_the_night_rate_component_sets_a_schedule_the_services_accept() -> None:
    from services.common.config import rate_schedule

    configmap = next(d for d in render("examples/site") if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("photoferry-config"))
    schedule = rate_schedule(configmap["data"])
    assert schedule.windows and schedule.zone.key == "Europe/Berlin"


def test_seaweedfs_serves_every_port_it_declares() -> None:
    seaweedfs = workloads(render("examples/site-seaweedfs"))["seaweedfs"]
    each = container(seaweedfs)
    command = " ".join([*each.get("command", []), *each.get("args", [])])
    for port in each["ports"]:
        assert re.search(rf"-[\w.]*[pP]ort={port['containerPort']}\b", command), \
            f"port {port['name']} ({port['containerPort']}) is declared but weed server is not told to serve it"


# -- high availability ---------------------------------------------------------------------------

NODES = 3  # the smallest site the ha variant is for


def minio_default_parity(drives: int) -> int:
    """MinIO's default parity for an erasure set (internal/config/storageclass: DefaultParityBlocks)."""
    return {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}.get(drives, 4)


def most_pods_on_one_node(workload: Document, nodes: int) -> int:
    """The most pods of a workload one node can end up with: one when anti-affinity is required."""
    anti = workload["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    required = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    if any(term["topologyKey"] == "kubernetes.io/hostname" and selects(
            term["labelSelector"], workload["spec"]["template"]["metadata"]["labels"]) for term in required):
        assert workload["spec"]["replicas"] <= nodes, "more pods than nodes: some would never be scheduled"
        return 1
    return math.ceil(workload["spec"]["replicas"] / nodes)


def test_the_ha_store_keeps_its_write_quorum_without_any_one_node() -> None:
    documents = render("variants/ha")
    minio = workloads(documents)["minio"]
    args = " ".join(container(minio)["args"])
    match = re.search(r"http://minio-\{0\.\.\.(\d+)\}\.minio-nodes\.photoferry\.svc\.cluster\.local/data(\{0\.\.\.(\d+)\})?",
                      args)
    assert match, args
    pods = int(match.group(1)) + 1
    per_pod = int(match.group(3)) + 1 if match.group(3) else 1
    assert pods == minio["spec"]["replicas"]
    assert len(minio["spec"]["volumeClaimTemplates"]) == per_pod
    assert "MINIO_STORAGE_CLASS_STANDARD" not in {e["name"] for e in container(minio)["env"]}
    drives = pods * per_pod
    parity = minio_default_parity(drives)
    data = drives - parity
    write_quorum = data + 1 if data == parity else data
    left = drives - most_pods_on_one_node(minio, NODES) * per_pod
    assert left >= write_quorum and left >= data, (
        f"{drives} drives (EC:{parity}) lose {drives - left} with one node: {left} left, {write_quorum} to write")
    budget = next(b for b in named(documents, "PodDisruptionBudget").values()
                  if b["spec"]["selector"]["matchLabels"]["app"] == "minio")
    # Draining a node evicts its pods one budget step at a time; a pod pinned to the node by its
    # volume never becomes ready elsewhere, so a node holding more than the budget never drains.
    assert most_pods_on_one_node(minio, NODES) <= budget["spec"]["maxUnavailable"]


def test_the_ha_broker_keeps_its_quorum_and_its_queues_on_three_nodes() -> None:
    documents = render("variants/ha")
    found = workloads(documents)
    rabbit = found["rabbitmq"]
    assert rabbit["spec"]["replicas"] >= 3 and rabbit["spec"]["podManagementPolicy"] == "Parallel"
    replicas = rabbit["spec"]["replicas"]
    assert replicas - most_pods_on_one_node(rabbit, NODES) > replicas // 2, "a node's loss takes the majority"
    nodes = named(documents, "Service")[rabbit["spec"]["serviceName"]]
    assert nodes["spec"]["clusterIP"] == "None" and nodes["spec"]["publishNotReadyAddresses"] is True
    cluster = next(d for d in documents if d["metadata"]["name"].startswith("rabbitmq-cluster-"))
    conf = cluster["data"]["20-cluster.conf"]
    assert "peer_discovery_backend = rabbit_peer_discovery_k8s" in conf
    assert f"service_name = {rabbit['spec']['serviceName']}" in conf
    # Queues declared before the other nodes joined would keep one member without this.
    assert "quorum_queue.continuous_membership_reconciliation.enabled = true" in conf
    assert f"quorum_queue.continuous_membership_reconciliation.target_group_size = {replicas}" in conf
    assert "rabbitmq_peer_discovery_k8s" in cluster["data"]["enabled_plugins"]
    env = {e["name"]: e for e in container(rabbit)["env"]}
    assert "RABBITMQ_ERLANG_COOKIE" in env and env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    # A restart waits until every quorum queue keeps a majority without this node.
    pre_stop = " ".join(container(rabbit)["lifecycle"]["preStop"]["exec"]["command"])
    wait = int(re.search(r"await_online_quorum_plus_one -t (\d+)", pre_stop).group(1))
    assert rabbit["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > wait
    assert found["shipper"]["spec"]["replicas"] > 1
    assert "replicas" not in found["gateway"]["spec"]  # the autoscaler owns it
    autoscaler = named(documents, "HorizontalPodAutoscaler")["gateway"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "gateway" and autoscaler["spec"]["minReplicas"] >= 2
    budgets = {b["spec"]["selector"]["matchLabels"]["app"]: b["spec"] for b in named(
        documents, "PodDisruptionBudget").values()}
    assert budgets["rabbitmq"]["maxUnavailable"] == 1 and budgets["minio"]["maxUnavailable"] == 1
    assert budgets["gateway"]["minAvailable"] == 1


# Kubernetes lets an apply change only these fields of a StatefulSet's spec (apps/validation).
STATEFULSET_MUTABLE = {"replicas", "ordinals", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy",
                       "minReadySeconds"}


def test_what_an_apply_cannot_change_in_a_statefulset_is_documented() -> None:
    site, ha = workloads(render("variants/site")), workloads(render("variants/ha"))
    readme = K3S_README.read_text()
    section = readme[readme.index("## What an apply cannot change"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    for name in sorted(set(site) & set(ha)):
        if site[name]["kind"] != "StatefulSet":
            continue
        differing = {key for key in set(site[name]["spec"]) | set(ha[name]["spec"])
                     if key not in STATEFULSET_MUTABLE and site[name]["spec"].get(key) != ha[name]["spec"].get(key)}
        assert differing, f"{name}: nothing immutable differs between the variants; the README need not say how"
        assert f"delete statefulset {name}" in section or re.search(rf"delete statefulset [\w ]*\b{name}\b", section), \
            f"{name}: {sorted(differing)} differ between site and ha; the README must say how to move"
    # Volumes: each claim template's size is immutable, so a resize keeps the pods and swaps the set.
    assert "--cascade=orphan" in section and "volumeClaimTemplates" in section
    assert "local-path" in section, "on k3s's default storage a volume's size is neither enforced nor resizable"


# -- who reaches whom ----------------------------------------------------------------------------

OUTSIDE = "203.0.113.7"  # a device, an operator's laptop elsewhere, or S3: outside the cluster
OPERATOR = "192.168.10.20"  # on the operators' network of the cluster folder's Traefik allow-list
POD_NETWORK = ipaddress.ip_network("10.42.0.0/16")  # k3s's pod addresses
# Pods k3s itself runs that forward LAN traffic into the cluster (kube-system).
TRAEFIK = "traefik"
SVCLB = "svclb-"  # + the Service's name: k3s's ServiceLB, one per LoadBalancer Service
SYSTEM = "kube-system"


def traefik_source_ranges() -> list[str]:
    config = named(render("cluster"), "HelmChartConfig")["traefik"]
    values = yaml.safe_load(config["spec"]["valuesContent"])
    return values["service"].get("loadBalancerSourceRanges", ["0.0.0.0/0"])


class Network:
    """Who may open a TCP connection to whom on k3s: NetworkPolicies, ServiceLB and Traefik.

    A LAN address never reaches a pod directly: it enters through a LoadBalancer Service
    (k3s's svclb pod checks the Service's source ranges, then forwards from its own pod
    address) or through the Ingress (Traefik, itself behind ServiceLB, forwards from its pod).
    """

    def __init__(self, documents: list[Document]) -> None:
        self.documents = documents
        self.policies = [d["spec"] for d in documents if d["kind"] == "NetworkPolicy"]
        self.services = named(documents, "Service")
        self.pods: dict[str, tuple[str, dict[str, str], dict[str, int]]] = {}
        for name, workload in workloads(documents).items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            self.pods[name] = ("photoferry", labels, container_ports(workload))
        self.pods[TRAEFIK] = (SYSTEM, {"app.kubernetes.io/name": "traefik"}, {"web": 8000})
        for name, service in self.services.items():
            if service["spec"].get("type") == "LoadBalancer":
                self.pods[SVCLB + name] = (SYSTEM, {"svccontroller.k3s.cattle.io/svcname": name}, {})

    def from_lan(self, address: str, target: str, port: str) -> bool:
        """Whether a LAN address reaches ``target``'s named port by any way k3s offers."""
        client = ipaddress.ip_address(address)
        for name, service in self.services.items():
            if service["spec"].get("type") != "LoadBalancer" or not self._routes(service, target, port):
                continue
            ranges = service["spec"].get("loadBalancerSourceRanges", ["0.0.0.0/0"])
            if any(client in ipaddress.ip_network(r) for r in ranges) and self.allowed(SVCLB + name, target, port):
                return True
        for ingress in named(self.documents, "Ingress").values():
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    service = self.services[backend["name"]]
                    if not self._routes(service, target, port, backend["port"].get("name")):
                        continue
                    if any(client in ipaddress.ip_network(r) for r in traefik_source_ranges()) and self.allowed(
                            TRAEFIK, target, port):
                        return True
        return False

    def _routes(self, service: Document, target: str, port: str, service_port: str | None = None) -> bool:
        _, labels, _ = self.pods[target]
        if not selects({"matchLabels": service["spec"]["selector"]}, labels):
            return False
        return any(p.get("targetPort") == port and (service_port is None or p["name"] == service_port)
                   for p in service["spec"]["ports"])

    def allowed(self, source: str, target: str, port: str | int) -> bool:
        """``source``/``target``: a pod (workload) name, an outside address, or ``monitoring`` (a namespace)."""
        number = self._number(target, port)
        return self._egress(source, target, number) and self._ingress(source, target, number)

    def _number(self, target: str, port: str | int) -> int:
        if isinstance(port, int):
            return port
        return self.pods[target][2][port]

    def _ingress(self, source: str, target: str, number: int) -> bool:
        if target not in self.pods:
            return True  # outside the cluster: not ours to police
        return self._permits(target, "Ingress", "from", source, number)

    def _egress(self, source: str, target: str, number: int) -> bool:
        if source not in self.pods or self.pods[source][0] == SYSTEM:
            return True  # k3s's own pods have no policies of ours
        return self._permits(source, "Egress", "to", target, number)

    def _permits(self, subject: str, direction: str, side: str, peer: str, number: int) -> bool:
        _, labels, ports = self.pods[subject]
        applying = [p for p in self.policies if direction in p["policyTypes"] and selects(p["podSelector"], labels)]
        if not applying:
            return True
        for rule in (r for p in applying for r in p.get(direction.lower(), [])):
            named_ports = ports if side == "from" else self.pods.get(peer, ("", {}, {}))[2]
            if not self._port_matches(rule.get("ports"), number, named_ports):
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
            address = POD_NETWORK[5] if peer in self.pods else ipaddress.ip_address(
                OUTSIDE if peer == "monitoring" else peer)
            block = rule["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(e) for e in block.get("except", []))
        namespace = "monitoring" if peer == "monitoring" else self.pods[peer][0] if peer in self.pods else None
        if "namespaceSelector" in rule:
            if namespace is None or not selects(rule["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
                return False
            return "podSelector" not in rule or (peer in self.pods and selects(rule["podSelector"], self.pods[peer][1]))
        return namespace == "photoferry" and selects(rule["podSelector"], self.pods[peer][1])


@pytest.mark.parametrize("folder", ["variants/site", "variants/ha", "examples/site-seaweedfs"])
def test_network_policies_let_each_part_reach_only_what_it_needs(folder: str) -> None:
    net = Network(render(folder))
    store = "seaweedfs" if "seaweedfs" in net.pods else "minio"
    # Devices reach the gateway through its load balancer, and nothing else.
    assert net.from_lan(OUTSIDE, "gateway", "http")
    for target, port in (("rabbitmq", "amqp"), (store, "s3"), ("jaeger", "ui"), ("shipper", "http")):
        assert not net.from_lan(OUTSIDE, target, port), target
    # The operator page through Traefik, from the operators' network only.
    assert net.from_lan(OPERATOR, "store", "http") and not net.from_lan(OUTSIDE, "store", "http")
    # photoferry's services reach the broker, the store and Jaeger; nothing else reaches the first two.
    for service in OURS:
        assert net.allowed(service, "rabbitmq", "amqp") and net.allowed(service, store, "s3")
        assert net.allowed(service, "jaeger", "otlp-http")
    assert not net.allowed("jaeger", "rabbitmq", "amqp") and not net.allowed("jaeger", store, "s3")
    assert not net.allowed(TRAEFIK, "rabbitmq", "amqp") and not net.allowed(TRAEFIK, store, "s3")
    # Only the shipper leaves the site, and only to HTTPS.
    assert net.allowed("shipper", OUTSIDE, 443)
    assert not net.allowed("shipper", OUTSIDE, 80)
    for other in ("gateway", "store", "jaeger", store):
        assert not net.allowed(other, OUTSIDE, 443), other
    # Prometheus (in "monitoring") scrapes every service.
    for service in OURS:
        assert net.allowed("monitoring", service, "http")
    assert net.allowed("monitoring", "rabbitmq", "metrics")


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_policy_waits_for_a_lan_address_k3s_never_delivers(folder: str) -> None:
    # Behind ServiceLB (and Traefik) a pod sees a pod address, never the client's: an ipBlock "from"
    # of LAN addresses can never match, and the rule it was meant to be is silently absent.
    for policy in named(render(folder), "NetworkPolicy").values():
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer, f"{policy['metadata']['name']}: {peer['ipBlock']}"


def test_traefik_lets_only_the_operators_network_in() -> None:
    ranges = [ipaddress.ip_network(r) for r in traefik_source_ranges()]
    assert ipaddress.ip_address(OPERATOR) in ranges[0] and not any(ipaddress.ip_address(OUTSIDE) in r for r in ranges)


def test_the_clustered_broker_and_store_reach_their_peers() -> None:
    net = Network(render("variants/ha"))
    assert net.allowed("rabbitmq", "rabbitmq", "clustering") and net.allowed("rabbitmq", "rabbitmq", "epmd")
    assert net.allowed("minio", "minio", "s3")
    assert not net.allowed("gateway", "rabbitmq", "clustering")


def test_the_docs_name_the_folders_they_describe() -> None:
    readme = K3S_README.read_text()
    for folder in (*FOLDERS, "cluster", "components/prometheus-operator"):
        assert (K3S / folder).is_dir() and folder.split("/")[-1] in readme, folder
    assert Path(K3S / "cluster" / "traefik-config.yaml").exists()
