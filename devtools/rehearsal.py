"""A kubelet rehearsal: a rendered k3s example's pods run as processes on this machine.

No cluster runs here, so this does the part of a kubelet's work a schema cannot see. For
every pod of the render (each replica of each Deployment and StatefulSet) it:

- gives the pod a network namespace of its own with an address on a bridge, and the
  cluster's names in that namespace's hosts file (``/etc/netns/NAME/hosts``, which
  ``ip netns exec`` mounts over ``/etc/hosts``): every Service as
  ``NAME[.photoferry[.svc[.cluster.local]]]`` (at the address of the first pod it
  selects), every pod by its hostname, and the environment variables a kubelet adds
  for Services;
- builds the container's file system as the image has it, on a read-only root when the
  manifest says so (an overlay of this machine's root, remounted read-only), with the
  volumes mounted where the manifest mounts them: ConfigMaps (from the render) as
  files, emptyDirs and claims as directories owned by the pod's fsGroup;
- runs the manifest's command and arguments, with its environment (Secrets, ConfigMaps
  and field references resolved), hostname, user, groups and no privilege escalation;
- polls the declared probes as a kubelet does (period, timeout, thresholds; HTTP and TCP
  from the node, exec inside the container), runs lifecycle hooks, restarts a container
  that exits (with the kubelet's back-off), and stops them with SIGTERM and the grace
  period.

The Secret is the one deploy/k3s/README.md tells operators to create, with its
placeholders filled in. Images that cannot run here get stand-ins (``STAND_INS``): the
photoferry image is this checkout with its virtualenv; RabbitMQ 3.13 is Debian's
``rabbitmq-server`` (3.10) inside the image's file layout; MinIO is ``minio`` when on
PATH, else moto; Jaeger is a trace sink; the remote S3 is moto, outside the cluster.
Not covered: NetworkPolicies (tests/test_manifests.py models them), resource limits,
seccomp, Service port remapping, the images' own binaries, TLS to AWS.

Everything runs as root (network namespaces, mounts). Every namespace, process and
folder it makes is removed by ``stop()``, also after a failure, and a later run removes
what a killed run left.

    python -m devtools.rehearsal deploy/k3s/examples/site
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.manifests import NAMESPACE, REPO, Document, operator_secret, render, selects, workloads
from devtools.netns import enter_netns, remove_netns, remove_stale_namespaces, run
from devtools.servers import wait_until

NETWORK = ipaddress.ip_network("10.42.0.0/24")  # k3s's pod network; used only inside our namespaces
NODE_ADDRESS = NETWORK[1]  # the bridge, where the kubelet's probes come from
REMOTE_ADDRESS = NETWORK[250]  # the remote S3 stand-in, "outside" the cluster
CLIENT_ADDRESS = NETWORK[251]  # where uploads through Service names come from
REMOTE_NAME = "remote-s3.test"
REMOTE_PORT = 9000
CLUSTER_DOMAIN = "svc.cluster.local"
PREFIX = "pfr"  # network namespaces are named pfr<pid>-<pod>
STOP_WAIT_S = 30.0  # at most this much of a pod's grace period is waited for at the end
BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)  # the kubelet's restart back-off

PHOTOFERRY_IMAGE = "registry.local/photoferry"
RABBITMQ_IMAGE = "docker.io/library/rabbitmq"
MINIO_IMAGE = "quay.io/minio/minio"
JAEGER_IMAGE = "docker.io/jaegertracing/all-in-one"
# Where RabbitMQ's docker-library image (3.13, ubuntu) differs from this machine's package,
# as its Dockerfile and files say (docker-library/rabbitmq, 3.13/ubuntu).
RABBITMQ_IMAGE_FILES = {
    "/etc/rabbitmq/conf.d/10-defaults.conf": "loopback_users.guest = false\nlog.console = true\n",
    # rabbitmq-plugins enable --offline, in the base image and then the management one.
    "/etc/rabbitmq/enabled_plugins": "[rabbitmq_prometheus,rabbitmq_management].\n",
}

STAND_INS = {
    PHOTOFERRY_IMAGE: "this checkout and its virtualenv, as the Containerfile installs them",
    RABBITMQ_IMAGE: "Debian's rabbitmq-server 3.10 in the 3.13 image's file layout; not covered: 3.13 itself "
                    "(feature flags, Khepri, the k8s peer discovery plugin), and 3.10's separate upgrade log "
                    "(gone in 3.12) goes to the console",
    MINIO_IMAGE: "the minio binary on PATH, else moto with MinIO's health and cluster-metrics endpoints "
                 "(not covered: MinIO itself, its console)",
    JAEGER_IMAGE: "a trace sink on the OTLP/HTTP and admin ports (no collector, storage or UI)",
    "remote": f"moto at http://{REMOTE_NAME}:{REMOTE_PORT} through PHOTOFERRY_S3_ENDPOINT "
              "(not covered: HTTPS to AWS and the shipper's egress policy)",
}

log = logging.getLogger(__name__)


class RehearsalFailed(AssertionError):
    """The rendered pods did not do what a cluster would need of them."""


# -- what a pod is made of --------------------------------------------------------------------------

@dataclass
class ContainerState:
    name: str
    spec: dict[str, Any]
    logfile: Path
    specfile: Path
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)
    next_start: float = 0.0
    ready_at: float | None = None  # seconds after the rehearsal started


@dataclass
class PodState:
    name: str
    workload: Document
    ordinal: int
    address: ipaddress.IPv4Address
    netns: str
    hostname: str
    subdomain: str | None
    workdir: Path
    containers: list[ContainerState] = field(default_factory=list)
    init_containers: list[ContainerState] = field(default_factory=list)
    phase: str = "Pending"  # Pending, Running
    error: str = ""

    @property
    def template(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]

    @property
    def ready(self) -> bool:
        return self.phase == "Running" and all(c.ready for c in self.containers)


def image_name(image: str) -> str:
    """The repository of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    repository, _, tag = name.rpartition(":")
    return repository if repository and "/" not in tag else name


