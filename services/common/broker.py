"""One robust AMQP connection per process, with the topology declared on it.

The connection is made in the background: a service starts (and answers
``/healthz``) while the broker is still down, and reports not-ready until it is
up. aio-pika's robust connection then reconnects by itself and restores the
channel and the entities we keep references to (``Declared``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

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

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_S = 2.0
# A channel error at declare time (arguments that differ from an existing queue)
# is a deployment problem; retrying it fast only floods the log.
DECLARE_RETRY_S = 10.0


class BrokerUnavailable(Exception):
    """The broker cannot take a message now (down, reconnecting, refused or too slow)."""


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
        # Called once, after the first connection and declaration (e.g. to start consumers).
        self.on_ready = on_ready
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.declared: topology.Declared | None = None
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin connecting in the background."""
        self._task = asyncio.create_task(self._connect(), name=f"broker-connect-{self._name}")

    async def _connect(self) -> None:
        # fail_fast=False: keep retrying the first connection instead of raising.
        # The object exists before it connects, so close() can stop its retries.
        self.connection = aio_pika.RobustConnection(
            make_url(self._url),
            fail_fast=False,
            reconnect_interval=RECONNECT_INTERVAL_S,
            client_properties={"connection_name": self._name},
        )
        await self.connection.connect()
        while True:
            try:
                # Confirms prove the broker stored a message; on_return_raises turns
                # an unroutable publish into an error instead of a silent return.
                self.channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self.declared = await topology.declare(self.channel)
                break
            except ChannelPreconditionFailed as exc:
                log.error(
                    "broker topology differs from this version's definitions; "
                    "apply rabbitmq/definitions.json or remove the conflicting entity by hand",
                    extra={"error": str(exc)},
                )
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("could not declare the topology yet", extra={"error": str(exc)})
            await asyncio.sleep(DECLARE_RETRY_S)
        if self.on_ready is not None:
            await self.on_ready(self)
        self._started.set()
        log.info("broker connected and topology declared", extra={"connection": self._name})

    async def connected(self) -> None:
        """Wait for the first connection and declaration (callers bound it with a timeout)."""
        await self._started.wait()

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

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()
