"""A site's uplink with a real bottleneck, on one machine: network namespaces, a router, a queue.

    site (10.77.1.2) ──veth── router ──veth── internet (10.77.2.2)
                                 └─ tbf on its way out to the internet: the site's uplink

Three network namespaces (``pfu<pid>-site``, ``-router``, ``-inet``) joined by veth
pairs; the router forwards, and its egress towards the internet is a token-bucket
queue (``tc qdisc ... tbf rate 40mbit burst 64kb latency 80ms``: the site's
200 Mbit/s scaled by 1/5 to fit two cores). The queue sits on the router, as a
site router's buffer does, not on the sending host, where TCP small queues would
keep it short. Real kernel TCP on both sides, real queueing delay (no netem here).

On the internet side: the remote S3 stand-in (moto) behind a byte-counting proxy
(what crosses the uplink towards S3, in 10 ms buckets), a traffic ``Sink`` and an
``Echo`` server. On the site side: the site itself (broker, local store and the
services, ``devtools.site.PrivateSite``), the farm's traffic (``FarmUpload``: bulk
TCP uploads to the sink, started and stopped) and the farm's people
(``Pinger``: 64 bytes to the echo server every 50 ms, the latency they feel).

Addresses exist only inside the namespaces the bed makes. Everything it made is
removed when it stops, also on SIGTERM or Ctrl-C, and what a killed run left (its
namespaces and whatever still runs in them, its folder) is removed by the next.
Needs root, and ``ip``/``tc`` (``devtools/system-deps.sh iproute2``).

    with site_on_uplink(cap="1MB", settings={"PHOTOFERRY_SHIP_CEILING": "4.5MB"}) as rig:
        rig.farm.start(); ...; rig.farm.stop()
        rig.shipper_buckets(), rig.sink.buckets(), rig.pinger.samples
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from devtools.netns import call_in, inside, remove_netns, remove_stale_namespaces, run, thread_in
from devtools.proxy import BUCKET_S, CountingProxy
from devtools.servers import S3Server, wait_until
from devtools.site import ADMIN_TOKEN, DEVICE_SECRET, PREFIX, REMOTE_BUCKET, ExternalRemote, PrivateSite
from services.common import photos
from services.common.tokens import device_token
from services.devices.client import DeviceClient, Photo
from services.devices.jpegs import JpegMaker

BED_PREFIX = "pfu"  # namespaces pfu<pid>-site, -router, -inet; folders photoferry-uplink-<pid>-*
SITE_ADDRESS, ROUTER_LAN = "10.77.1.2", "10.77.1.1"
INTERNET_ADDRESS, ROUTER_WAN = "10.77.2.2", "10.77.2.1"
SINK_PORT, ECHO_PORT = 5001, 5002
LINK_RATE = "40mbit"
CHUNK = 65536
PING_EVERY_S = 0.05
PING_BYTES = 64
PING_TIMEOUT_S = 1.0
# Devices here send a backlog at once: no per-device limit in the way.
SITE_SETTINGS = {"PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE": "1000000", "PHOTOFERRY_DEVICE_BURST": "1000000",
                 "PHOTOFERRY_DEVICE_MAX_INFLIGHT": "8"}


def uplink_bytes_per_s(rate: str) -> float:
    """A tc rate (``40mbit``, ``5mbps``...) in bytes per second."""
    match = re.fullmatch(r"([0-9.]+)(k|m|g)?(bit|bps)", rate.strip().lower())
    if not match:
        raise ValueError(f"{rate!r} is not a tc rate such as 40mbit")
    number, prefix, unit = match.groups()
    value = float(number) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[prefix]
    return value / 8 if unit == "bit" else value


class UplinkBed:
    """The three namespaces, their links, and the queue on the router's way out."""

    def __init__(self, *, rate: str = LINK_RATE, burst: str = "64kb", latency: str = "80ms") -> None:
        self.rate, self.burst, self.latency = rate, burst, latency
        tag = f"{BED_PREFIX}{os.getpid()}"
        self.site, self.router, self.internet = f"{tag}-site", f"{tag}-router", f"{tag}-inet"
        self.namespaces: list[str] = []

    def start(self) -> UplinkBed:
        if os.geteuid() != 0:
            raise PermissionError("the uplink bed needs root (network namespaces, tc)")
        remove_leftovers()
        for name in (self.site, self.router, self.internet):
            run("ip", "netns", "add", name)
            self.namespaces.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        for inside_ns, outside_ns, router_end, address, gateway, router_address in (
                (self.site, "lan", "lan", SITE_ADDRESS, ROUTER_LAN, ROUTER_LAN),
                (self.internet, "wan", "wan", INTERNET_ADDRESS, ROUTER_WAN, ROUTER_WAN)):
            run("ip", "link", "add", "eth0", "netns", inside_ns, "type", "veth", "peer", "name", outside_ns,
                "netns", self.router)
            run("ip", "-n", inside_ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", inside_ns, "link", "set", "eth0", "up")
            run("ip", "-n", inside_ns, "route", "add", "default", "via", gateway)
            run("ip", "-n", self.router, "addr", "add", f"{router_address}/24", "dev", router_end)
            run("ip", "-n", self.router, "link", "set", router_end, "up")
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The uplink: the router's queue towards the internet.
        run("tc", "-n", self.router, "qdisc", "add", "dev", "wan", "root", "tbf", "rate", self.rate,
            "burst", self.burst, "latency", self.latency)
        return self

    def queue_stats(self) -> dict[str, int]:
        """What the uplink's queue has sent and dropped so far."""
        out = run("tc", "-n", self.router, "-s", "qdisc", "show", "dev", "wan").stdout
        sent = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+)", out)
        return {"sent_bytes": int(sent.group(1)), "sent_packets": int(sent.group(2)),
                "dropped_packets": int(sent.group(3))} if sent else {}

    def stop(self) -> None:
        for name in reversed(self.namespaces):
            remove_netns(name)
        self.namespaces.clear()


