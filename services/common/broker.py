"""One robust AMQP connection per process, with the topology declared on it.

The connection is made in the background, by a supervised loop: a service starts
(and answers ``/healthz``) while the broker is still down, reports not-ready
until it is up, and keeps trying with backoff whatever fails on the way (the
connection, declaring the topology, the service's own ``on_ready``). aio-pika's
robust connection then reconnects by itself and restores the channels and the
entities we keep references to (``Declared``).

aio-pika's robust channel waits for its connection with no timeout of its own,
so every call here is bounded; callers never wait on the broker unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)

from services.common import topology
from services.common.errors import DependencyUnavailable
from services.common.supervise import DONE, StepResult, Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_INTERVAL_S = 2.0
HEARTBEAT_S = 10  # unless the URL says otherwise (?heartbeat=N)
CONNECT_WAIT_S = 5.0  # one round of waiting for the connection, before the loop looks again
SETUP_TIMEOUT_S = 15.0  # declaring the topology and the service's on_ready
QUERY_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
UNREACHABLE_WARNING_AFTER_S = 30.0  # quiet while a starting broker comes up; loud if it does not


class BrokerUnavailable(DependencyUnavailable):
    """The broker cannot take a message now (down, reconnecting, refused or too slow)."""


class TopologyMismatch(Exception):
    """The broker holds an entity with other arguments than this version declares."""


class Broker:
    """A robust connection plus a confirming channel with the topology declared."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        on_ready: Callable[[Broker], Awaitable[None]] | None = None,
    ) -> None:
        self._url = url
        self._name = name
        # Called after the first connection and declaration (e.g. to start consumers);
        # retried, with the declaration, until it succeeds.
        self.on_ready = on_ready
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.declared: topology.Declared | None = None
        self._started = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._own_supervisor = False
        self._connecting: asyncio.Task[None] | None = None
        self._query_channel: AbstractRobustChannel | None = None
        self._waiting_since: float | None = None
        self._warned_at = 0.0

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Begin connecting in the background, under ``supervisor`` (or one of its own)."""
        if supervisor is None:
            supervisor, self._own_supervisor = Supervisor(), True
        self._supervisor = supervisor
        supervisor.start(f"broker-connect-{self._name}", self._establish, every=0)

    async def _establish(self) -> StepResult:
        """One round of getting connected and set up; DONE once ready."""
        if self.connection is None:
            # fail_fast=False: the robust connection keeps retrying the first connection itself.
            url = make_url(self._url)
            if "heartbeat" not in url.query:
                # A link whose packets vanish is noticed after two missed heartbeats, not ten minutes.
                url = url.update_query(heartbeat=HEARTBEAT_S)
            self.connection = aio_pika.RobustConnection(
                url,
                fail_fast=False,
                reconnect_interval=RECONNECT_INTERVAL_S,
                client_properties={"connection_name": self._name},
            )
            self.connection.close_callbacks.add(self._on_connection_lost)
            self.connection.reconnect_callbacks.add(self._on_reconnected)
            self._connecting = asyncio.create_task(self.connection.connect(), name=f"amqp-connect-{self._name}")
            self._waiting_since = time.monotonic()
        if not self.connection.connected.is_set():
            try:
                async with asyncio.timeout(CONNECT_WAIT_S):
                    await self.connection.connected.wait()
            except TimeoutError:
                self._report_waiting()
                return 0
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await self._set_up()
        except ChannelPreconditionFailed as exc:
            log.error("broker topology differs from this version's definitions; apply "
                      "rabbitmq/definitions.json or remove the conflicting entity by hand",
                      extra={"error": str(exc)})
            raise TopologyMismatch(str(exc)) from None
        except TimeoutError:
            raise BrokerUnavailable(f"setting up on the broker took over {SETUP_TIMEOUT_S:g}s") from None
        except CONNECTION_EXCEPTIONS as exc:
            # The connection or channel went away mid-way: a dependency, not a bug.
            raise BrokerUnavailable(f"setting up on the broker failed: {exc!r}") from None
        self._started.set()
        log.info("broker connected and topology declared", extra={"connection": self._name})
        return DONE

    async def _set_up(self) -> None:
        assert self.connection is not None
        if self.channel is None or self.channel.is_closed:
            # Confirms prove the broker stored a message; on_return_raises turns
            # an unroutable publish into an error instead of a silent return.
            self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.declared = await topology.declare(self.channel)
        if self.on_ready is not None:
            await self.on_ready(self)

    def _on_connection_lost(self, _connection: object, exc: BaseException | None = None) -> None:
        if self._started.is_set() and exc is not None:
            log.warning("lost the broker connection; reconnecting (uploads get 503 meanwhile)",
                        extra={"connection": self._name, "error": repr(exc)})

    def _on_reconnected(self, _connection: object) -> None:
        log.info("broker connection restored", extra={"connection": self._name})

    def _report_waiting(self) -> None:
        now = time.monotonic()
        waited = now - (self._waiting_since or now)
        if self._warned_at == 0:
            log.info("waiting for the broker", extra={"connection": self._name})
            self._warned_at = now
        elif waited >= UNREACHABLE_WARNING_AFTER_S and now - self._warned_at >= UNREACHABLE_WARNING_AFTER_S:
            self._warned_at = now
            log.warning("the broker is still unreachable; retrying",
                        extra={"connection": self._name, "waited_s": round(waited)})

    async def connected(self) -> None:
        """Wait for the first connection and declaration (callers bound it with a timeout)."""
        await self._started.wait()

    @property
    def starting(self) -> bool:
        """Not connected yet, and not for long: a pod that started before the broker (say so quietly)."""
        if self._started.is_set():
            return False
        return self._waiting_since is None or time.monotonic() - self._waiting_since < UNREACHABLE_WARNING_AFTER_S

    @property
    def is_ready(self) -> bool:
        return (
            self._started.is_set()
            and self.connection is not None
            and self.connection.connected.is_set()
            and self.channel is not None
            and not self.channel.is_closed
        )

    def readiness(self) -> str:
        """Return ``ok`` or why the broker cannot be used now."""
        if not self._started.is_set():
            return "connecting"
        if not self.is_ready:
            return "reconnecting"
        return "ok"

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        timeout: float,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raise BrokerUnavailable otherwise.

        ``mandatory=False`` is for notices nobody may be listening to (heartbeats,
        control nudges): an unroutable one is then dropped, not an error.
        """
        if not self.is_ready or self.declared is None:
            raise BrokerUnavailable(f"broker {self.readiness()}")
        try:
            async with asyncio.timeout(timeout):
                await self.declared.exchanges[exchange].publish(
                    message, routing_key, mandatory=mandatory, timeout=timeout
                )
        except TimeoutError:
            raise BrokerUnavailable(f"no publisher confirm within {timeout:g}s") from None
        except PublishError as exc:
            raise BrokerUnavailable(f"message was unroutable: {exc}") from None
        except DeliveryError as exc:
            raise BrokerUnavailable(f"broker refused the message: {exc}") from None
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"broker connection failed: {exc!r}") from None

    async def queue_depth(self, *queues: str, timeout: float = QUERY_TIMEOUT_S) -> dict[str, int]:
        """Messages ready on each queue (a passive declare each); raise BrokerUnavailable."""
        if not self.is_ready or self.connection is None:
            raise BrokerUnavailable(f"broker {self.readiness()}")
        try:
            async with asyncio.timeout(timeout):
                if self._query_channel is None or self._query_channel.is_closed:
                    # Passive declares get a channel of their own: a failing one closes its channel.
                    self._query_channel = await self.connection.channel(publisher_confirms=False)
                channel = await self._query_channel.get_underlay_channel()
                depths = {}
                for name in queues:
                    declared = await channel.queue_declare(name, passive=True)
                    depths[name] = int(declared.message_count or 0)
                return depths
        except TimeoutError:
            raise BrokerUnavailable(f"no queue figures within {timeout:g}s") from None
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"could not read queue figures: {exc!r}") from None

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop connecting and close the connection, waiting at most ``timeout``."""
        if self._supervisor is not None and self._own_supervisor:
            await self._supervisor.stop()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self.connection is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.connection.close()
            except TimeoutError:
                log.warning("the broker connection did not close in time; leaving it",
                            extra={"connection": self._name})
            except CONNECTION_EXCEPTIONS as exc:
                log.info("the broker connection closed with an error", extra={"error": str(exc)})


async def bounded(action: Awaitable[T], what: str, *, timeout: float = QUERY_TIMEOUT_S) -> T:
    """Await a call on a robust channel (consume, cancel, qos) under a deadline; raise BrokerUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            return await action
    except TimeoutError:
        raise BrokerUnavailable(f"{what}: no answer from the broker within {timeout:g}s") from None
    except CONNECTION_EXCEPTIONS as exc:
        raise BrokerUnavailable(f"{what}: {exc!r}") from None
