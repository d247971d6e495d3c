"""The broker connection: retried set-up, bounded calls, and a close that never hangs."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from devtools.servers import free_port
from services.common import topology
from services.common.broker import Broker, BrokerBlocked, BrokerUnavailable
from tests.helpers import Site

pytestmark = pytest.mark.servers


@pytest.mark.parametrize("failure", [RuntimeError("channel closed under us"), KeyError("a bug in on_ready")])
def test_a_failing_on_ready_is_retried_until_the_service_is_ready(site: Site, failure: Exception) -> None:
    calls = 0

    async def on_ready(broker: Broker) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure

    async def scenario() -> str:
        broker = Broker(site.amqp_url, name="test-on-ready", on_ready=on_ready)
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            return broker.readiness()
        finally:
            await broker.close()

    assert asyncio.run(scenario()) == "ok"
    assert calls == 2


def test_queue_depth_answers_and_a_missing_queue_is_a_clear_error(site: Site) -> None:
    async def scenario() -> None:
        broker = Broker(site.amqp_url, name="test-depth")
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            with pytest.raises(BrokerUnavailable, match="queue figures"):
                await broker.queue_depth("no-such-queue")
            depths = await broker.queue_depth(topology.SHIP_QUEUE, topology.PARKED_QUEUE)
            assert set(depths) == {topology.SHIP_QUEUE, topology.PARKED_QUEUE}
        finally:
            await broker.close()

    asyncio.run(scenario())


def test_closing_while_no_broker_answers_is_prompt() -> None:
    async def scenario() -> float:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{free_port()}/", name="test-nobody")
        broker.start()
        await asyncio.sleep(1)
        assert broker.readiness() == "connecting"
        with pytest.raises(BrokerUnavailable):
            await broker.queue_depth(topology.SHIP_QUEUE)
        started = time.monotonic()
        await broker.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 6


def test_the_fresh_queue_keeps_the_newest_photos_and_moves_the_oldest_to_the_backlog(site: Site) -> None:
    extra = 5

    async def scenario() -> tuple[int, list[str]]:
        broker = Broker(site.amqp_url, name="test-fresh-bound")
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            for n in range(topology.FRESH_QUEUE_MAX_PHOTOS + extra):
                await broker.publish(topology.PHOTOS_EXCHANGE, topology.FRESH_ROUTING_KEY,
                                     aio_pika.Message(str(n).encode()), timeout=10)
            assert broker.declared is not None
            backlog = broker.declared.queues[topology.SHIP_QUEUE]
            moved: list[str] = []
            deadline = time.monotonic() + 20
            while len(moved) < extra and time.monotonic() < deadline:  # dead-lettering is asynchronous
                message = await backlog.get(no_ack=True, fail=False, timeout=5)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                moved.append(message.body.decode())
            depths = await broker.queue_depth(topology.FRESH_QUEUE)
            await broker.declared.queues[topology.FRESH_QUEUE].purge()
            return depths[topology.FRESH_QUEUE], moved
        finally:
            await broker.close()

    fresh, moved = asyncio.run(scenario())
    assert fresh == topology.FRESH_QUEUE_MAX_PHOTOS
    assert moved == [str(n) for n in range(extra)]  # the oldest, in order


@pytest.mark.parametrize(("wrong", "words"), [
    ("password", "user name or password"),
    ("vhost", "virtual host"),
])
def test_a_broker_that_refuses_the_service_says_why(site: Site, wrong: str, words: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    url = (site.amqp_url.replace(f":{site.rabbit.password}@", ":not-the-password@") if wrong == "password"
           else site.amqp_url + "-no-such-vhost")

    async def scenario() -> str:
        broker = Broker(url, name="test-refused")
        broker.start()
        try:
            async with asyncio.timeout(20):
                while words not in broker.readiness():  # noqa: ASYNC110 (polls the broker's own state)
                    await asyncio.sleep(0.1)
            return broker.readiness()
        finally:
            await broker.close()

    caplog.set_level("ERROR", logger="services.common.broker")
    assert "PHOTOFERRY_AMQP_URL" in asyncio.run(scenario())
    assert any(words in record.getMessage() and record.levelname == "ERROR" for record in caplog.records)


def test_under_a_resource_alarm_a_publish_fails_at_once_and_a_consuming_connection_is_not_blocked(
    site: Site,
) -> None:
    async def scenario() -> None:
        publisher = Broker(site.amqp_url, name="test-alarm-publish")
        consumer = Broker(site.amqp_url, name="test-alarm-consume", confirms=False)
        publisher.start()
        consumer.start()
        try:
            await asyncio.wait_for(asyncio.gather(publisher.connected(), consumer.connected()), 20)
            message = aio_pika.Message(b"{}", expiration=60)
            await publisher.publish(topology.STATUS_EXCHANGE, "", message, timeout=5, mandatory=False)
            await asyncio.to_thread(site.rabbit.set_disk_alarm, True)
            try:
                started = time.monotonic()
                with pytest.raises(BrokerBlocked, match="resource alarm"):
                    await publisher.publish(topology.STATUS_EXCHANGE, "", message, timeout=10, mandatory=False)
                assert time.monotonic() - started < 3
                assert publisher.blocked and not consumer.blocked
                # Blocked now: the next one fails without waiting at all.
                started = time.monotonic()
                with pytest.raises(BrokerBlocked):
                    await publisher.publish(topology.STATUS_EXCHANGE, "", message, timeout=10, mandatory=False)
                assert time.monotonic() - started < 0.5
                # The consuming connection still talks to the broker.
                assert topology.SHIP_QUEUE in await consumer.queue_depth(topology.SHIP_QUEUE)
            finally:
                await asyncio.to_thread(site.rabbit.set_disk_alarm, False)
            async with asyncio.timeout(20):
                while publisher.blocked:  # noqa: ASYNC110 (the broker says so in its own time)
                    await asyncio.sleep(0.1)
            await publisher.publish(topology.STATUS_EXCHANGE, "", message, timeout=5, mandatory=False)
            with pytest.raises(RuntimeError, match="consuming"):
                await consumer.publish(topology.STATUS_EXCHANGE, "", message, timeout=5)
        finally:
            await publisher.close()
            await consumer.close()

    asyncio.run(scenario())
