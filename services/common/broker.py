"""A robust AMQP connection with the topology declared on it.

The connection is made in the background, by a supervised loop: a service starts
(and answers ``/healthz``) while the broker is still down, reports not-ready
until it is up, and keeps trying with backoff whatever fails on the way (the
connection, declaring the topology, the service's own ``on_ready``). Until the
first connection succeeds each attempt is made here, so a refusal says why (a
wrong password reads as such, not as "unreachable"); after it aio-pika's robust
connection reconnects by itself and restores the channels and the entities we
keep references to (``Declared``).

A resource alarm (disk or memory) makes RabbitMQ block every connection that
publishes: it stops reading from it, so anything else on that connection (acks,
consumers' flow) stalls too. A service that both publishes and consumes keeps
one ``Broker`` for each (``confirms=False`` for the consuming one), and
``publish`` fails at once with ``BrokerBlocked`` while the broker blocks this
connection, instead of waiting for a confirm that cannot come.

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
    AMQPError,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from aiormq.exceptions import AuthenticationError, InvalidFrameError, ProbableAuthenticationError

from services.common import topology
from services.common.errors import DependencyUnavailable
from services.common.supervise import DONE, StepResult, Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_INTERVAL_S = 2.0
MAX_CONNECT_BACKOFF_S = 30.0
HEARTBEAT_S = 10  # unless the URL says otherwise (?heartbeat=N)
CONNECT_TIMEOUT_S = 10.0  # one attempt at the first connection
BLOCK_POLL_S = 0.05  # how often a publish waiting for its confirm looks whether the broker blocked it
SETUP_TIMEOUT_S = 15.0  # declaring the topology and the service's on_ready
QUERY_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
UNREACHABLE_WARNING_AFTER_S = 30.0  # quiet while a starting broker comes up; loud if it does not


class BrokerUnavailable(DependencyUnavailable):
    """The broker cannot take a message now (down, reconnecting, refused or too slow)."""


class BrokerBlocked(BrokerUnavailable):
    """The broker blocks this connection's publishes: a resource alarm (disk or memory) is on."""


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
        confirms: bool = True,
    ) -> None:
        self._url = url
        self._name = name
        # A connection for consuming only has no confirming channel and never publishes,
        # so a resource alarm never blocks it.
        self._confirms = confirms
        # Called after the first connection and declaration (e.g. to start consumers);
        # retried, with the declaration, until it succeeds.
        self.on_ready = on_ready
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.declared: topology.Declared | None = None
        self._started = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._own_supervisor = False
        self._query_channel: AbstractRobustChannel | None = None
        self._waiting_since: float | None = None
        self._warned_at = 0.0
        self._backoff = RECONNECT_INTERVAL_S
        self._refused: str | None = None  # why the broker turned the last attempt down, when it did
        self._blocked_since: float | None = None

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Begin connecting in the background, under ``supervisor`` (or one of its own)."""
        if supervisor is None:
            supervisor, self._own_supervisor = Supervisor(), True
        self._supervisor = supervisor
        supervisor.start(f"broker-connect-{self._name}", self._establish, every=0)

    async def _establish(self) -> StepResult:
        """One round of getting connected and set up; DONE once ready."""
        if self.connection is None:
            connection = self._new_connection()
            self._waiting_since = self._waiting_since or time.monotonic()
            try:
                # fail_fast (aio-pika's default) makes the first attempt raise what went wrong.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await connection.connect()
            except (TimeoutError, OSError, AMQPError) as exc:
                await _close_quietly(connection)
                self._report_failed_attempt(exc)
                delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_CONNECT_BACKOFF_S)
                return delay
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            self.connection = connection
            self._refused = None
            self._backoff = RECONNECT_INTERVAL_S
        if not self.connection.connected.is_set():
            return RECONNECT_INTERVAL_S  # the robust connection is reconnecting by itself
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

    def _new_connection(self) -> aio_pika.RobustConnection:
        url = make_url(self._url)
        if "heartbeat" not in url.query:
            # A link whose packets vanish is noticed after two missed heartbeats, not ten minutes.
            url = url.update_query(heartbeat=HEARTBEAT_S)
        return aio_pika.RobustConnection(
            url,
            reconnect_interval=RECONNECT_INTERVAL_S,
            client_properties={"connection_name": self._name},
        )

    def _report_failed_attempt(self, exc: BaseException) -> None:
        """Say why the broker cannot be used: quietly while it may still be starting, loudly when
        it refuses this service (a wrong user, password or virtual host will not fix itself)."""
        now = time.monotonic()
        if isinstance(exc, ProbableAuthenticationError | AuthenticationError):
            self._refused = "the broker refused the user name or password in PHOTOFERRY_AMQP_URL"
        elif isinstance(exc, InvalidFrameError) and "Connection.Close" in str(exc):
            self._refused = ("the broker refused the virtual host in PHOTOFERRY_AMQP_URL "
                             "(it does not exist, or the user has no access to it)")
        else:
            self._refused = None
        if self._refused is not None:
            if now - self._warned_at >= UNREACHABLE_WARNING_AFTER_S or self._warned_at == 0:
                self._warned_at = now
                log.error("%s; retrying", self._refused,
                          extra={"connection": self._name, "error": str(exc), "retry_in_s": self._backoff})
            return
        self._report_waiting(str(exc) or type(exc).__name__)

    async def _set_up(self) -> None:
        assert self.connection is not None
        if self.channel is None or self.channel.is_closed:
            # Confirms prove the broker stored a message; on_return_raises turns
            # an unroutable publish into an error instead of a silent return.
            self.channel = await self.connection.channel(publisher_confirms=self._confirms,
                                                         on_return_raises=self._confirms)
        self.declared = await topology.declare(self.channel)
        if self.on_ready is not None:
            await self.on_ready(self)

    def _on_connection_lost(self, _connection: object, exc: BaseException | None = None) -> None:
        # A stop closes the connection on purpose: that is not worth a warning.
        if self._started.is_set() and exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.warning("lost the broker connection; reconnecting (uploads get 503 meanwhile)",
                        extra={"connection": self._name, "error": repr(exc)})

    def _on_reconnected(self, _connection: object) -> None:
        log.info("broker connection restored", extra={"connection": self._name})

    def _report_waiting(self, error: str) -> None:
        now = time.monotonic()
        waited = now - (self._waiting_since or now)
        if self._warned_at == 0:
            log.info("waiting for the broker", extra={"connection": self._name})
            self._warned_at = now
        elif waited >= UNREACHABLE_WARNING_AFTER_S and now - self._warned_at >= UNREACHABLE_WARNING_AFTER_S:
            self._warned_at = now
            log.warning("the broker is still unreachable; retrying",
                        extra={"connection": self._name, "waited_s": round(waited), "error": error})

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

    @property
    def blocked(self) -> bool:
        """True while the broker blocks this connection's publishes (a resource alarm is on).

        aio-pika does not expose the broker's connection.blocked notice; aiormq keeps it as a
        private event (pinned in constraints.txt, and tests/test_broker_alarm.py checks it
        against a real alarm). Without it this reads False and publishes wait for their
        timeout instead of failing at once.
        """
        transport = getattr(self.connection, "transport", None)
        unblocked = getattr(getattr(transport, "connection", None), "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

    def readiness(self) -> str:
        """Return ``ok`` or why the broker cannot be used now."""
        if self._refused is not None:
            return self._refused
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
        if not self._confirms:
            raise RuntimeError(f"{self._name} is a connection for consuming; publish on the other")
        if not self.is_ready or self.declared is None:
            raise BrokerUnavailable(f"broker {self.readiness()}")
        self._check_blocked()
        exchange_ = self.declared.exchanges[exchange]
        try:
            async with asyncio.timeout(timeout):
                await self._confirmed(exchange_.publish(message, routing_key, mandatory=mandatory, timeout=timeout))
        except TimeoutError:
            raise BrokerUnavailable(f"no publisher confirm within {timeout:g}s") from None
        except PublishError as exc:
            raise BrokerUnavailable(f"message was unroutable: {exc}") from None
        except DeliveryError as exc:
            raise BrokerUnavailable(f"broker refused the message: {exc}") from None
        except CONNECTION_EXCEPTIONS as exc:
            raise BrokerUnavailable(f"broker connection failed: {exc!r}") from None
        if self._blocked_since is not None:
            log.info("the broker accepts messages again (its resource alarm cleared)",
                     extra={"connection": self._name, "blocked_s": round(time.monotonic() - self._blocked_since)})
            self._blocked_since = None

    async def _confirmed(self, publishing: Awaitable[object]) -> None:
        """Wait for a publish's confirm, but give up at once when the broker blocks the connection
        (it says so right after the publish reaches it; the confirm would come only after the alarm)."""
        task = asyncio.ensure_future(publishing)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=BLOCK_POLL_S)
                if not task.done():
                    self._check_blocked()
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _check_blocked(self) -> None:
        if not self.blocked:
            return
        if self._blocked_since is None:
            self._blocked_since = time.monotonic()
            log.warning("the broker blocks publishing: a resource alarm (low disk or memory on the broker) is on; "
                        "messages wait until it clears (free disk or memory on the broker's node)",
                        extra={"connection": self._name})
        raise BrokerBlocked("the broker blocks publishing (a resource alarm: low disk or memory)")

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
        if self.connection is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.connection.close()
            except TimeoutError:
                log.warning("the broker connection did not close in time; leaving it",
                            extra={"connection": self._name})
            except CONNECTION_EXCEPTIONS as exc:
                log.info("the broker connection closed with an error", extra={"error": str(exc)})


class BrokerLinks:
    """A service's two connections: one it publishes on, one it consumes on (a resource alarm
    blocks the first only, so deliveries and their acknowledgements keep flowing)."""

    def __init__(self, url: str, *, name: str) -> None:
        self.publishing = Broker(url, name=f"{name} (publishing)")
        # The service sets ``consuming.on_ready`` to start its consumers.
        self.consuming = Broker(url, name=f"{name} (consuming)", confirms=False)

    def start(self, supervisor: Supervisor | None = None) -> None:
        self.publishing.start(supervisor)
        self.consuming.start(supervisor)

    async def connected(self) -> None:
        """Wait until both are up (callers bound it with a timeout)."""
        await self.publishing.connected()
        await self.consuming.connected()

    async def close(self) -> None:
        await self.consuming.close()
        await self.publishing.close()

    def readiness(self) -> str:
        """``ok``, or which connection cannot be used and why."""
        for what, broker in (("publishing", self.publishing), ("consuming", self.consuming)):
            state = broker.readiness()
            if state != "ok":
                return f"{what}: {state}"
        return "ok"


async def bounded(action: Awaitable[T], what: str, *, timeout: float = QUERY_TIMEOUT_S) -> T:
    """Await a call on a robust channel (consume, cancel, qos) under a deadline; raise BrokerUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            return await action
    except TimeoutError:
        raise BrokerUnavailable(f"{what}: no answer from the broker within {timeout:g}s") from None
    except CONNECTION_EXCEPTIONS as exc:
        raise BrokerUnavailable(f"{what}: {exc!r}") from None


async def _close_quietly(connection: aio_pika.RobustConnection) -> None:
    """Close a connection whose first attempt failed (it holds nothing worth waiting for)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await connection.close()
    except (TimeoutError, *CONNECTION_EXCEPTIONS):
        pass
