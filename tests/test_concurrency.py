"""Adaptive upload concurrency against simulated links."""

from __future__ import annotations

from collections.abc import Callable

from services.shipper.concurrency import ConcurrencyController

MB = 1_000_000


def run(controller: ConcurrencyController, link: Callable[[int], tuple[float, bool]], windows: int, *,
        share: float = 5 * MB) -> list[int]:
    limits = []
    for _ in range(windows):
        throughput, throttled = link(controller.limit)
        controller.record_sent(int(throughput * 5))
        if throttled:
            controller.record_throttled()
        limits.append(controller.evaluate(window_s=5, share=share, backlog=True))
    return limits


def test_grows_until_the_share_is_reached() -> None:
    controller = ConcurrencyController(initial=1, maximum=8)
    # Each upload adds 1.5 MB/s (round trips leave gaps) until the 5 MB/s cap.
    limits = run(controller, lambda n: (min(5 * MB, 1.5 * MB * n), False), 10)
    assert limits[-1] == 4
    assert not controller.link_limited


def test_stops_growing_when_the_link_is_the_limit_and_says_so() -> None:
    controller = ConcurrencyController(initial=1, maximum=8)
    limits = run(controller, lambda n: (min(2 * MB, 1.5 * MB * n), False), 8)
    assert max(limits) <= 3
    assert controller.link_limited


def test_throttling_halves_the_count() -> None:
    controller = ConcurrencyController(initial=8, maximum=8)
    limits = run(controller, lambda n: (MB, n > 2), 4)
    assert limits[0] == 4 and limits[1] == 2


def test_no_backlog_is_not_a_slow_link() -> None:
    controller = ConcurrencyController(initial=2, maximum=8)
    controller.record_sent(100)
    assert controller.evaluate(window_s=5, share=5 * MB, backlog=False) == 2
    assert not controller.link_limited
