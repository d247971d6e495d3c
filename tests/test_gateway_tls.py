"""TLS for devices: the gateway serves HTTPS with the site's certificate, devices verify it against the
site's CA, nothing is answered in clear, and a renewed certificate is served without a restart."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from devtools.certs import SiteCertificates, make_site_certificates
from devtools.servers import REPO, ServiceProcess, free_port, wait_until
from services.common.tokens import device_token
from services.devices.client import DeviceClient, Photo
from services.devices.fleet import Fleet, FleetPlan
from services.devices.jpegs import JpegMaker
from services.gateway.tls import RELOAD_CHECK_S
from tests.conftest import stop_cleanly
from tests.helpers import DEVICE_SECRET, Site, now_rfc3339

pytestmark = pytest.mark.servers


class HttpsService(ServiceProcess):
    """A service that answers HTTPS only, probed through the site's CA."""

    def __init__(self, *args: object, ca: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.context = ssl.create_default_context(cafile=str(ca))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self.context).close()
        return True

    def ready(self) -> bool:
        self.healthy()
        urllib.request.urlopen(f"{self.url}/readyz", timeout=2, context=self.context).close()
        return True


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SiteCertificates:
    return make_site_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def gateway(site: Site, certs: SiteCertificates, logs: Path) -> Iterator[HttpsService]:
    port = free_port()
    env = site.env(PHOTOFERRY_GATEWAY_PORT=str(port), PHOTOFERRY_GATEWAY_TLS_CERT=str(certs.cert),
                   PHOTOFERRY_GATEWAY_TLS_KEY=str(certs.key))
    service = HttpsService("gateway", env, port=port, logfile=logs / f"gateway-tls-{port}.log", ca=certs.ca)
    service.start()
    yield service
    stop_cleanly(service)


def _photo() -> Photo:
    return Photo(image=JpegMaker(20_000).make(), captured_at=now_rfc3339())


def test_a_device_uploads_over_https_verified_against_the_site_ca(gateway: HttpsService, certs: SiteCertificates,
                                                                 site: Site) -> None:
    client = DeviceClient(gateway.url, "cam-tls", device_token(DEVICE_SECRET, "cam-tls"), ca_file=str(certs.ca))
    first, second = client.upload(_photo()), client.upload(_photo())
    client.close()
    assert (first.status, second.status) == (201, 201), (first.detail, second.detail)
    assert len(site.drain()) == 2


def test_nothing_is_answered_in_clear(gateway: HttpsService) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://127.0.0.1:{gateway.port}/v1/photos", data=b"{}", timeout=10,
                      headers={"Authorization": f"Bearer {device_token(DEVICE_SECRET, 'cam-tls')}"})


def test_a_gateway_the_site_ca_did_not_sign_is_not_trusted(gateway: HttpsService, tmp_path: Path) -> None:
    stranger = make_site_certificates(tmp_path, ca_name="another CA")
    for ca_file in (None, str(stranger.ca)):  # the system's CAs, and a CA that did not sign it
        client = DeviceClient(gateway.url, "cam-tls", device_token(DEVICE_SECRET, "cam-tls"), ca_file=ca_file)
        result = client.upload(_photo(), max_attempts=1)
        assert (result.accepted, result.status) == (False, 0)
        assert "CERTIFICATE_VERIFY_FAILED" in result.detail, result.detail


def test_the_fleet_verifies_the_gateway_too(gateway: HttpsService, certs: SiteCertificates, site: Site) -> None:
    plan = FleetPlan(gateway=gateway.url, devices=4, per_minute=60, duration_s=2, size=20_000, ca_file=str(certs.ca),
                     seed=7)
    report = Fleet(plan, secret=DEVICE_SECRET).run()
    assert report["failed"] == 0 and report["accepted"] == report["sent"] > 0, report["statuses"]
    env = {**os.environ, "PHOTOFERRY_GATEWAY_URL": gateway.url, "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET,
           "PHOTOFERRY_GATEWAY_CA_FILE": str(certs.ca)}
    command = subprocess.run([sys.executable, "-m", "services.cli", "fleet", "--devices", "2", "--per-minute", "60",
                              "--duration", "2s", "--size", "20KB"], env=env, capture_output=True, text=True,
                             timeout=120, check=False)
    assert command.returncode == 0, command.stdout + command.stderr
    assert json.loads(command.stdout)["failed"] == 0
    site.drain()


def test_a_renewed_certificate_is_served_without_a_restart(gateway: HttpsService, certs: SiteCertificates,
                                                          tmp_path: Path) -> None:
    renewed = make_site_certificates(tmp_path, ca_name="the site's renewed CA")
    staged = tmp_path / "staged"
    staged.mkdir()
    # As a Kubernetes Secret volume updates: the new files appear whole, by rename.
    for source, target in ((renewed.cert, certs.cert), (renewed.key, certs.key)):
        shutil.copy(source, staged / target.name)
        os.replace(staged / target.name, target)
    renewed_context = ssl.create_default_context(cafile=str(renewed.ca))

    def serves_the_renewed_one() -> bool:
        urllib.request.urlopen(f"{gateway.url}/healthz", timeout=2, context=renewed_context).close()
        return True

    wait_until(serves_the_renewed_one, timeout=RELOAD_CHECK_S * 2 + 5, what="the renewed certificate")
    assert gateway.process is not None and gateway.process.poll() is None
    gateway.context = renewed_context  # for the fixture's own stop and probes
    assert "TLS certificate loaded again" in gateway.log_tail(20_000)


def test_a_certificate_that_cannot_be_loaded_stops_the_start_naming_the_settings(site: Site, tmp_path: Path) -> None:
    port = free_port()
    env = site.env(PHOTOFERRY_GATEWAY_PORT=str(port), PHOTOFERRY_GATEWAY_TLS_CERT=str(tmp_path / "missing.pem"),
                   PHOTOFERRY_GATEWAY_TLS_KEY=str(tmp_path / "missing.key"))
    service = ServiceProcess("gateway", env, port=port, logfile=tmp_path / "gateway.log")
    service.start(wait="none")
    assert service.process is not None
    assert service.process.wait(timeout=30) != 0
    assert "PHOTOFERRY_GATEWAY_TLS_CERT" in service.log_tail()


def test_the_gateway_tls_component_mounts_the_secret_and_probes_over_https(tmp_path: Path) -> None:
    k3s = REPO / "deploy" / "k3s"
    site = tmp_path / "site"
    site.mkdir()
    (site / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(k3s / "examples" / "site", site)],
        "components": [os.path.relpath(k3s / "components" / "gateway-tls", site)],
    }))
    rendered = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "kustomize", str(site)],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    gateway = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway")
    kubernetes_validate.validate(gateway, "1.31.0", strict=True)
    pod = gateway["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "gateway")
    env = {e["name"]: e.get("value") for e in container["env"]}
    volume = next(v for v in pod["volumes"] if v["name"] == "gateway-tls")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "gateway-tls")
    assert volume["secret"]["secretName"] == "gateway-tls" and mount["readOnly"] is True
    assert env["PHOTOFERRY_GATEWAY_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
    assert env["PHOTOFERRY_GATEWAY_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert gateway["metadata"]["namespace"] == "photoferry"
