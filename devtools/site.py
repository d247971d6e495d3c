"""A private photoferry site as processes: broker, local store, remote stand-in, proxies, the services.

For the chaos suite and the site benchmark: every part is its own process on free
ports, so it can be killed, frozen or measured. The services reach the broker and
the remote S3 through proxies (``devtools.proxy``), which can make those links
slow, cut or half-open, and count what crosses the uplink. On the uplink bed
(``devtools.uplink``) the remote S3 is across a real bottleneck instead, started by
the bed (``ExternalRemote``), and the site reaches it directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtools.proxy import CountingProxy
from devtools.servers import REPO, RabbitNode, S3Server, ServiceProcess, free_port
from services.common import photos, topology
from services.common.config import StoreSettings
from services.common.localstore import LocalStore
from services.common.s3 import ensure_bucket, s3_client

DEVICE_SECRET = "site-device-secret"
ADMIN_TOKEN = "site-admin-token"
STORE_BUCKET = "site-store"
REMOTE_BUCKET = "site-remote"
PREFIX = "site/"
SERVICES = ("gateway", "store", "shipper")


@dataclass(frozen=True)
class ExternalRemote:
    """A remote S3 that runs elsewhere (across the uplink bed), reached at ``endpoint``."""

    endpoint: str
    access_key: str
    secret_key: str


class PrivateSite:
    """A private site: broker, stores, proxies and services, each of which can be made to fail."""

    def __init__(self, workdir: Path, *, cap: str = "4MB", settings: dict[str, str] | None = None,
                 store: str = "s3", code: Path = REPO, remote: ExternalRemote | None = None) -> None:
        self.workdir = workdir
        self.code = code  # the checkout whose services run
        self.settings = settings or {}  # PHOTOFERRY_* variables for the services, over the defaults below
        self.rabbit = RabbitNode(workdir / "rabbitmq")
        # The site's local store: an S3-protocol server, or the embedded store in a folder ("file").
        self.store_root = workdir / "store" if store == "file" else None
        self.local = S3Server(workdir / "local-s3")
        self.remote = S3Server(workdir / "remote-s3")
        self.external_remote = remote  # then self.remote is not started, and no proxy stands before it
        self.cap = cap
        self.broker_link: CountingProxy | None = None
        self.s3_link: CountingProxy | None = None
        self.services: dict[str, ServiceProcess] = {}

    def start(self) -> None:
        self.rabbit.start()
        if self.store_root is None:
            self.local.start()
        self.broker_link = CountingProxy("127.0.0.1", self.rabbit.amqp_port).start()
        if self.external_remote is None:
            self.remote.start()
            self.s3_link = CountingProxy("127.0.0.1", self.remote.port).start()
        asyncio.run(self.local_store().ensure_bucket())
        ensure_bucket(self.remote_client(), REMOTE_BUCKET)
        env = self.env()
        for name in SERVICES:
            port = free_port()
            service = ServiceProcess(name, {**env, f"PHOTOFERRY_{name.upper()}_PORT": str(port)}, port=port,
                                     logfile=self.workdir / "logs" / f"{name}.log", code=self.code)
            service.start(timeout=60)
            self.services[name] = service

    def env(self) -> dict[str, str]:
        assert self.broker_link is not None
        remote = self._remote_reached()
        return {
            **os.environ,
            "PHOTOFERRY_AMQP_URL": f"amqp://{self.rabbit.user}:{self.rabbit.password}@127.0.0.1:{self.broker_link.port}/",
            "PHOTOFERRY_STORE_ENDPOINT": self.store_endpoint,
            "PHOTOFERRY_STORE_ACCESS_KEY": self.local.access_key,
            "PHOTOFERRY_STORE_SECRET_KEY": self.local.secret_key,
            "PHOTOFERRY_STORE_BUCKET": STORE_BUCKET,
            "PHOTOFERRY_S3_ENDPOINT": remote.endpoint,
            "PHOTOFERRY_S3_BUCKET": REMOTE_BUCKET,
            "PHOTOFERRY_S3_PREFIX": PREFIX,
            "AWS_ACCESS_KEY_ID": remote.access_key,
            "AWS_SECRET_ACCESS_KEY": remote.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET,
            "PHOTOFERRY_ADMIN_TOKEN": ADMIN_TOKEN,
            "PHOTOFERRY_SHIP_RATE": self.cap,
            "PHOTOFERRY_RECONCILE_EVERY": "5s",
            "PHOTOFERRY_SHUTDOWN_TIMEOUT": "5s",
            "PHOTOFERRY_PUBLISH_TIMEOUT": "3s",
            "PHOTOFERRY_STORE_TIMEOUT": "3s",
            "PHOTOFERRY_S3_TIMEOUT": "5s",
            "PHOTOFERRY_RETRY_AFTER": "1",
            "PHOTOFERRY_LOG_FORMAT": "json",
            "OTEL_SDK_DISABLED": "true",
            **self.settings,
        }

    @property
    def store_endpoint(self) -> str:
        return f"file://{self.store_root}" if self.store_root is not None else self.local.endpoint

    def local_store(self) -> LocalStore:
        return LocalStore(StoreSettings(self.store_endpoint, self.local.access_key, self.local.secret_key,
                                        STORE_BUCKET, "us-east-1", 30))

    def remote_client(self):  # type: ignore[no-untyped-def]
        remote = self.external_remote or self.remote
        return s3_client(remote.endpoint, access_key=remote.access_key, secret_key=remote.secret_key,
                         region="us-east-1")

    def _remote_reached(self) -> ExternalRemote:
        """The remote S3 as the services reach it: across the bed, or through the site's proxy."""
        if self.external_remote is not None:
            return self.external_remote
        assert self.s3_link is not None
        return ExternalRemote(self.s3_link.endpoint, self.remote.access_key, self.remote.secret_key)

    def inject(self, fault: str) -> Callable[[], None]:
        """Start ``fault``; return what heals it."""
        assert self.broker_link is not None and self.s3_link is not None
        if fault.startswith("kill-"):
            target = fault.removeprefix("kill-")
            if target == "broker":
                self.rabbit.kill()
                return self.rabbit.start
            service = self.services[target]
            service.kill()
            return lambda: service.start(wait="alive", timeout=60)
        if fault == "broker-alarm":
            # A resource alarm: the broker takes no new message from anyone until it clears.
            self.rabbit.set_disk_alarm(True)
            return lambda: self.rabbit.set_disk_alarm(False)
        if fault == "remote-stopped":
            assert self.remote.process is not None
            self.remote.process.send_signal(signal.SIGSTOP)
            return lambda: self.remote.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        link = self.broker_link if fault.startswith("broker-") else self.s3_link
        kind = fault.split("-", 1)[1]
        if kind == "latency":
            link.set_latency(0.3)
            return lambda: link.set_latency(0)
        if kind == "cut":
            link.cut()
            return link.restore
        if kind == "half-open":
            link.set_blackhole(True)
            return lambda: link.set_blackhole(False)
        if kind == "slow":
            link.set_bandwidth(200_000)
            return lambda: link.set_bandwidth(None)
        raise ValueError(f"unknown fault {fault!r}")

    def queued(self) -> dict[str, int]:
        """Messages still held for shipping: ready or unacknowledged, on every queue that holds photos."""
        queues = {name: self.rabbit.management("GET", f"queues/%2F/{name}") for name in topology.PHOTO_QUEUES}
        return {name: int(queue.get("messages", 0)) for name, queue in queues.items()}  # type: ignore[union-attr]

    def parked_markers(self) -> int:
        async def count() -> int:
            return sum([len(page) async for page in self.local_store().list(photos.PARKED_PREFIX)])

        return asyncio.run(count())

    def uploads_per_photo(self) -> Counter[str]:
        """How often the shipper logs said a photo was uploaded (across restarts)."""
        counts: Counter[str] = Counter()
        logfile = self.workdir / "logs" / "shipper.log"
        for line in logfile.read_text(errors="replace").splitlines() if logfile.exists() else []:
            if '"photo shipped"' in line:
                try:
                    counts[json.loads(line)["photo_id"]] += 1
                except (ValueError, KeyError):
                    continue
        return counts

    def pids(self) -> dict[str, int]:
        """The process of each part, for CPU and memory figures."""
        parts = {name: service.process for name, service in self.services.items()}
        parts |= {"rabbitmq": self.rabbit.process, "local store": self.local.process}
        if self.external_remote is None:
            parts["remote S3"] = self.remote.process
        if self.store_root is not None:
            del parts["local store"]  # the embedded store is the services' own
        return {name: process.pid for name, process in parts.items() if process is not None}

    def stop(self) -> None:
        if self.remote.process is not None and self.remote.process.poll() is None:
            self.remote.process.send_signal(signal.SIGCONT)
        for service in self.services.values():
            service.stop(timeout=20)
        for thing in (self.broker_link, self.s3_link):
            if thing is not None:
                thing.stop()
        self.rabbit.stop()
        self.local.stop()
        self.remote.stop()
