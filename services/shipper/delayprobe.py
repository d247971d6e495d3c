"""Round trips to the S3 endpoint, as the kernel measures them: the delay the band above the cap watches.

A probe opens a TCP connection to the endpoint's host and port and closes it
again: no request, no TLS, nothing S3 bills. The SYN waits in the same uplink
queue as the uploads, and the peer's kernel answers it at once, so the
handshake's round trip is the path's delay plus its queue, without the server's
time to answer a request. The kernel's own measurement of it (``TCP_INFO``'s
``tcpi_rtt``, in microseconds) is read, not the event loop's, which may be late.
About 150 bytes on the wire a probe, charged to the cap by the caller.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.parse
from typing import Any

TIMEOUT_S = 1.0  # a SYN lost in a full queue is sent again after 1 s: as good as a full queue
RESOLVE_EVERY_S = 60.0
PROBE_BYTES = 150  # SYN, SYN-ACK's ACK and FIN with their headers, upwards
# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones; tcpi_rtt is the 16th of those.
_TCPI_RTT_OFFSET = 8 + 15 * 4
_TCP_INFO_SIZE = _TCPI_RTT_OFFSET + 8


def endpoint_address(url: str) -> tuple[str, int]:
    """The host and port an S3 endpoint URL connects to."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class DelayProbe:
    """Measures the round trip to ``host:port`` by opening (and closing) a TCP connection."""

    def __init__(self, host: str, port: int, *, timeout: float = TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._address: tuple[int, tuple[Any, ...]] | None = None  # (family, socket address)
        self._resolved_at = float("-inf")

    async def round_trip(self) -> float:
        """Seconds from SYN to SYN-ACK; ``timeout`` when no answer came in time (a full queue drops
        SYNs). Raises OSError when the endpoint cannot be reached at all (refused, no route, no name)."""
        loop = asyncio.get_running_loop()
        family, address = await self._resolve(loop)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.sock_connect(sock, address)
            except TimeoutError:
                return self.timeout
            except OSError:
                self._address = None  # look the name up again: the address may have moved
                raise
            elapsed = time.monotonic() - started
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if len(info) >= _TCPI_RTT_OFFSET + 4:
            rtt_us = struct.unpack_from("I", info, _TCPI_RTT_OFFSET)[0]
            if rtt_us > 0:
                return rtt_us / 1e6
        return elapsed  # no kernel figure (another system): the loop's, an upper bound

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> tuple[int, tuple[Any, ...]]:
        """The endpoint's first address, looked up again every minute (S3 names move)."""
        if self._address is None or time.monotonic() - self._resolved_at > RESOLVE_EVERY_S:
            try:
                async with asyncio.timeout(self.timeout):
                    infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except TimeoutError:
                raise OSError(f"looking up {self.host} took over {self.timeout:g} s") from None
            if not infos:
                raise OSError(f"{self.host} has no address")
            family, _, _, _, address = infos[0]
            self._address = (family, address)
            self._resolved_at = time.monotonic()
        return self._address