def remove_leftovers() -> list[str]:
    """Remove what a bed that was killed left: its namespaces (and what runs in them), its folders."""
    removed = remove_stale_namespaces(BED_PREFIX)
    for folder in Path(tempfile.gettempdir()).glob("photoferry-uplink-*"):
        match = re.fullmatch(r"photoferry-uplink-(\d+)-.*", folder.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


# -- traffic -----------------------------------------------------------------------------------------


class _Server:
    """A TCP server on the internet side; each connection served by a thread of its own."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stopping = False
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=type(self).__name__, daemon=True).start()

    @classmethod
    def listen(cls, host: str, port: int) -> Any:
        """Listen on ``host:port`` (call it inside the namespace that has the address)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        return cls(sock)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=self._serve_and_close, args=(connection,), daemon=True).start()

    def _serve_and_close(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.serve(connection)
        with self._lock:
            self._connections.discard(connection)
        connection.close()

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


class Sink(_Server):
    """Reads and discards; counts what arrived in 10 ms buckets (as the proxy counts the shipper's)."""

    def __init__(self, sock: socket.socket) -> None:
        self._counts: Counter[int] = Counter()
        super().__init__(sock)

    def serve(self, connection: socket.socket) -> None:
        while data := connection.recv(CHUNK):
            self._counts[int(time.monotonic() / BUCKET_S)] += len(data)

    def buckets(self) -> dict[float, int]:
        return {k * BUCKET_S: v for k, v in list(self._counts.items())}


class Echo(_Server):
    """Sends back what it reads, at once."""

    def serve(self, connection: socket.socket) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := connection.recv(4096):
            connection.sendall(data)


class FarmUpload:
    """The farm's bulk upload: TCP connections to the sink sending as fast as the link lets them."""

    def __init__(self, namespace: str, *, host: str = INTERNET_ADDRESS, port: int = SINK_PORT,
                 connections: int = 1) -> None:
        self.namespace, self.host, self.port, self.connections = namespace, host, port, connections
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        self._stop.clear()
        self._threads = [thread_in(self.namespace, self._send, thread_name=f"farm-upload-{n}")
                         for n in range(self.connections)]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _send(self) -> None:
        payload = b"\0" * CHUNK
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=10) as sock:
            while not self._stop.is_set():
                sock.sendall(payload)


class Pinger:
    """The farm's people: a small request every 50 ms to the echo server, and how long its answer took."""

    def __init__(self, namespace: str, *, host: str = INTERNET_ADDRESS, port: int = ECHO_PORT) -> None:
        self.namespace, self.host, self.port = namespace, host, port
        self.samples: list[tuple[float, float]] = []  # (when sent, round trip in seconds; the timeout if lost)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = thread_in(self.namespace, self._run, thread_name="pinger")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def between(self, start: float, end: float) -> list[float]:
        return [rtt for when, rtt in self.samples if start <= when < end]

    def _run(self) -> None:
        sock: socket.socket | None = None
        payload = b"p" * PING_BYTES
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if sock is None:
                    sock = socket.create_connection((self.host, self.port), timeout=PING_TIMEOUT_S)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sent = time.monotonic()
                sock.sendall(payload)
                got = 0
                while got < PING_BYTES:
                    chunk = sock.recv(PING_BYTES - got)
                    if not chunk:
                        raise ConnectionError("the echo server closed the connection")
                    got += len(chunk)
                self.samples.append((sent, time.monotonic() - sent))
            except OSError:
                self.samples.append((sent, PING_TIMEOUT_S))  # lost: as late as it could be
                if sock is not None:
                    sock.close()
                sock = None
            next_at = max(next_at + PING_EVERY_S, time.monotonic())
            self._stop.wait(next_at - time.monotonic())
        if sock is not None:
            sock.close()


# -- a site on the bed -------------------------------------------------------------------------------


