"""Background loops that survive, and say so when they cannot.

Every long-lived loop of a service runs under one ``Supervisor``, as OTP's
supervisors run processes: the loop is written as a *step* (one round of its
work); the supervisor calls it again and again, waits between rounds (a period,
a wake-up event, or what the step asks for), and on an exception logs it with the
loop's name, backs off with jitter, and carries on.

- A dependency that is away (``DEPENDENCY_ERRORS``) is logged as a warning and
  retried; it does not make the process unhealthy (``/readyz`` says which
  dependency is missing).
- Anything else is a bug or a state the loop cannot handle: logged with its
  traceback and retried; after ``RESTART_INTENSITY`` such failures in a row the
  loop is *failing*, ``/healthz`` answers 503, and Kubernetes restarts the pod.

Each loop exports the time of its last successful round, so a loop that stopped
making progress is visible before anything else goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.errors import DEPENDENCY_ERRORS

log = logging.getLogger(__name__)

RESTART_INTENSITY = 5  # unexpected failures in a row before a loop counts as failing
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 5.0

# What a step returns: None to wait the loop's period, a number of seconds to wait
# that long instead, or DONE when the loop's work is finished for good.
DONE = "done"
StepResult = float | str | None
Step = Callable[[], Awaitable[StepResult]]


@dataclass
class LoopState:
    name: str
    started_at: float = field(default_factory=time.time)
    last_success: float | None = None  # wall clock, seconds
    failures_in_a_row: int = 0  # unexpected ones; a dependency being away does not count
    last_error: str | None = None
    finished: bool = False

    @property
    def failing(self) -> bool:
        return self.failures_in_a_row >= RESTART_INTENSITY


class Supervisor:
    """Runs a service's background loops; ``failing()`` feeds ``/healthz``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.loops: dict[str, LoopState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last_success = Gauge(
            "photoferry_loop_last_success_timestamp_seconds",
            "When each background loop last completed a round (Unix time)",
            ["loop"], registry=registry,
        ) if registry is not None else None
        self._failures = Counter(
            "photoferry_loop_failures",
            "Rounds of a background loop that failed, by loop and kind (dependency or error)",
            ["loop", "kind"], registry=registry,
        ) if registry is not None else None

    def start(self, name: str, step: Step, *, every: float, wake: asyncio.Event | None = None) -> None:
        """Run ``step`` every ``every`` seconds (or sooner when ``wake`` is set) until stopped."""
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"loop {name} is already running")
        state = self.loops[name] = LoopState(name)
        self._tasks[name] = asyncio.create_task(self._run(state, step, every, wake), name=name)

    def failing(self) -> dict[str, str]:
        """Loops that cannot go on, with why: the process should be restarted."""
        failing = {}
        for name, state in self.loops.items():
            task = self._tasks.get(name)
            if state.failing:
                failing[name] = f"{state.failures_in_a_row} failures in a row, last: {state.last_error}"
            elif task is not None and task.done() and not state.finished and not task.cancelled():
                failing[name] = "ended unexpectedly"
        return failing

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancel every loop and wait (bounded) for them to end."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.error("background loop did not stop in time", extra={"loop": task.get_name()})

    async def _run(self, state: LoopState, step: Step, every: float, wake: asyncio.Event | None) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            if wake is not None:
                # Cleared before the round, not after: a wake-up during the round is kept.
                wake.clear()
            try:
                result = await step()
            except asyncio.CancelledError:
                raise
            except DEPENDENCY_ERRORS as exc:
                self._count(state.name, "dependency")
                state.last_error = f"{type(exc).__name__}: {exc}"
                delay = _jittered(backoff)
                log.warning("%s: a dependency is unavailable; retrying", state.name,
                            extra={"loop": state.name, "error": state.last_error, "retry_in_s": round(delay, 1)})
            except Exception as exc:
                self._count(state.name, "error")
                state.failures_in_a_row += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                delay = _jittered(backoff)
                log.exception("%s failed; retrying", state.name,
                              extra={"loop": state.name, "failures_in_a_row": state.failures_in_a_row,
                                     "retry_in_s": round(delay, 1)})
            else:
                backoff = FIRST_BACKOFF_S
                state.failures_in_a_row = 0
                state.last_error = None
                state.last_success = time.time()
                if self._last_success is not None:
                    self._last_success.labels(state.name).set(state.last_success)
                if result == DONE:
                    state.finished = True
                    return
                await _pause(every if result is None else float(result), wake)
                continue
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            await _pause(delay, None)

    def _count(self, name: str, kind: str) -> None:
        if self._failures is not None:
            self._failures.labels(name, kind).inc()


def _jittered(backoff: float) -> float:
    # Half fixed, half random: replicas that failed together do not retry together.
    return backoff * (0.5 + random.random() / 2)


async def _pause(seconds: float, wake: asyncio.Event | None) -> None:
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    if wake is None:
        await asyncio.sleep(seconds)
        return
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        pass
