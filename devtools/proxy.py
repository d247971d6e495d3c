"""A byte-counting TCP proxy that can also misbehave, as links do.

Put it in front of the remote S3 to see what crosses the uplink, or between the
services and the broker to hurt that link. It records, in 10 ms buckets, the
bytes clients send upstream (requests and bodies: the egress a site pays for),
and on command it can

- cut the link: drop every connection and refuse new ones;
- slow it down: a link slower than the cap (``set_bandwidth``);
- delay it: every chunk, both ways, arrives ``set_latency`` seconds late;
- go half-open (``set_blackhole``): connections stay up but nothing gets through
  either way, as when packets vanish on the path. TCP keeps what was sent and
  delivers it once the path heals (so the bytes are held here, not dropped);
  until then only the clients' own timeouts and heartbeats notice.

It runs in a process of its own, so whoever reads its figures cannot delay its
reading (a delayed read would show as a burst the client never made);
``CountingProxy`` starts it and talks to its small control API.

    proxy = CountingProxy("127.0.0.1", 9100).start()
    ...
    peak_rate(proxy.buckets(), window_s=1.0)   # worst bytes/s over any 1 s window

    python -m devtools.proxy --target 127.0.0.1:9100 --port 9200 --control-port 9201
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from aiohttp import web

from devtools.servers import REPO, free_port, wait_until

BUCKET_S = 0.01
# An HTTP/1.1 request line in the client's stream (bodies of random bytes never spell one).
REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) /\S* HTTP/1\.1\r\n")


class CountingProxy:
    """Handle on a proxy process."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target = f"{target_host}:{target_port}"
        self.listen_host = listen_host  # where clients reach it (its control API stays on loopback)
        self.port = free_port()
        self.control_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def start(self) -> CountingProxy:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devtools.proxy", "--target", self.target, "--host", self.listen_host,
             "--port", str(self.port), "--control-port", str(self.control_port)], cwd=REPO, start_new_session=True,
        )
        wait_until(lambda: self._call("GET", "counts") is not None, timeout=20, what="the proxy")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def cut(self) -> None:
        """The link goes down: connections are dropped, new ones refused."""
        self._call("POST", "cut")

    def restore(self) -> None:
        """The link comes back, on the same port."""
        self._call("POST", "restore")

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Make the link this slow upstream (None: as fast as loopback)."""
        self._call("POST", "bandwidth", {"bytes_per_s": bytes_per_s})

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk, both ways, by ``seconds`` (0: none)."""
        self._call("POST", "latency", {"seconds": seconds})

    def set_blackhole(self, on: bool) -> None:
        """Half-open: keep connections up but let nothing through (False: heal)."""
        self._call("POST", "blackhole", {"on": on})

    def reset(self) -> None:
        self._call("POST", "reset")

    def buckets(self) -> dict[float, int]:
        """Bytes sent upstream per 10 ms bucket, keyed by the bucket's start (seconds)."""
        return {float(k): v for k, v in self._call("GET", "counts").items()}

    def total(self) -> int:
        return sum(self.buckets().values())

    def requests(self) -> dict[str, int]:
        """HTTP requests clients sent through the proxy, by method."""
        return dict(self._call("GET", "requests"))

    def _call(self, method: str, path: str, body: object = None):  # type: ignore[no-untyped-def]
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.control_port}/{path}", data=data,
                                         method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


