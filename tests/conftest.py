"""Real servers for the suite: one RabbitMQ node and two S3-protocol servers per session.

Each test module gets a ``Site`` of its own (a vhost and buckets), so modules do
not see each other's messages or objects.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.proxy import CountingProxy
from devtools.servers import RabbitNode, S3Server, ServiceProcess, free_port
from tests.helpers import DEVICE_SECRET, Site


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def rabbit(servers_dir: Path) -> Iterator[RabbitNode]:
    node = RabbitNode(servers_dir / "rabbitmq")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def local_s3(servers_dir: Path) -> Iterator[S3Server]:
    server = S3Server(servers_dir / "local-s3")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def remote_s3(servers_dir: Path) -> Iterator[S3Server]:
    server = S3Server(servers_dir / "remote-s3")
    server.start()
    yield server
    server.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:30]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a test module's services write their logs."""
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def proxy(remote_s3: S3Server) -> Iterator[CountingProxy]:
    """A byte-counting proxy in front of the remote S3, for one test module."""
    proxy = CountingProxy("127.0.0.1", remote_s3.port).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which local store a module's site uses: ``s3`` (the S3-protocol server) unless the module
    parametrizes it (``pytestmark = EITHER_STORE``) to run against the embedded store too."""
    return str(getattr(request, "param", "s3"))


EITHER_STORE = pytest.mark.parametrize("store_kind", ["s3", "file"], indirect=True, scope="module")


def _embedded_store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the embedded store on a file system of its own when there is one (/dev/shm):
    the store counts its disk's fill, and the machine's own disk may be past a test's watermarks."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="photoferry-store-", dir=shm))
        _shm_roots.append(root)
        return root
    return tmp_path_factory.mktemp("embedded-store")


_shm_roots: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _remove_shm_roots() -> Iterator[None]:
    yield
    for root in _shm_roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest, rabbit: RabbitNode, local_s3: S3Server,
         remote_s3: S3Server, store_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """A fresh vhost and fresh buckets for one test module."""
    name = f"{_slug(request.module.__name__.rsplit('.', 1)[-1])}-{uuid.uuid4().hex[:6]}"
    rabbit.add_vhost(name)
    store_root = _embedded_store_root(tmp_path_factory) if store_kind == "file" else None
    site = Site(name=name, rabbit=rabbit, amqp_url=rabbit.url_for(name), local=local_s3,
                remote=remote_s3, store_bucket=f"st-{name}", remote_bucket=f"rm-{name}", store_root=store_root)
    site.create_buckets()
    return site


def start_service(name: str, env: dict[str, str], logdir: Path) -> ServiceProcess:
    """Start one of our services on a free port and wait until it answers ``/readyz``."""
    port = free_port()
    service = ServiceProcess(name, {**env, f"PHOTOFERRY_{name.upper()}_PORT": str(port)},
                             port=port, logfile=logdir / f"{name}-{port}.log")
    service.start()
    return service


def stop_cleanly(service: ServiceProcess) -> None:
    """Stop a service with SIGTERM and insist that it exits by itself, with status 0."""
    status = service.stop()
    assert status == 0, f"{service.name} exited with {status} on SIGTERM:\n{service.log_tail()}"


@pytest.fixture(scope="module")
def gateway(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = start_service("gateway", site.env(), tmp_path_factory.mktemp("logs"))
    yield service
    stop_cleanly(service)


__all__ = ["DEVICE_SECRET"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``s3_store_only`` does not depend on the local store's kind (or only the
    S3-protocol store has what it checks): it runs once, on the S3-protocol store."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_file = callspec is not None and callspec.params.get("store_kind") == "file"
        (dropped if on_file and item.get_closest_marker("s3_store_only") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