@dataclass
class UplinkSite:
    """The bed with a site on one side and S3, the sink and the echo server on the other."""

    bed: UplinkBed
    site: PrivateSite
    remote: S3Server
    proxy: CountingProxy  # in front of the remote, on the internet side: what the shipper got across
    sink: Sink
    echo: Echo
    farm: FarmUpload
    pinger: Pinger

    @property
    def link_bytes_per_s(self) -> float:
        return uplink_bytes_per_s(self.bed.rate)

    def shipper_buckets(self) -> dict[float, int]:
        """Bytes that crossed the uplink to S3, in 10 ms buckets."""
        return call_in(self.bed.internet, self.proxy.buckets)

    def operator(self, method: str, path: str, body: object = None) -> Any:
        """Call the store keeper's operator API (from the site, where it listens)."""
        response = requests.request(method, f"{self.site.services['store'].url}{path}", json=body, timeout=10,
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        response.raise_for_status()
        return response.json()

    def shipper_status(self) -> dict[str, Any]:
        return requests.get(f"{self.site.services['shipper'].url}/status", timeout=5).json()  # type: ignore[no-any-return]

    def ledger(self, ids: list[str]) -> dict[str, int]:
        """Nothing lost or shipped twice: of the photos ``ids``, those marked shipped against those in S3,
        and how many the shipper's log says it uploaded twice."""
        async def markers() -> set[str]:
            return {item["path"] async for page in self.site.local_store().list(photos.SHIPPED_PREFIX)
                    for item in page}

        shipped = asyncio.run(markers())
        in_s3 = {item["Key"].removeprefix(PREFIX) for page in self.site.remote_client().get_paginator(
            "list_objects_v2").paginate(Bucket=REMOTE_BUCKET, Prefix=PREFIX + photos.PHOTOS_PREFIX)
            for item in page.get("Contents", [])}
        marked = {photos.object_key(i) for i in ids if photos.shipped_marker_key(i) in shipped}
        uploads = self.site.uploads_per_photo()
        return {"photos": len(ids), "in_s3": len(in_s3), "marked_shipped": len(marked),
                "marked_but_not_in_s3": len(marked - in_s3), "in_s3_but_not_marked": len(in_s3 - marked),
                "uploaded_twice": sum(1 for n in uploads.values() if n > 1),
                "uploaded_not_ours": len(set(uploads) - set(ids))}

    def fill_backlog(self, total_bytes: int, *, photo_bytes: int = 250_000, devices: int = 16,
                     seed: int = 18) -> list[str]:
        """Upload photos of about ``photo_bytes`` through the gateway until ``total_bytes`` are stored;
        their ids. Pause shipping first for a backlog that waits."""
        rng = random.Random(seed)
        maker = JpegMaker(photo_bytes, rng=rng)
        count = max(1, total_bytes // photo_bytes)
        gateway = self.site.services["gateway"].url

        def send(device: int) -> list[str]:
            name = f"uplink-cam-{device:03d}"
            client = DeviceClient(gateway, name, device_token(DEVICE_SECRET, name), fmt="msgpack")
            ids = []
            try:
                for n in range(device, count, devices):
                    captured = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_700_000_000 + n))
                    result = client.upload(Photo(image=maker.make(photo_bytes), captured_at=captured + "Z"),
                                           max_attempts=5)
                    if not result.accepted or result.photo_id is None:
                        raise RuntimeError(f"the gateway refused a photo: {result.detail}")
                    ids.append(result.photo_id)
            finally:
                client.close()
            return ids

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            return [photo_id for ids in pool.map(send, range(devices)) for photo_id in ids]


@contextlib.contextmanager
def site_on_uplink(*, cap: str, settings: dict[str, str] | None = None, rate: str = LINK_RATE,
                   store: str = "file") -> Iterator[UplinkSite]:
    """Stand up the bed and a site on it; the calling thread runs inside the site's namespace for the block
    (so the site's services answer on 127.0.0.1), and everything is removed after it."""
    previous = _exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix=f"photoferry-uplink-{os.getpid()}-"))
    bed = UplinkBed(rate=rate)
    stops: list[Any] = []
    try:
        bed.start()
        remote = S3Server(workdir / "remote-s3")
        call_in(bed.internet, remote.start)
        stops.append(remote.stop)
        proxy = CountingProxy("127.0.0.1", remote.port, listen_host=INTERNET_ADDRESS)
        call_in(bed.internet, proxy.start)
        stops.append(proxy.stop)
        sink = call_in(bed.internet, Sink.listen, INTERNET_ADDRESS, SINK_PORT)
        echo = call_in(bed.internet, Echo.listen, INTERNET_ADDRESS, ECHO_PORT)
        stops += [sink.stop, echo.stop]
        site = PrivateSite(workdir, cap=cap, store=store, settings={**SITE_SETTINGS, **(settings or {})},
                           remote=ExternalRemote(proxy.endpoint, remote.access_key, remote.secret_key))
        farm, pinger = FarmUpload(bed.site), Pinger(bed.site)
        stops += [farm.stop, pinger.stop]
        with inside(bed.site):
            try:
                site.start()
                wait_until(lambda: site.services["shipper"].ready(), timeout=30, what="the shipper")
                yield UplinkSite(bed, site, remote, proxy, sink, echo, farm, pinger)
            finally:
                site.stop()
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):  # the rest must go too
                stop()
        bed.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm() -> Any:
    """Make SIGTERM unwind like Ctrl-C, so the bed is removed (main thread only; returns what to restore)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, leave)