class _Proxy:
    """The proxy itself (in its own process)."""

    def __init__(self, target: tuple[str, int], host: str, port: int) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.counts: Counter[int] = Counter()
        self.requests: Counter[str] = Counter()
        self.bandwidth: float | None = None
        self.latency = 0.0
        self.flowing = asyncio.Event()  # cleared while the path is a black hole
        self.flowing.set()
        self._link_free_at = 0.0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(self._uplink(client_reader, upstream_writer),
                             self._pipe(upstream_reader, client_writer), return_exceptions=True)
        for writer in (client_writer, upstream_writer):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _uplink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server: counted as it leaves the client, as an uplink would see it.

        Forwarding is decoupled from reading, so a server that stalls (moto does,
        while it assembles an upload) does not hold bytes in the client's socket
        buffer and release them later as a burst the client never made. The far
        side of a real uplink buffers the same way.
        """
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        forward = asyncio.create_task(self._forward(queue, writer))
        tail = b""  # the end of the last chunk: a request line may straddle two
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    seen = tail + data
                    for match in REQUEST_LINE.finditer(seen):
                        if match.end() > len(tail):
                            self.requests[match.group(1).decode()] += 1
                    tail = seen[-256:]
                    if self.bandwidth:
                        # A slow link: one link shared by every connection, each chunk in turn.
                        now = time.monotonic()
                        self._link_free_at = max(now, self._link_free_at) + len(data) / self.bandwidth
                        await asyncio.sleep(self._link_free_at - now)
                    self.counts[int(time.monotonic() / BUCKET_S)] += len(data)
                    queue.put_nowait((time.monotonic() + self.latency, data))
        finally:
            queue.put_nowait((0.0, b""))
            await forward

    async def _forward(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                due, data = await queue.get()
                if not data:
                    break
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to client: delayed and swallowed like the uplink, not counted."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        forward = asyncio.create_task(self._forward(queue, writer))
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    queue.put_nowait((time.monotonic() + self.latency, data))
        finally:
            queue.put_nowait((0.0, b""))
            await forward


def _control_app(proxy: _Proxy) -> web.Application:
    async def counts(request: web.Request) -> web.Response:
        return web.json_response({f"{k * BUCKET_S:.2f}": v for k, v in proxy.counts.items()})

    async def reset(request: web.Request) -> web.Response:
        proxy.counts.clear()
        proxy.requests.clear()
        return web.json_response({})

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(dict(proxy.requests))

    async def cut(request: web.Request) -> web.Response:
        await proxy.cut()
        return web.json_response({})

    async def restore(request: web.Request) -> web.Response:
        if proxy._server is None:
            await proxy.listen()
        return web.json_response({})

    async def bandwidth(request: web.Request) -> web.Response:
        proxy.bandwidth = (await request.json())["bytes_per_s"]
        return web.json_response({})

    async def latency(request: web.Request) -> web.Response:
        proxy.latency = float((await request.json())["seconds"])
        return web.json_response({})

    async def blackhole(request: web.Request) -> web.Response:
        if (await request.json())["on"]:
            proxy.flowing.clear()
        else:
            proxy.flowing.set()
        return web.json_response({})

    app = web.Application()
    app.add_routes([web.get("/counts", counts), web.get("/requests", requests), web.post("/reset", reset),
                    web.post("/cut", cut),
                    web.post("/restore", restore), web.post("/bandwidth", bandwidth),
                    web.post("/latency", latency), web.post("/blackhole", blackhole)])
    return app


async def _main(target: tuple[str, int], host: str, port: int, control_port: int) -> None:
    proxy = _Proxy(target, host, port)
    await proxy.listen()
    runner = web.AppRunner(_control_app(proxy))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    await asyncio.Event().wait()


def peak_rate(buckets: dict[float, int], window_s: float) -> float:
    """The most bytes per second seen over any window of ``window_s`` (sliding, 10 ms steps)."""
    if not buckets:
        return 0.0
    width = round(window_s / BUCKET_S)
    first = round(min(buckets) / BUCKET_S)
    last = round(max(buckets) / BUCKET_S)
    series = [0] * (last - first + 1)
    for start, count in buckets.items():
        series[round(start / BUCKET_S) - first] += count
    running = sum(series[:width])
    best = running
    for i in range(width, len(series)):
        running += series[i] - series[i - width]
        best = max(best, running)
    return best / window_s


def mean_rate(buckets: dict[float, int], *, trim_s: float = 0.0) -> float:
    """Bytes per second from the first byte to the last (``trim_s`` cut from each end)."""
    if not buckets:
        return 0.0
    start, end = min(buckets) + trim_s, max(buckets) + BUCKET_S - trim_s
    if end <= start:
        return 0.0
    sent = sum(count for at, count in buckets.items() if start <= at < end)
    return sent / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the server behind the proxy")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    asyncio.run(_main((host, int(port)), args.host, args.port, args.control_port))


if __name__ == "__main__":
    main()
