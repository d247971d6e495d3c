"""The delay probe: a TCP handshake to the S3 endpoint, timed by the kernel, on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from services.shipper.delayprobe import DelayProbe, endpoint_address


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def test_a_handshake_to_a_listening_port_is_a_round_trip_on_loopback(listener: socket.socket) -> None:
    probe = DelayProbe("127.0.0.1", listener.getsockname()[1])
    samples = [asyncio.run(probe.round_trip()) for _ in range(5)]
    assert all(0 < sample < 0.05 for sample in samples), samples


def test_a_port_nobody_listens_on_is_an_error_not_a_delay() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(OSError):
            asyncio.run(DelayProbe("127.0.0.1", port).round_trip())


def test_a_handshake_that_gets_no_answer_counts_as_the_timeout() -> None:
    # A listener whose accept queue is full drops new SYNs, as a full uplink queue does.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        held = []
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            held.append(client)
        try:
            assert asyncio.run(DelayProbe("127.0.0.1", port, timeout=0.3).round_trip()) == 0.3
        finally:
            for client in held:
                client.close()


def test_a_name_that_does_not_resolve_is_an_error() -> None:
    with pytest.raises(OSError):
        asyncio.run(DelayProbe("no-such-host.invalid", 443).round_trip())


@pytest.mark.parametrize(("url", "address"), [
    ("https://s3.eu-central-1.amazonaws.com", ("s3.eu-central-1.amazonaws.com", 443)),
    ("http://10.0.0.5:9000", ("10.0.0.5", 9000)),
    ("http://minio.example", ("minio.example", 80)),
    ("https://[2001:db8::1]:8443/bucket", ("2001:db8::1", 8443)),
])
def test_the_endpoint_url_names_the_host_and_port_probed(url: str, address: tuple[str, int]) -> None:
    assert endpoint_address(url) == address


def test_an_endpoint_without_a_host_is_refused() -> None:
    with pytest.raises(ValueError):
        endpoint_address("file:///photos")