def containerfile_env() -> tuple[dict[str, str], str]:
    """The photoferry image's ENV and WORKDIR, from the Containerfile (and its python base image)."""
    env = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    workdir = "/"
    for line in (REPO / "Containerfile").read_text().splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
        elif line.startswith("WORKDIR "):
            workdir = line.split(None, 1)[1].strip()
    return env, workdir


def fill_placeholders(literals: dict[str, str], remote_keys: tuple[str, str]) -> dict[str, str]:
    """The README's secret with its placeholders filled in as an operator would."""
    password = secrets.token_hex(12)
    values = {}
    for key, value in literals.items():
        value = value.replace("CHANGE-ME", password)
        value = re.sub(r"\$\(openssl rand -hex (\d+)\)", lambda m: secrets.token_hex(int(m.group(1))), value)
        if value == "...":
            value = remote_keys[0] if key == "AWS_ACCESS_KEY_ID" else remote_keys[1]
        values[key] = value
    return values


class Rehearsal:
    """One rehearsal of a rendered folder; a context manager that always cleans up."""

    def __init__(self, folder: str | Path, *, workdir: Path | None = None) -> None:
        self.folder = folder
        self.documents = render(folder)
        self.run_id = f"{PREFIX}{os.getpid()}"
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="rehearsal-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.remote_keys = ("rehearsal", "rehearsal-secret")
        _, self.secret_name, literals = operator_secret()
        self.secret = fill_placeholders(literals, self.remote_keys)
        self.configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in self.documents if d["kind"] == "ConfigMap"}
        self.services = {d["metadata"]["name"]: d for d in self.documents if d["kind"] == "Service"}
        self.pods: list[PodState] = []
        self.namespaces: list[str] = []
        self.node = f"{self.run_id}-node"
        self.client = f"{self.run_id}-client"
        self.remote = f"{self.run_id}-remote"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._node_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._remote_process: subprocess.Popen[bytes] | None = None
        self.started_at = time.monotonic()

    # -- the plan -------------------------------------------------------------------------------

    def _plan(self) -> None:
        addresses = iter(list(NETWORK.hosts())[9:240])
        for name, workload in workloads(self.documents).items():
            replicas = int(workload["spec"].get("replicas", 1))
            for ordinal in range(replicas):
                pod_name = f"{name}-{ordinal}"
                spec = workload["spec"]["template"]["spec"]
                hostname = spec.get("hostname", pod_name)
                subdomain = workload["spec"].get("serviceName") if workload["kind"] == "StatefulSet" else spec.get(
                    "subdomain")
                pod = PodState(name=pod_name, workload=workload, ordinal=ordinal, address=next(addresses),
                               netns=f"{self.run_id}-{pod_name}", hostname=hostname, subdomain=subdomain,
                               workdir=self.workdir / "pods" / pod_name)
                for kind, specs in (("init", spec.get("initContainers", [])), ("main", spec["containers"])):
                    for container in specs:
                        state = ContainerState(name=container["name"], spec=container, init=kind == "init",
                                               logfile=pod.workdir / f"{container['name']}.log",
                                               specfile=pod.workdir / f"{container['name']}.json")
                        (pod.init_containers if kind == "init" else pod.containers).append(state)
                self.pods.append(pod)

    def service_address(self, name: str) -> ipaddress.IPv4Address:
        """The address a Service name resolves to here: its first pod's (a ClusterIP does not exist)."""
        service = self.services[name]
        for pod in self.pods:
            if selects({"matchLabels": service["spec"].get("selector", {})}, pod.labels):
                return pod.address
        raise RehearsalFailed(f"Service {name} selects no pod")

    def _check_ports(self) -> None:
        for name, service in self.services.items():
            pods = [p for p in self.pods if selects({"matchLabels": service["spec"].get("selector", {})}, p.labels)]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for pod in pods:
                    named = {p["name"]: p["containerPort"] for c in pod.template["spec"]["containers"]
                             for p in c.get("ports", []) if "name" in p}
                    number = named.get(target, target) if isinstance(target, str) else target
                    if number != port["port"]:
                        raise RehearsalFailed(f"Service {name} maps port {port['port']} to {number}: "
                                              "the rehearsal resolves names to pod addresses and cannot remap ports")

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", f"{REMOTE_ADDRESS} {REMOTE_NAME}"]
        for pod in self.pods:
            names = [pod.hostname]
            if pod.subdomain:
                names.insert(0, f"{pod.hostname}.{pod.subdomain}.{NAMESPACE}.{CLUSTER_DOMAIN}")
            lines.append(f"{pod.address} {' '.join(names)}")
        for name in self.services:
            address = self.service_address(name)
            names = (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.{CLUSTER_DOMAIN}")
            lines.append(f"{address} {' '.join(names)}")
        return "\n".join(lines) + "\n"

    def service_environment(self) -> dict[str, str]:
        """The variables a kubelet adds for every Service of the namespace (enableServiceLinks)."""
        env = {}
        for name, service in self.services.items():
            if service["spec"].get("clusterIP") == "None":
                continue
            prefix = name.upper().replace("-", "_")
            address = str(self.service_address(name))
            ports = service["spec"]["ports"]
            env[f"{prefix}_SERVICE_HOST"] = address
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{prefix}_PORT"] = f"tcp://{address}:{ports[0]['port']}"
            for port in ports:
                if "name" in port:
                    env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
                base = f"{prefix}_PORT_{port['port']}_TCP"
                env.update({base: f"tcp://{address}:{port['port']}", f"{base}_PROTO": "tcp",
                            f"{base}_PORT": str(port["port"]), f"{base}_ADDR": address})
        return env

    # -- the network ----------------------------------------------------------------------------

    def _add_netns(self, name: str, address: ipaddress.IPv4Address, index: int) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", self.node, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "-n", self.node, "link", "set", f"v{index}", "master", "br0", "up")
        run("ip", "-n", name, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        folder = Path("/etc/netns") / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(self.hosts_file())
        # Names not in the hosts file fail at once instead of waiting on a server nobody can reach.
        (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _network(self) -> None:
        run("ip", "netns", "add", self.node)
        self.namespaces.append(self.node)
        run("ip", "-n", self.node, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.node, "addr", "add", f"{NODE_ADDRESS}/{NETWORK.prefixlen}", "dev", "br0")
        run("ip", "-n", self.node, "link", "set", "br0", "up")
        run("ip", "-n", self.node, "link", "set", "lo", "up")
        for index, pod in enumerate(self.pods):
            self._add_netns(pod.netns, pod.address, index)
        self._add_netns(self.remote, REMOTE_ADDRESS, 250)
        self._add_netns(self.client, CLIENT_ADDRESS, 251)
        self._node_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="kubelet", initializer=enter_netns, initargs=(self.node,))

    def on_node(self, function: Any, *args: Any) -> Any:
        """Run ``function`` in a thread inside the node's network namespace (where probes come from)."""
        assert self._node_pool is not None
        return self._node_pool.submit(function, *args).result()

    # -- starting -------------------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RehearsalFailed("the rehearsal needs root (network namespaces and mounts)")
        remove_stale_namespaces(PREFIX)
        self.started_at = time.monotonic()
        self._plan()
        self._check_ports()
        self._network()
        self._start_remote()
        for pod in self.pods:
            self._prepare(pod)
        supervisor = threading.Thread(target=self._kubelet, name="kubelet", daemon=True)
        supervisor.start()
        self._threads.append(supervisor)

    def _start_remote(self) -> None:
        log_file = open(self.workdir / "remote-s3.log", "ab")
        self._remote_process = subprocess.Popen(
            ["ip", "netns", "exec", self.remote, sys.executable, "-m", "devtools.moto_keepalive",
             "--host", "0.0.0.0", "--port", str(REMOTE_PORT)],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            # moto would read a dotted host name (remote-s3.test) as a virtual-hosted bucket.
            env={**os.environ, "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"})
        log_file.close()
        wait_until(lambda: self.on_node(self._http_status, f"http://{REMOTE_ADDRESS}:{REMOTE_PORT}/", 2.0) > 0,
                   timeout=30, what="the remote S3 stand-in")
        from services.common.s3 import ensure_bucket

        try:
            bucket = self.configmap_value("PHOTOFERRY_S3_BUCKET")
        except KeyError:
            return  # nothing here ships
        self.on_node(ensure_bucket, self._remote_client(), bucket)

    def configmap_value(self, key: str) -> str:
        for name, data in self.configmaps.items():
            if name.startswith("photoferry-config") and key in data:
                return data[key]
        raise KeyError(key)

    def _remote_client(self) -> Any:
        from services.common.s3 import s3_client

        return s3_client(f"http://{REMOTE_ADDRESS}:{REMOTE_PORT}", access_key=self.remote_keys[0],
                         secret_key=self.remote_keys[1], region="us-east-1")

    def remote_objects(self) -> dict[str, str]:
        """Keys in the remote bucket with their SHA-256 (as a shipper leaves them)."""
        bucket = self.configmap_value("PHOTOFERRY_S3_BUCKET")

        def listing() -> dict[str, str]:
            client = self._remote_client()
            found = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                    found[item["Key"]] = hashlib.sha256(body).hexdigest()
            return found

        return self.on_node(listing)

    def _volume_source(self, pod: PodState, volume: dict[str, Any], fs_group: int | None) -> Path:
        """Make a volume's content on disk, as the kubelet prepares it before the container starts."""
        path = pod.workdir / "volumes" / volume["name"]
        if path.exists():
            return path
        path.mkdir(parents=True)
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            if name not in self.configmaps:
                raise RehearsalFailed(f'{pod.name}: configmap "{name}" not found (the pod stays ContainerCreating)')
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in self.configmaps[name]]
            for item in items:
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(self.configmaps[name][item["key"]])
                target.chmod(volume["configMap"].get("defaultMode", 0o644))
        elif "secret" in volume:
            raise RehearsalFailed(f"{pod.name}: secret volumes are not rehearsed")
        elif "emptyDir" in volume:
            path.chmod(0o777)
        if fs_group is not None:
            for each in (path, *path.rglob("*")):
                os.chown(each, 0, fs_group)
            if "emptyDir" not in volume:
                path.chmod(0o2775)
        return path

    def _claim_source(self, pod: PodState, claim: str, fs_group: int | None) -> Path:
        path = self.workdir / "claims" / f"{claim}-{pod.name}"
        path.mkdir(parents=True, exist_ok=True)
        if fs_group is not None:
            os.chown(path, 0, fs_group)
            path.chmod(0o2775)
        return path

    def _environment(self, pod: PodState, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        if pod.template["spec"].get("enableServiceLinks", True):
            env.update(self.service_environment())
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                name = source["configMapRef"]["name"]
                if name not in self.configmaps:
                    raise RehearsalFailed(f'{pod.name}: configmap "{name}" not found')
                env.update({source.get("prefix", "") + k: v for k, v in self.configmaps[name].items()})
            if "secretRef" in source:
                if source["secretRef"]["name"] != self.secret_name:
                    raise RehearsalFailed(f'{pod.name}: secret "{source["secretRef"]["name"]}" not found')
                env.update({source.get("prefix", "") + k: v for k, v in self.secret.items()})
        for variable in container.get("env", []):
            value = self._value(pod, variable, env)
            if value is not None:
                env[variable["name"]] = value
        return env

    def _value(self, pod: PodState, variable: dict[str, Any], env: dict[str, str]) -> str | None:
        """A variable's value; None for an optional key that is not there (the kubelet leaves it unset)."""
        if "value" in variable:
            # $(NAME) refers to a variable defined before it; $$ escapes.
            return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                          lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), variable["value"])
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref.get("optional") and ref["name"] == self.secret_name and ref["key"] not in self.secret:
                return None
            if ref["name"] != self.secret_name or ref["key"] not in self.secret:
                raise RehearsalFailed(f"{pod.name}: no key {ref['key']} in secret {ref['name']}")
            return self.secret[ref["key"]]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            if ref["key"] not in self.configmaps.get(ref["name"], {}):
                raise RehearsalFailed(f"{pod.name}: no key {ref['key']} in configmap {ref['name']}")
            return self.configmaps[ref["name"]][ref["key"]]
        if "fieldRef" in source:
            return {"metadata.name": pod.name, "metadata.namespace": NAMESPACE, "status.podIP": str(pod.address),
                    "spec.nodeName": "rehearsal", "status.hostIP": str(NODE_ADDRESS),
                    "spec.serviceAccountName": pod.template["spec"].get("serviceAccountName", "default"),
                    }[source["fieldRef"]["fieldPath"]]
        raise RehearsalFailed(f"{pod.name}: {variable['name']} comes from {source}, which is not rehearsed")

    def _prepare(self, pod: PodState) -> None:
        """Write each container's launch spec: command, environment, files, user."""
        pod.workdir.mkdir(parents=True, exist_ok=True)
        spec = pod.template["spec"]
        security = spec.get("securityContext", {})
        fs_group = security.get("fsGroup")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in pod.workload["spec"].get("volumeClaimTemplates", [])}
        try:
            for state in (*pod.init_containers, *pod.containers):
                container = state.spec
                image = image_name(container["image"])
                stand_in = self._stand_in(pod, image, container)
                context = {**security, **container.get("securityContext", {})}
                user = context.get("runAsUser", stand_in["user"])
                if context.get("runAsNonRoot") and user == 0:
                    raise RehearsalFailed(f"{pod.name}/{state.name}: runAsNonRoot, but the image runs as root")
                mounts = []
                for mount in container.get("volumeMounts", []):
                    if mount["name"] in claims:
                        source = self._claim_source(pod, mount["name"], fs_group)
                        readonly = False
                    else:
                        volume = volumes[mount["name"]]
                        source = self._volume_source(pod, volume, fs_group)
                        readonly = mount.get("readOnly", False) or "configMap" in volume or "secret" in volume
                    if "subPath" in mount:
                        source = source / mount["subPath"]
                        if not source.exists():
                            source.mkdir(parents=True)  # as the kubelet does for a missing subPath
                    mounts.append({"source": str(source), "target": mount["mountPath"], "readonly": readonly})
                env = {**stand_in["env"], **self._environment(pod, container), **stand_in.get("override", {})}
                launch = {
                    "hostname": pod.hostname,
                    "root": str(pod.workdir / "fs" / state.name),
                    "hosts": str(Path("/etc/netns") / pod.netns / "hosts"),
                    "resolv": str(Path("/etc/netns") / pod.netns / "resolv.conf"),
                    "files": stand_in.get("files", {}),
                    "clear": stand_in.get("clear", []),
                    "traversable": [str(p) for p in stand_in.get("traversable", [])],
                    "mounts": mounts,
                    "keep": sorted({str(REPO), sys.prefix, sys.base_prefix}),
                    "read_only_root": bool(context.get("readOnlyRootFilesystem", False)),
                    "user": user,
                    "group": context.get("runAsGroup", stand_in.get("group", 0)),
                    "groups": [g for g in (fs_group, *security.get("supplementalGroups", [])) if g is not None],
                    "no_new_privileges": context.get("allowPrivilegeEscalation", True) is False,
                    "env": env,
                    "workdir": container.get("workingDir", stand_in["workdir"]),
                    "argv": stand_in["argv"],
                }
                state.specfile.write_text(json.dumps(launch))
        except RehearsalFailed as exc:
            pod.error = str(exc)

    def _stand_in(self, pod: PodState, image: str, container: dict[str, Any]) -> dict[str, Any]:
        """How a container of ``image`` runs here: its argv, the image's environment and files."""
        command, args = container.get("command"), container.get("args", [])
        python = Path(sys.executable)
        venv_bin = str(python.parent)
        # The interpreter may live under a folder only root may enter (pyenv in /root): let the pod's user in.
        traversable = [p for p in Path(os.path.realpath(python)).parents if p != Path("/")]
        if image == PHOTOFERRY_IMAGE:
            env, workdir = containerfile_env()
            env["PATH"] = f"{venv_bin}:{env['PATH']}"
            argv = [*(command or ["python", "-m", "services.gateway"]), *args]
            return {"env": env, "workdir": str(REPO) if workdir == "/app" else workdir, "argv": argv, "user": 10001,
                    "traversable": traversable,
                    "override": {"PHOTOFERRY_S3_ENDPOINT": f"http://{REMOTE_NAME}:{REMOTE_PORT}"}}
        if image == RABBITMQ_IMAGE:
            if command or args:
                raise RehearsalFailed(f"{pod.name}: the broker's stand-in runs only the image's own command")
            env = {"PATH": "/usr/lib/rabbitmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/var/lib/rabbitmq", "RABBITMQ_DATA_DIR": "/var/lib/rabbitmq", "LANG": "C.UTF-8",
                   "LANGUAGE": "C.UTF-8", "LC_ALL": "C.UTF-8", "RUNNING_UNDER_SYSTEMD": "true",
                   "RABBITMQ_UPGRADE_LOG": "-"}
            files = {path: {"content": text, "owner": 999, "mode": 0o644}
                     for path, text in RABBITMQ_IMAGE_FILES.items()}
            files["/var/log/rabbitmq"] = {"directory": True, "owner": 999, "mode": 0o1777}
            return {"env": env, "workdir": "/", "argv": ["/usr/lib/rabbitmq/bin/rabbitmq-server"], "user": 999,
                    "group": 999, "files": files, "clear": ["/etc/rabbitmq"]}
        if image == MINIO_IMAGE:
            binary = shutil.which("minio")
            argv = [binary, *args] if binary else [str(python), "-m", "devtools.container", "minio", "--", *args]
            return {"env": {"PATH": f"{venv_bin}:/usr/bin:/bin"}, "workdir": str(REPO), "argv": argv, "user": 1000,
                    "traversable": traversable}
        if image == JAEGER_IMAGE:
            argv = [str(python), "-m", "devtools.container", "trace-sink"]
            return {"env": {"PATH": f"{venv_bin}:/usr/bin:/bin"}, "workdir": str(REPO), "argv": argv, "user": 10001,
                    "traversable": traversable}
        raise RehearsalFailed(f"{pod.name}: no stand-in for image {image}")

    # -- the kubelet ----------------------------------------------------------------------------

    def _kubelet(self) -> None:
        """Start pods (StatefulSets in order unless Parallel), restart what exits, until stopped."""
        while not self._stop.is_set():
            for pod in self.pods:
                if pod.error or self._stop.is_set():
                    continue
                if pod.phase == "Pending" and self._may_start(pod):
                    self._run_init(pod)
                    if not pod.error:
                        pod.phase = "Running"
                        for state in pod.containers:
                            self._start_container(pod, state)
                elif pod.phase == "Running":
                    for state in pod.containers:
                        self._watch_container(pod, state)
            self._stop.wait(0.2)

    def _may_start(self, pod: PodState) -> bool:
        workload = pod.workload
        if workload["kind"] != "StatefulSet" or workload["spec"].get("podManagementPolicy") == "Parallel":
            return True
        return all(p.ready for p in self.pods if p.workload is workload and p.ordinal < pod.ordinal)

    @staticmethod
    def _started_marker(state: ContainerState) -> Path:
        """Written by devtools.container once the container's file system is in place."""
        root = Path(json.loads(state.specfile.read_text())["root"])
        return root.with_name(root.name + ".started")

    def _launch(self, pod: PodState, state: ContainerState) -> subprocess.Popen[bytes]:
        self._started_marker(state).unlink(missing_ok=True)
        with open(state.logfile, "ab") as output:
            return subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, "unshare", "--uts", "--mount", "--propagation", "private", "--",
                 sys.executable, "-m", "devtools.container", "start", str(state.specfile)],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)

    def _run_init(self, pod: PodState) -> None:
        for state in pod.init_containers:
            process = self._launch(pod, state)
            code = process.wait()
            if code != 0:
                pod.error = f"init container {state.name} exited with {code}:\n{tail(state.logfile)}"
                return

    def _start_container(self, pod: PodState, state: ContainerState) -> None:
        state.process = self._launch(pod, state)
        state.ready = False
        thread = threading.Thread(target=self._lifecycle, args=(pod, state, state.process), daemon=True,
                                  name=f"probe-{pod.name}-{state.name}")
        thread.start()
        self._threads.append(thread)

    def _watch_container(self, pod: PodState, state: ContainerState) -> None:
        process = state.process
        if process is None or process.poll() is None:
            if process is None and time.monotonic() >= state.next_start:
                self._start_container(pod, state)
            return
        state.exits.append(process.returncode)
        state.ready = False
        state.process = None
        delay = BACKOFF_S[min(state.restarts, len(BACKOFF_S) - 1)]
        state.restarts += 1
        state.next_start = time.monotonic() + delay
        log.warning("%s/%s exited with %s; restarting in %gs, as the kubelet would", pod.name, state.name,
                    process.returncode, delay)

    def _lifecycle(self, pod: PodState, state: ContainerState, process: subprocess.Popen[bytes]) -> None:
        """postStart, then the probes, for as long as this process runs."""
        marker = self._started_marker(state)
        while not marker.exists():  # the runtime is still building the container
            if process.poll() is not None or self._stop.wait(0.05):
                return
        hook = state.spec.get("lifecycle", {}).get("postStart")
        if hook is not None:
            ok, detail = self._handler(pod, state, hook, timeout=None)
            if not ok:
                state.probe_failures.append(f"postStart failed: {detail}")
                log.warning("%s/%s: FailedPostStartHook (%s); killing the container", pod.name, state.name, detail)
                self._signal(process, signal.SIGKILL)
                return
        probes = [(kind, state.spec[kind]) for kind in ("readinessProbe", "livenessProbe") if kind in state.spec]
        if "readinessProbe" not in state.spec:
            state.ready = True
        started = time.monotonic()
        due = {kind: started + probe.get("initialDelaySeconds", 0) for kind, probe in probes}
        successes = {kind: 0 for kind, _ in probes}
        failures = {kind: 0 for kind, _ in probes}
        while not self._stop.is_set() and process.poll() is None:
            now = time.monotonic()
            for kind, probe in probes:
                if now < due[kind]:
                    continue
                due[kind] = now + probe.get("periodSeconds", 10)
                ok, detail = self._handler(pod, state, probe, timeout=probe.get("timeoutSeconds", 1))
                if process.poll() is not None or self._stop.is_set():
                    return
                if ok:
                    successes[kind] += 1
                    failures[kind] = 0
                    if kind == "readinessProbe" and successes[kind] >= probe.get("successThreshold", 1):
                        if not state.ready and state.ready_at is None:
                            state.ready_at = time.monotonic() - self.started_at
                        state.ready = True
                else:
                    successes[kind] = 0
                    failures[kind] += 1
                    if failures[kind] >= probe.get("failureThreshold", 3):
                        state.probe_failures.append(f"{kind}: {detail}")
                        if kind == "readinessProbe":
                            state.ready = False
                        else:
                            log.warning("%s/%s: liveness probe failed (%s); killing the container", pod.name,
                                        state.name, detail)
                            self._signal(process, signal.SIGKILL)
                            return
            self._stop.wait(min([max(0.05, d - time.monotonic()) for d in due.values()] or [0.5]))

    def _handler(self, pod: PodState, state: ContainerState, handler: dict[str, Any],
                 timeout: float | None) -> tuple[bool, str]:
        """Run a probe or hook handler; ``(success, what happened)``."""
        try:
            if "httpGet" in handler:
                get = handler["httpGet"]
                url = f"http://{pod.address}:{self._port(state, get['port'])}{get.get('path', '/')}"
                status = self.on_node(self._http_status, url, timeout or 1)
                return 200 <= status < 400, f"GET {url}: {status}"
            if "tcpSocket" in handler:
                port = self._port(state, handler["tcpSocket"]["port"])
                self.on_node(self._connect, str(pod.address), port, timeout or 1)
                return True, f"connected to {pod.address}:{port}"
            if "exec" in handler:
                return self._exec(pod, state, handler["exec"]["command"], timeout)
        except (OSError, concurrent.futures.TimeoutError) as exc:
            return False, repr(exc)
        return False, f"unsupported handler {handler}"

    @staticmethod
    def _port(state: ContainerState, port: str | int) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in state.spec.get("ports", []) if p.get("name") == port)

    @staticmethod
    def _http_status(url: str, timeout: float) -> int:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError):
            return 0

    @staticmethod
    def _connect(host: str, port: int, timeout: float) -> None:
        socket.create_connection((host, port), timeout=timeout).close()

    def _exec(self, pod: PodState, state: ContainerState, command: list[str],
              timeout: float | None) -> tuple[bool, str]:
        process = state.process
        if process is None:
            return False, "container not running"
        argv = ["nsenter", "--target", str(process.pid), "--net", "--mount", "--uts", "--",
                sys.executable, "-m", "devtools.container", "exec", str(state.specfile), "--", *command]
        try:
            done = subprocess.run(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                  text=True, timeout=timeout, check=False, start_new_session=True)
        except subprocess.TimeoutExpired:
            return False, f"{' '.join(command)}: timed out after {timeout}s"
        output = (done.stdout[-300:] + done.stderr[-300:]).strip()
        return done.returncode == 0, f"{' '.join(command)}: exit {done.returncode} {output}"

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    # -- watching -------------------------------------------------------------------------------

    def pod(self, name: str) -> PodState:
        return next(p for p in self.pods if p.name == name)

    def wait_ready(self, timeout: float) -> None:
        """Wait until every pod is Ready; raise with what each is doing if not by ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failed = [p for p in self.pods if p.error]
            if failed:
                raise RehearsalFailed(self.report())
            if all(p.ready for p in self.pods):
                return
            time.sleep(0.2)
        raise RehearsalFailed(f"not every pod was ready after {timeout:g}s\n{self.report()}")

    def report(self) -> str:
        lines = []
        for pod in self.pods:
            status = "Ready" if pod.ready else pod.error or pod.phase
            lines.append(f"{pod.name} ({pod.address}): {status}")
            for state in pod.containers:
                since = f" (at {state.ready_at:.1f}s)" if state.ready_at is not None else ""
                lines.append(f"  {state.name}: ready={state.ready}{since} restarts={state.restarts} "
                             f"exits={state.exits} failures={state.probe_failures[-3:]}")
                if not pod.ready or state.restarts:
                    lines.extend(f"    | {line}" for line in tail(state.logfile).splitlines())
        return "\n".join(lines)

    def client_run(self, script: str, timeout: float = 120.0) -> str:
        """Run Python in the client's namespace, where Service names resolve as in the cluster."""
        done = subprocess.run(["ip", "netns", "exec", self.client, sys.executable, "-c", script], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RehearsalFailed(f"the client's script failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def upload(self, image: bytes, *, device_id: str = "cam-rehearsal", captured_at: str = "2026-05-01T12:00:00Z",
               retry: bool = True) -> dict[str, Any]:
        """Upload as a device (the reference client) to http://gateway:<port>, by the Service's name.

        With ``retry`` the client retries as devices do; without, one answer is returned as it came
        (``status``, ``retry_after``).
        """
        url = f"http://gateway:{self.services['gateway']['spec']['ports'][0]['port']}"
        script = f"""
import base64, json
from services.common.tokens import device_token
from services.devices.client import Backoff, DeviceClient, Photo, result_of
client = DeviceClient({url!r}, {device_id!r}, device_token({self.secret['PHOTOFERRY_DEVICE_SECRET']!r}, {device_id!r}),
                      timeout_s=10, backoff=Backoff(base_s=0.5, cap_s=3))
photo = Photo(image=base64.b64decode({base64.b64encode(image).decode()!r}), captured_at={captured_at!r})
if {retry!r}:
    result = client.upload(photo, max_attempts=30)
    answer = {{"retry_after": None}}
else:
    sent = client.send(client.request(photo))
    result, answer = result_of(sent, 1), {{"retry_after": sent.retry_after}}
print(json.dumps({{"accepted": result.accepted, "status": result.status, "photo_id": result.photo_id,
                  "attempts": result.attempts, "detail": result.detail, **answer}}))
"""
        return json.loads(self.client_run(script).strip().splitlines()[-1])

    def operator_status(self) -> dict[str, Any]:
        """GET /api/status from the store keeper by its Service's name, with the Secret's operator token."""
        url = f"http://store:{self.services['store']['spec']['ports'][0]['port']}/api/status"
        script = f"""
import json, urllib.request
request = urllib.request.Request({url!r}, headers={{"Authorization": "Bearer {self.secret['PHOTOFERRY_ADMIN_TOKEN']}"}})
with urllib.request.urlopen(request, timeout=10) as response:
    print(json.dumps({{"status": response.status, "body": json.loads(response.read())}}))
"""
        return json.loads(self.client_run(script).strip().splitlines()[-1])

    def run_in(self, pod: str, container: str, argv: list[str], timeout: float = 30.0) -> tuple[bool, str]:
        """Run a command in a running container as its user (as kubectl exec would)."""
        found = self.pod(pod)
        state = next(c for c in found.containers if c.name == container)
        return self._exec(found, state, argv, timeout)

    def kill(self, pod: str, container: str) -> None:
        """Kill a container's processes at once, as a crash would; the kubelet restarts it later."""
        state = next(c for c in self.pod(pod).containers if c.name == container)
        if state.process is not None:
            self._signal(state.process, signal.SIGKILL)

    def logs(self, pod: str, container: str | None = None) -> str:
        state = next(c for c in self.pod(pod).containers if container is None or c.name == container)
        return state.logfile.read_text(errors="replace") if state.logfile.exists() else ""

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every container as the kubelet would (preStop, SIGTERM, grace, SIGKILL), then remove it all."""
        self._stop.set()
        running = [(pod, state) for pod in self.pods for state in pod.containers
                   if state.process is not None and state.process.poll() is None]
        for pod, state in running:
            hook = state.spec.get("lifecycle", {}).get("preStop")
            if hook is not None and "exec" in hook:
                self._handler(pod, state, hook, timeout=STOP_WAIT_S)
        for _, state in running:
            assert state.process is not None
            self._signal(state.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for pod, state in running:
            assert state.process is not None
            grace = min(pod.template["spec"].get("terminationGracePeriodSeconds", 30), STOP_WAIT_S)
            try:
                state.process.wait(timeout=max(0.1, min(grace, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self._signal(state.process, signal.SIGKILL)
                state.process.wait()
        if self._remote_process is not None:
            self._signal(self._remote_process, signal.SIGKILL)
            self._remote_process.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._node_pool is not None:
            self._node_pool.shutdown(wait=False, cancel_futures=True)
        for name in reversed(self.namespaces):
            remove_netns(name)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tail(path: Path, chars: int = 2500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# -- by hand ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="Rehearse a rendered k3s folder's pods on this machine (as root).")
    parser.add_argument("folder", help="e.g. deploy/k3s/examples/site")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for every pod to be ready")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Rehearsal(args.folder) as site:
        site.start()
        site.wait_ready(args.timeout)
        result = site.upload((REPO / "devtools" / "sample.jpg").read_bytes())
        log.info("upload: %s", json.dumps(result))
        wait_until(lambda: len(site.remote_objects()) > 0, timeout=60, what="the photo in the remote bucket")
        log.info("%s\nshipped: %s", site.report(), sorted(site.remote_objects()))


if __name__ == "__main__":
    main()
