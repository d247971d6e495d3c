"""Every rendered example refers only to what exists when a stock k3s applies it.

Schemas see one object at a time; a cluster sees them together. Here every name an
object uses (a namespace, a ConfigMap or Secret and its keys, a service account, a
Service's or a budget's or a policy's selector, a named port, an autoscaler's target,
an Ingress backend) must point at something the same render creates in the same
namespace, or at what the README tells operators to create by hand (the Secret), or at
what k3s itself runs (CoreDNS, Traefik). And every kind must be one a stock k3s serves,
unless the component that brings it is one a site opts into.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from devtools.manifests import (
    K3S,
    NAMESPACE,
    WORKLOAD_KINDS,
    Document,
    container_ports,
    named,
    operator_secret,
    render,
    selects,
    workloads,
)

KUBERNETES = "1.31.0"  # k3s stable at the time of writing
EXAMPLES = sorted(str(p.relative_to(K3S)) for p in (K3S / "examples").iterdir() if p.is_dir())
VARIANTS = ("variants/site", "variants/ha")
# Components a site must choose on purpose, and the kinds only they bring.
OPT_IN = {"components/prometheus-operator": {("monitoring.coreos.com", "ServiceMonitor"),
                                             ("monitoring.coreos.com", "PrometheusRule")}}
# Custom kinds a stock k3s serves: its Helm controller's and the Traefik it packages
# (k3s installs the traefik-crd chart). Everything else must have a Kubernetes schema.
K3S_KINDS = {("helm.cattle.io", "HelmChart"), ("helm.cattle.io", "HelmChartConfig"),
             ("k3s.cattle.io", "Addon"), ("traefik.io", "Middleware"), ("traefik.io", "IngressRoute")}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "IngressClass", "PriorityClass", "CustomResourceDefinition"}
# Pods k3s runs itself, by namespace, with the labels policies may select them by.
K3S_SYSTEM_PODS = {"kube-system": [
    {"k8s-app": "kube-dns"},
    {"app.kubernetes.io/name": "traefik", "app.kubernetes.io/instance": "traefik-kube-system"},
]}
# Namespaces a site runs itself (Prometheus); a policy may allow them without naming pods.
SITE_NAMESPACES = {"monitoring"}
INGRESS_CLASSES = {"traefik"}  # the only one a stock k3s has


def opt_in_render(tmp_path: Path, component: str) -> list[Document]:
    """The ha example with an opt-in component added, as a site would compose it."""
    base = os.path.relpath(K3S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {NAMESPACE}\nresources:\n  - {base}/examples/ha\ncomponents:\n  - {base}/{component}\n")
    return render(tmp_path)


@pytest.fixture(scope="module", params=[*EXAMPLES, *VARIANTS])
def documents(request: pytest.FixtureRequest) -> list[Document]:
    return render(request.param)


def group_kind(doc: Document) -> tuple[str, str]:
    group = doc["apiVersion"].rpartition("/")[0]
    return group, doc["kind"]


def served_by_stock_k3s(doc: Document) -> bool:
    if group_kind(doc) in K3S_KINDS:
        return True
    try:
        kubernetes_validate.validate({"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": {}},
                                     KUBERNETES, strict=False)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


def pod_templates(documents: list[Document]) -> dict[str, dict[str, Any]]:
    return {name: w["spec"]["template"] for name, w in workloads(documents).items()}


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def in_namespace(documents: list[Document], kind: str, namespace: str = NAMESPACE) -> dict[str, Document]:
    return {name: d for name, d in named(documents, kind).items() if d["metadata"].get("namespace") == namespace}


# -- namespaces ----------------------------------------------------------------------------------

def test_every_object_is_in_the_sites_namespace(documents: list[Document]) -> None:
    assert NAMESPACE in named(documents, "Namespace"), "the namespace itself is part of the render"
    outside = [f"{d['kind']}/{d['metadata']['name']}" for d in documents
               if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != NAMESPACE]
    assert outside == [], f"kubectl apply -k puts these in the context's namespace, not {NAMESPACE}: {outside}"
    for binding in named(documents, "RoleBinding").values():
        for subject in binding["subjects"]:
            if subject["kind"] == "ServiceAccount":
                assert subject.get("namespace") == NAMESPACE, f"{binding['metadata']['name']}: {subject}"


def test_the_operators_secret_is_created_where_the_pods_look_for_it() -> None:
    namespace, name, _ = operator_secret()
    assert (namespace, name) == (NAMESPACE, "photoferry-secrets")


# -- what pods mount and read --------------------------------------------------------------------

def test_every_config_map_and_secret_a_pod_uses_exists_with_its_keys(documents: list[Document]) -> None:
    configmaps = {name: set(d.get("data", {})) | set(d.get("binaryData", {}))
                  for name, d in in_namespace(documents, "ConfigMap").items()}
    _, secret_name, secret_keys = operator_secret()
    secrets = {name: set(d.get("data", {})) | set(d.get("stringData", {}))
               for name, d in in_namespace(documents, "Secret").items()}
    secrets[secret_name] = set(secret_keys)
    missing = []

    def need(kind: str, name: str, key: str | None, where: str, optional: bool = False) -> None:
        known = configmaps if kind == "ConfigMap" else secrets
        if optional:
            return
        if name not in known:
            missing.append(f"{where}: {kind} {name}")
        elif key is not None and key not in known[name]:
            missing.append(f"{where}: {kind} {name} has no key {key}")

    for workload, template in pod_templates(documents).items():
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                source = volume["configMap"]
                need("ConfigMap", source["name"], None, f"{workload} volume {volume['name']}",
                     source.get("optional", False))
                for item in source.get("items", []):
                    need("ConfigMap", source["name"], item["key"], f"{workload} volume {volume['name']}")
            if "secret" in volume:
                source = volume["secret"]
                need("Secret", source["secretName"], None, f"{workload} volume {volume['name']}",
                     source.get("optional", False))
        claims = {c["metadata"]["name"] for c in workloads(documents)[workload]["spec"].get("volumeClaimTemplates", [])}
        for container in containers(template):
            where = f"{workload}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{where}: no volume {mount['name']}"
                volume = volumes.get(mount["name"], {})
                if "configMap" in volume and "subPath" in mount:
                    # A subPath of a key the map lacks mounts an empty directory, not a file.
                    need("ConfigMap", volume["configMap"]["name"], mount["subPath"],
                         f"{where} mount {mount['mountPath']}")
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", source["configMapRef"]["name"], None, where,
                         source["configMapRef"].get("optional", False))
                if "secretRef" in source:
                    need("Secret", source["secretRef"]["name"], None, where, source["secretRef"].get("optional", False))
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {})
                if "configMapKeyRef" in reference:
                    ref = reference["configMapKeyRef"]
                    need("ConfigMap", ref["name"], ref["key"], f"{where} ${variable['name']}",
                         ref.get("optional", False))
                if "secretKeyRef" in reference:
                    ref = reference["secretKeyRef"]
                    need("Secret", ref["name"], ref["key"], f"{where} ${variable['name']}", ref.get("optional", False))
    assert missing == [], missing


def test_every_service_account_a_pod_or_binding_names_exists(documents: list[Document]) -> None:
    accounts = set(in_namespace(documents, "ServiceAccount")) | {"default"}
    for workload, template in pod_templates(documents).items():
        assert template["spec"].get("serviceAccountName", "default") in accounts, workload
    roles = set(in_namespace(documents, "Role"))
    for binding in in_namespace(documents, "RoleBinding").values():
        assert binding["roleRef"]["name"] in roles, binding["metadata"]["name"]
        for subject in binding["subjects"]:
            assert subject["name"] in accounts, f"{binding['metadata']['name']}: {subject['name']}"


# -- selectors, ports and targets ----------------------------------------------------------------

def test_every_service_selects_pods_that_have_its_ports(documents: list[Document]) -> None:
    found = workloads(documents)
    for name, service in in_namespace(documents, "Service").items():
        selector = service["spec"].get("selector")
        assert selector, f"Service {name} selects nothing (no Endpoints would ever be made)"
        backends = [w for w in found.values()
                    if selects({"matchLabels": selector}, w["spec"]["template"]["metadata"]["labels"])]
        assert backends, f"Service {name} selects no pod: {selector}"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for backend in backends:
                ports = container_ports(backend)
                assert (target in ports) if isinstance(target, str) else (target in ports.values()), \
                    f"Service {name} port {port['name']}: {backend['metadata']['name']} has no port {target}"
    for workload in found.values():
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in in_namespace(documents, "Service"), workload["metadata"]["name"]


def test_every_budget_and_autoscaler_points_at_a_workload(documents: list[Document]) -> None:
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(documents).values()]
    for name, budget in in_namespace(documents, "PodDisruptionBudget").items():
        assert any(selects(budget["spec"]["selector"], pod) for pod in labels), f"PodDisruptionBudget {name}"
    for name, autoscaler in in_namespace(documents, "HorizontalPodAutoscaler").items():
        target = autoscaler["spec"]["scaleTargetRef"]
        match = in_namespace(documents, target["kind"]).get(target["name"])
        assert match is not None and match["apiVersion"] == target["apiVersion"], f"HorizontalPodAutoscaler {name}"
        assert "replicas" not in match["spec"], f"{target['name']}: a fixed count fights the autoscaler on every apply"


def test_every_network_policy_selects_pods_and_their_named_ports(documents: list[Document]) -> None:
    pods = {name: (w["spec"]["template"]["metadata"]["labels"], container_ports(w))
            for name, w in workloads(documents).items()}
    for name, policy in in_namespace(documents, "NetworkPolicy").items():
        spec = policy["spec"]
        subjects = [pod for pod, (labels, _) in pods.items() if selects(spec["podSelector"], labels)]
        assert subjects, f"NetworkPolicy {name} applies to no pod"
        for direction, side in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction, []):
                peers = []  # the pods of this namespace the rule names, when it names any
                for peer in rule.get(side, []):
                    if "ipBlock" in peer:
                        continue
                    namespaces = peer.get("namespaceSelector")
                    if namespaces is None:
                        matched = [pod for pod, (labels, _) in pods.items() if selects(peer["podSelector"], labels)]
                        assert matched, f"NetworkPolicy {name}: {peer['podSelector']} selects no pod"
                        peers.extend(matched)
                        continue
                    namespace = namespaces.get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    assert namespace in K3S_SYSTEM_PODS or namespace in SITE_NAMESPACES, \
                        f"NetworkPolicy {name}: {namespaces}"
                    if "podSelector" in peer and namespace in K3S_SYSTEM_PODS:
                        assert any(selects(peer["podSelector"], labels) for labels in K3S_SYSTEM_PODS[namespace]), \
                            f"NetworkPolicy {name}: no {namespace} pod of k3s has {peer['podSelector']}"
                # A named port is looked up on the pods receiving the connection.
                receivers = subjects if direction == "ingress" else peers
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str) and receivers:
                        assert any(port["port"] in pods[pod][1] for pod in receivers), \
                            f"NetworkPolicy {name}: no pod it names has a port {port['port']}"


def test_every_ingress_reaches_a_service_port_through_k3s_traefik(documents: list[Document]) -> None:
    services = in_namespace(documents, "Service")
    for name, ingress in in_namespace(documents, "Ingress").items():
        assert ingress["spec"].get("ingressClassName") in INGRESS_CLASSES, f"Ingress {name}"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"Ingress {name}: no Service {backend['name']}"
                ports = services[backend["name"]]["spec"]["ports"]
                wanted = backend["port"]
                assert any(p.get("name") == wanted["name"] if "name" in wanted else p["port"] == wanted.get("number")
                           for p in ports), f"Ingress {name}: Service {backend['name']} has no port {wanted}"


# -- kinds ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", [*EXAMPLES, *VARIANTS, "cluster"])
def test_a_stock_k3s_serves_every_kind(folder: str) -> None:
    unserved = sorted({group_kind(d) for d in render(folder) if not served_by_stock_k3s(d)})
    assert unserved == [], f"{folder}: a stock k3s serves no {unserved}; put them in an opt-in component"


@pytest.mark.parametrize("component", sorted(OPT_IN))
def test_an_opt_in_component_brings_only_its_own_kinds_and_resolves(component: str, tmp_path: Path) -> None:
    documents = opt_in_render(tmp_path, component)
    unserved = {group_kind(d) for d in documents if not served_by_stock_k3s(d)}
    assert unserved == OPT_IN[component]
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in documents if d["kind"] not in CLUSTER_SCOPED)
    services = in_namespace(documents, "Service")
    for monitor in in_namespace(documents, "ServiceMonitor").values():
        selected = [s for s in services.values()
                    if selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(any(p.get("name") == endpoint["port"] for p in s["spec"]["ports"]) for s in selected)


def test_workload_kinds_cover_every_pod_template(documents: list[Document]) -> None:
    # The checks above read pods from these kinds only: a Job or a bare Pod would escape them.
    kinds = {d["kind"] for d in documents if "template" in d.get("spec", {}) or d["kind"] == "Pod"}
    assert kinds <= set(WORKLOAD_KINDS), kinds
