"""Messages for one photo ship one after another; other photos are not held up."""

from __future__ import annotations

import asyncio

from services.shipper.locks import PhotoLocks


def test_one_photo_at_a_time_and_nothing_kept_afterwards() -> None:
    async def scenario() -> list[str]:
        locks = PhotoLocks()
        events: list[str] = []
        first_inside = asyncio.Event()
        release_first = asyncio.Event()

        async def first() -> None:
            async with locks.hold("a"):
                events.append("a1 in")
                first_inside.set()
                await release_first.wait()
                events.append("a1 out")

        async def second() -> None:
            await first_inside.wait()
            async with locks.hold("a"):
                events.append("a2 in")

        async def other() -> None:
            await first_inside.wait()
            async with locks.hold("b"):
                events.append("b in")
            release_first.set()

        await asyncio.gather(first(), second(), other())
        assert len(locks) == 0
        return events

    events = asyncio.run(scenario())
    assert events.index("b in") < events.index("a1 out") < events.index("a2 in")


def test_a_failure_inside_releases_the_photo() -> None:
    async def scenario() -> int:
        locks = PhotoLocks()
        try:
            async with locks.hold("a"):
                raise RuntimeError("upload failed")
        except RuntimeError:
            pass
        async with locks.hold("a"):
            pass
        return len(locks)

    assert asyncio.run(scenario()) == 0
