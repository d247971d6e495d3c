"""Gateway CPU per accepted upload, side by side with a bare aiohttp floor.

Starts a private RabbitMQ node and an S3-protocol server, the real gateway
(python -m services.gateway, auth on, tracing and logging as in production), the
same gateway serving HTTPS (a site CA's certificate, as the gateway-tls component
gives it; clients keep their connections alive, as devices do) and
two floors (bench/floor.py: the bare handler, and the bare handler that also
writes the image to the store as the gateway does), then offers each the same
250 KB photos, as JSON and as msgpack, at the same fixed rates (open loop: a request every 1/rate seconds,
whatever the answers), in alternating rounds. Each server's CPU time (user +
system, all threads) is read from /proc before and after a phase; the load
generator's, the broker's and the store's are not counted.

All servers get the same rate because CPU per request depends on it: a server
answering fewer requests per wakeup pays more per request. The default rates are
the site's (33/s) and twice that; moto, the S3 stand-in, tops out near 110 uploads
a second here, past which the gateway rightly sheds load with 503.

    python -m bench.gateway_cpu [--rates 33,66] [--seconds 10] [--rounds 3] [--size 250000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import msgpack

from devtools.certs import make_site_certificates
from devtools.servers import RabbitNode, S3Server, ServiceProcess, free_port, wait_until
from services.common.s3 import ensure_bucket, s3_client
from services.common.tokens import device_token

SECRET = "bench-secret"
DEVICE = "cam-bench"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


class Bodies:
    """Unique uploads (each its own capture time, so each is a new photo) of one image."""

    def __init__(self, size: int) -> None:
        self.image = b"\xff\xd8\xff\xe0" + os.urandom(size - 4)
        self.image_b64 = base64.b64encode(self.image).decode()
        self.counter = 0

    def next(self, fmt: str) -> bytes:
        self.counter += 1
        seconds, micros = divmod(self.counter, 1_000_000)
        captured = f"2026-01-01T00:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{micros:06d}Z"
        if fmt == "json":
            return (f'{{"device_id":"{DEVICE}","captured_at":"{captured}",'
                    f'"image":"{self.image_b64}"}}').encode()
        return msgpack.packb({"device_id": DEVICE, "captured_at": captured, "image": self.image})


async def offer(url: str, fmt: str, bodies: Bodies, rate: float, seconds: float,
                tls: ssl.SSLContext | None = None) -> int:
    """Offer ``rate`` uploads a second for ``seconds``; return how many. Every one must be accepted.

    Connections are kept alive and reused, as a device keeps its one connection."""
    headers = {"Content-Type": f"application/{fmt}",
               "Authorization": f"Bearer {device_token(SECRET, DEVICE)}"}
    count = int(rate * seconds)
    bodies_ready = [bodies.next(fmt) for _ in range(count)]
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession, body: bytes) -> None:
        async with session.post(f"{url}/v1/photos", data=body, headers=headers) as response:
            await response.read()
            if response.status != 201:
                failures.append(f"{response.status} {await response.text()}")

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls or True)) as session:
        started = loop.time()
        tasks = []
        for i, body in enumerate(bodies_ready):
            await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(session, body)))
        await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError(f"{url}: {len(failures)} uploads not accepted, e.g. {failures[0]}")
    return count


def measure(pid: int, url: str, fmt: str, bodies: Bodies, rate: float, seconds: float,
            tls: ssl.SSLContext | None = None) -> float:
    """CPU milliseconds per upload at ``rate`` uploads a second."""
    before = cpu_seconds(pid)
    count = asyncio.run(offer(url, fmt, bodies, rate, seconds, tls))
    return (cpu_seconds(pid) - before) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="33,66", help="uploads per second to offer, comma-separated")
    parser.add_argument("--seconds", type=float, default=10, help="length of one phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=250_000, help="image bytes")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="photoferry-bench-"))
    rabbit = RabbitNode(workdir / "rabbitmq")
    store = S3Server(workdir / "store")
    floors: list[subprocess.Popen[bytes]] = []
    gateway = gateway_tls = None
    try:
        print("starting RabbitMQ, the S3-protocol store, the gateway and the floor ...", flush=True)
        rabbit.start()
        store.start()
        ensure_bucket(s3_client(store.endpoint, access_key=store.access_key, secret_key=store.secret_key,
                                region="us-east-1"), "bench")
        certs = make_site_certificates(workdir / "tls")
        tls = ssl.create_default_context(cafile=str(certs.ca))
        gateway_env = {
            **os.environ,
            "PHOTOFERRY_AMQP_URL": rabbit.url,
            "PHOTOFERRY_STORE_ENDPOINT": store.endpoint,
            "PHOTOFERRY_STORE_ACCESS_KEY": store.access_key,
            "PHOTOFERRY_STORE_SECRET_KEY": store.secret_key,
            "PHOTOFERRY_STORE_BUCKET": "bench",
            "PHOTOFERRY_DEVICE_SECRET": SECRET,
            "PHOTOFERRY_LOG_FORMAT": "json",
            # One device sends all of the bench's photos: no per-device limit may get in the way.
            "PHOTOFERRY_DEVICE_PHOTOS_PER_MINUTE": "1000000",
            "PHOTOFERRY_DEVICE_BURST": "1000000",
            "PHOTOFERRY_DEVICE_MAX_INFLIGHT": "1000",
        }
        port = free_port()
        gateway = ServiceProcess("gateway", {**gateway_env, "PHOTOFERRY_GATEWAY_PORT": str(port)}, port=port,
                                 logfile=workdir / "gateway.log")
        gateway.start()
        tls_port = free_port()
        gateway_tls = ServiceProcess("gateway", {**gateway_env, "PHOTOFERRY_GATEWAY_PORT": str(tls_port),
                                                 "PHOTOFERRY_GATEWAY_TLS_CERT": str(certs.cert),
                                                 "PHOTOFERRY_GATEWAY_TLS_KEY": str(certs.key)},
                                     port=tls_port, logfile=workdir / "gateway-tls.log")
        gateway_tls.start(wait="none")
        tls_url = f"https://127.0.0.1:{tls_port}"
        # An error (503 while the broker connects, or no HTTPS) is "not yet" to wait_until.
        wait_until(lambda: urllib.request.urlopen(f"{tls_url}/readyz", timeout=2, context=tls).status == 200,
                   timeout=30, what="the HTTPS gateway")
        floor_env = {**os.environ, "PHOTOFERRY_STORE_ENDPOINT": store.endpoint,
                     "PHOTOFERRY_STORE_ACCESS_KEY": store.access_key,
                     "PHOTOFERRY_STORE_SECRET_KEY": store.secret_key, "PHOTOFERRY_STORE_BUCKET": "bench"}
        assert gateway.process is not None and gateway_tls.process is not None
        servers = {"gateway": (gateway.process.pid, gateway.url), "gateway+tls": (gateway_tls.process.pid, tls_url)}
        for name, extra in (("floor", []), ("floor+store", ["--store"])):
            floor_port = free_port()
            floors.append(subprocess.Popen([sys.executable, "-m", "bench.floor", str(floor_port), *extra],
                                           env=floor_env))
            floor_url = f"http://127.0.0.1:{floor_port}"
            wait_until(lambda url=floor_url: _answers(f"{url}/"), timeout=30, what=name)
            servers[name] = (floors[-1].pid, floor_url)

        bodies = Bodies(args.size)
        rates = [float(r) for r in args.rates.split(",")]
        for name, (pid, url) in servers.items():  # warm up: connections, lazy imports, caches
            for fmt in ("json", "msgpack"):
                measure(pid, url, fmt, bodies, rates[0], 2, tls if name == "gateway+tls" else None)

        results: dict[tuple[float, str, str], list[float]] = {}
        for _ in range(args.rounds):
            for rate in rates:
                for fmt in ("json", "msgpack"):
                    for name, (pid, url) in servers.items():
                        results.setdefault((rate, fmt, name), []).append(
                            measure(pid, url, fmt, bodies, rate, args.seconds, tls if name == "gateway+tls" else None))

        print(f"\n{args.size}-byte images, {args.seconds:g} s per phase, {args.rounds} rounds; "
              "CPU milliseconds per accepted upload, median over rounds\n")
        print(f"{'rate/s':>7} {'format':<8} {'gateway':>9} {'floor':>7} {'ratio':>7} {'floor+store':>12} {'ratio':>7}"
              f" {'gateway+TLS':>12} {'TLS adds':>9}")
        for rate in rates:
            for fmt in ("json", "msgpack"):
                ms = {name: statistics.median(results[(rate, fmt, name)]) for name in servers}
                print(f"{rate:>7g} {fmt:<8} {ms['gateway']:>9.2f} {ms['floor']:>7.2f} "
                      f"{ms['gateway'] / ms['floor']:>6.2f}x {ms['floor+store']:>12.2f} "
                      f"{ms['gateway'] / ms['floor+store']:>6.2f}x {ms['gateway+tls']:>12.2f} "
                      f"{ms['gateway+tls'] / ms['gateway'] - 1:>+8.0%}")
        print("\ngoal: gateway CPU <= 2.0x the floor for JSON, 2.5x for msgpack; "
              "floor+store also writes each image to the store; gateway+TLS serves HTTPS, connections kept alive")
    finally:
        for floor in floors:
            floor.terminate()
            floor.wait()
        for service in (gateway, gateway_tls):
            if service is not None:
                service.stop()
        store.stop()
        rabbit.stop()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        pass  # any HTTP answer means it is up
    return True


if __name__ == "__main__":
    main()
