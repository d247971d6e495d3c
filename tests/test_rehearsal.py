"""The `site` example as a kubelet would run it, on this machine (devtools/rehearsal.py).

Every rendered pod runs as processes in a network namespace of its own, with the
manifests' command, environment (the README's Secret, the ConfigMaps), mounted files,
user and read-only root, reaching the others by their Service names; the declared
probes decide readiness. Then a photo uploaded through the `gateway` Service must reach
the remote stand-in, byte-identical.

What the stand-ins cannot cover (devtools.rehearsal.STAND_INS): RabbitMQ 3.13 itself
(Debian's 3.10 runs in the image's file layout), MinIO (moto with MinIO's health and
metrics endpoints), Jaeger (a trace sink), HTTPS to AWS (moto through
PHOTOFERRY_S3_ENDPOINT); and NetworkPolicies, resource limits and seccomp, which no
process here enforces (tests/test_manifests.py models the policies).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from devtools.netns import netns_list, netns_pids
from devtools.rehearsal import STAND_INS, Rehearsal, RehearsalFailed
from devtools.servers import RABBITMQ_SERVER, REPO, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the rehearsal needs root: network namespaces and mounts")

READY_WITHIN_S = 90.0  # a kubelet would be done in well under that on a quiet node
SAMPLE = REPO / "devtools" / "sample.jpg"


def processes(site: Rehearsal) -> set[int]:
    """Every process now running in the rehearsal's network namespaces (epmd and stand-ins included)."""
    return {pid for name in site.namespaces for pid in netns_pids(name)}


def leftovers(site: Rehearsal, seen: set[int]) -> list[str]:
    """What a rehearsal made that is still there, of the namespaces and of the processes ``seen`` in them."""
    left = [f"netns {name}" for name in netns_list() if name.startswith(f"{site.run_id}-")]
    left += [f"/etc/netns/{name}" for name in site.namespaces if (Path("/etc/netns") / name).exists()]
    for pid in sorted(seen):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            continue
        if state != "Z":  # a zombie has ended; only its parent's wait is missing
            left.append(f"process {pid}: {command}")
    return left


def test_the_site_example_comes_up_and_ships_a_photo_through_the_gateway_service(tmp_path: Path) -> None:
    assert RABBITMQ_SERVER.exists(), "the rabbitmq-server package is missing (make test installs it)"
    assert set(STAND_INS) >= {"remote"}  # the stand-ins say what they cannot cover
    site = Rehearsal("examples/site", workdir=tmp_path)
    with site:
        site.start()
        site.wait_ready(READY_WITHIN_S)
        report = site.report()
        # The broker runs as the image does, on a read-only root: its log directory refuses a file.
        wrote, detail = site.run_in("rabbitmq-0", "rabbitmq", ["sh", "-c", "touch /var/log/rabbitmq/probe"])
        assert not wrote and "Read-only file system" in detail, detail

        image = SAMPLE.read_bytes()
        result = site.upload(image)
        assert result["accepted"] and result["status"] == 201, result
        expected = hashlib.sha256(image).hexdigest()

        def shipped() -> bool:
            return any(key.endswith(result["photo_id"]) and digest == expected
                       for key, digest in site.remote_objects().items())

        wait_until(shipped, timeout=60, what="the photo in the remote bucket")
        assert site.operator_status()["status"] == 200, "the operator token from the Secret opens the keeper's API"
        assert "spans from photoferry-gateway" in site.logs("jaeger-0"), "traces reach Jaeger's Service name"
        for pod in site.pods:
            for state in pod.containers:
                assert state.restarts == 0 and state.exits == [], f"{pod.name}/{state.name}\n{report}"

        # A broker outage: the gateways stay behind their Service and answer 503 + Retry-After.
        site.kill("rabbitmq-0", "rabbitmq")
        refused = site.upload(image, captured_at="2026-05-01T12:00:01Z", retry=False)
        deadline = time.monotonic() + 30
        while refused["status"] != 503 and time.monotonic() < deadline:
            refused = site.upload(image, captured_at="2026-05-01T12:00:01Z", retry=False)
        assert refused["status"] == 503 and refused["retry_after"], refused
        gateway = site.pod("gateway-0").containers[0]
        period = gateway.spec["readinessProbe"]["periodSeconds"]
        failures = gateway.spec["readinessProbe"].get("failureThreshold", 3)
        # Long enough for the kubelet to have taken it out of the Service had readiness followed the broker.
        settle = time.monotonic() + period * (failures + 1)
        while time.monotonic() < settle:
            assert gateway.ready, f"the gateway left its Service during the broker outage\n{site.report()}"
            time.sleep(0.5)
        seen = processes(site)
        assert len(seen) > len(site.pods), "the rehearsal's own processes are where it looks for them"
    assert leftovers(site, seen) == []


def test_a_rehearsal_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    # Jaeger alone, with a readiness probe nothing answers: the rehearsal fails, and cleans up.
    folder = tmp_path / "never-ready"
    folder.mkdir()
    (folder / "jaeger.yaml").write_text((REPO / "deploy" / "k3s" / "base" / "jaeger.yaml").read_text())
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: photoferry\n"
        "resources: [jaeger.yaml]\npatches:\n  - target: {kind: Deployment, name: jaeger}\n    patch: |-\n"
        "      - op: replace\n        path: /spec/template/spec/containers/0/readinessProbe/httpGet/port\n"
        "        value: 9\n")
    site = Rehearsal(folder, workdir=tmp_path / "work")
    seen: set[int] = set()
    with pytest.raises(RehearsalFailed, match="jaeger-0"), site:
        site.start()
        wait_until(lambda: site.pod("jaeger-0").containers[0].process is not None, timeout=10, what="jaeger-0")
        seen = processes(site)
        assert seen, "the rehearsal runs processes in its namespaces"
        site.wait_ready(8)
    assert leftovers(site, seen) == []
