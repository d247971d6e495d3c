"""Background loops survive what they did not foresee, and say when they cannot go on."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.common import supervise
from services.common.localstore import StoreUnavailable
from services.common.supervise import DONE, Supervisor


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "FIRST_BACKOFF_S", 0.01)
    monkeypatch.setattr(supervise, "MAX_BACKOFF_S", 0.02)


async def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (a test polls a plain condition)
            await asyncio.sleep(0.005)


def test_a_loop_goes_on_after_an_exception_it_did_not_list() -> None:
    async def scenario() -> int:
        supervisor = Supervisor(CollectorRegistry())
        rounds = 0

        async def step() -> None:
            nonlocal rounds
            rounds += 1
            if rounds == 2:
                raise KeyError("a bug")

        supervisor.start("counting", step, every=0.001)
        await _until(lambda: rounds >= 5)
        assert supervisor.failing() == {}
        await supervisor.stop()
        return rounds

    assert asyncio.run(scenario()) >= 5


def test_a_loop_that_keeps_failing_is_reported_and_recovers_when_it_succeeds() -> None:
    async def scenario() -> None:
        supervisor = Supervisor(CollectorRegistry())
        broken = True

        async def step() -> None:
            if broken:
                raise RuntimeError("cannot go on")

        supervisor.start("broken", step, every=0.001)
        await _until(lambda: "broken" in supervisor.failing())
        assert "RuntimeError: cannot go on" in supervisor.failing()["broken"]
        broken = False
        await _until(lambda: not supervisor.failing())
        await supervisor.stop()

    asyncio.run(scenario())


def test_a_dependency_that_is_away_is_retried_without_failing_health() -> None:
    async def scenario() -> None:
        supervisor = Supervisor(CollectorRegistry())
        rounds = 0

        async def step() -> None:
            nonlocal rounds
            rounds += 1
            raise StoreUnavailable("the store is down")

        supervisor.start("waiting", step, every=0.001)
        await _until(lambda: rounds > supervise.RESTART_INTENSITY * 2)
        assert supervisor.failing() == {}
        await supervisor.stop()

    asyncio.run(scenario())


def test_a_wake_up_during_a_round_is_not_lost() -> None:
    async def scenario() -> None:
        supervisor = Supervisor(CollectorRegistry())
        wake = asyncio.Event()
        rounds = 0

        async def step() -> None:
            nonlocal rounds
            rounds += 1
            if rounds == 1:
                wake.set()  # work arrives while the round runs

        # The period is long: only the wake-up can start a second round soon.
        supervisor.start("woken", step, every=60, wake=wake)
        await _until(lambda: rounds >= 2, timeout=2)
        await supervisor.stop()

    asyncio.run(scenario())


def test_a_finished_loop_is_not_failing() -> None:
    async def scenario() -> None:
        supervisor = Supervisor(CollectorRegistry())

        async def once() -> str:
            return DONE

        supervisor.start("once", once, every=1)
        await _until(lambda: supervisor.loops["once"].finished)
        assert supervisor.failing() == {}
        await supervisor.stop()

    asyncio.run(scenario())


def test_stop_is_bounded_even_for_a_loop_that_ignores_cancellation() -> None:
    async def scenario() -> float:
        supervisor = Supervisor(CollectorRegistry())

        async def stubborn() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(1)  # ignores the first cancellation for a while

        supervisor.start("stubborn", stubborn, every=1)
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await supervisor.stop(timeout=0.2)
        return loop.time() - started

    assert asyncio.run(scenario()) < 1.0
