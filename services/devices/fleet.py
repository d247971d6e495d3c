"""A simulated site: N devices each sending R photos a minute to a gateway, as real ones would.

**Open model.** Each device sends on its own schedule (phases spread over the
interval), whether or not its earlier photos are done; a photo's latency runs
from the moment it was *meant* to be sent until it was accepted, so a gateway
that stalls shows up as latency rather than as a lower send rate (coordinated
omission). ``burst`` instead sends one photo from every device at the same
instant.

**Retries as the reference client does** (``client.should_retry``,
``client.Backoff``): the same request again after the backoff, never sooner
than ``Retry-After``, whether the gateway deferred it (``503``) or the device
was past its limits (``429``). A waiting retry is a scheduled event, not a sleeping
thread, so a thousand deferred devices hold no workers. A photo counts as
failed only if it was never accepted by the end (retries included).

One worker pool sends; each device has one connection and sends one request at
a time, as a camera does.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hdrh.histogram import HdrHistogram

from services.common.tokens import device_token
from services.devices.client import Answer, Backoff, DeviceClient, Photo, Request, result_of, should_retry
from services.devices.jpegs import JpegMaker

LATENCY_MAX_MS = 24 * 3600 * 1000
BUSY_RETRY_S = 0.05  # a device still sending its previous photo looks again this soon


@dataclass(frozen=True)
class FleetPlan:
    gateway: str
    devices: int
    per_minute: float
    duration_s: float
    size: int
    fmt: str = "json"  # json, msgpack or mixed
    burst: bool = False
    drain_s: float = 120.0  # after the last send, how long unfinished retries may go on
    workers: int = 64
    seed: int | None = None
    device_prefix: str = "sim"
    max_backoff_s: float = 30.0
    ca_file: str | None = None  # the site's CA, for an https:// gateway
    exact_size: bool = False  # every photo ``size`` bytes, rather than the site's spread around it


@dataclass
class _Upload:
    device: int
    meant_at: float  # monotonic: when the photo was meant to be sent
    request: Request | None = None
    sha256: str = ""
    attempts: int = 0


@dataclass
class Tally:
    """What happened, as it happens (updated by the workers under the lock)."""

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    retries: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    photos: list[dict[str, str]] = field(default_factory=list)
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, LATENCY_MAX_MS, 3))
    latency_series: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, ms)

    def report(self, duration_s: float) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "retries": self.retries,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "latency_ms": {
                "p50": self.latency.get_value_at_percentile(50),
                "p90": self.latency.get_value_at_percentile(90),
                "p99": self.latency.get_value_at_percentile(99),
                "max": self.latency.get_max_value(),
            },
            "duration_s": round(duration_s, 2),
            "photos": self.photos,
        }


class Fleet:
    def __init__(self, plan: FleetPlan, *, secret: str,
                 progress: Callable[[Fleet], None] | None = None) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._jpegs = JpegMaker(plan.size, rng=random.Random(self._rng.random()))
        backoff = Backoff(cap_s=plan.max_backoff_s, rng=random.Random(self._rng.random()).random)
        self._clients = [
            DeviceClient(plan.gateway, name, device_token(secret, name), fmt=self._format_of(i), backoff=backoff,
                         ca_file=plan.ca_file)
            for i, name in enumerate(self.device_ids())
        ]
        self._busy = [threading.Lock() for _ in self._clients]
        self.tally = Tally()
        self._lock = threading.Lock()
        self._due: list[tuple[float, int, _Upload]] = []  # (when, tie-breaker, upload)
        self._order = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._pending = 0  # photos sent and not yet settled
        self._closing = False
        self._progress = progress
        self.started = 0.0

    def device_ids(self) -> list[str]:
        return [f"{self.plan.device_prefix}-{i:04d}" for i in range(self.plan.devices)]

    def _format_of(self, device: int) -> str:
        if self.plan.fmt == "mixed":
            return ("json", "msgpack")[device % 2]
        return self.plan.fmt

    def run(self) -> dict[str, Any]:
        """Send the plan's photos, settle every one (accepted or failed), and report."""
        plan = self.plan
        self.started = time.monotonic()
        last_send = self.started + (0 if plan.burst else plan.duration_s)
        self._schedule_photos(last_send)
        with ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="device") as pool:
            next_progress = self.started
            while True:
                with self._lock:
                    if not self._due and self._pending == 0:
                        break
                    now = time.monotonic()
                    if now > last_send + plan.drain_s:
                        break  # what is still unsettled is reported as failed
                    if self._due and self._due[0][0] <= now:
                        _, _, upload = heapq.heappop(self._due)
                        pool.submit(self._attempt, upload)
                        continue
                    wait = min(0.25, self._due[0][0] - now) if self._due else 0.25
                    self._wake.wait(wait)
                if self._progress is not None and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + 1.0
                    self._progress(self)
            with self._lock:
                self._closing = True  # attempts still under way settle, but nothing is sent again
        # Past the drain: photos never accepted, and photos never even sent, failed.
        never_sent = sum(1 for _, _, upload in self._due if upload.request is None)
        self.tally.sent += never_sent
        self.tally.failed += self._pending + never_sent
        self._due.clear()
        for client in self._clients:
            client.close()
        if self._progress is not None:
            self._progress(self)
        return self.tally.report(time.monotonic() - self.started)

    def _schedule_photos(self, last_send: float) -> None:
        plan = self.plan
        if plan.burst:
            for device in range(plan.devices):
                self._push(self.started, _Upload(device, self.started))
            return
        interval = 60.0 / plan.per_minute
        for device in range(plan.devices):
            # Phases spread evenly over the interval, with a little jitter: no two devices in step.
            phase = (device / plan.devices + self._rng.uniform(0, 0.5 / plan.devices)) * interval
            meant = self.started + phase
            while meant < last_send:
                self._push(meant, _Upload(device, meant))
                meant += interval

    def _push(self, when: float, upload: _Upload) -> None:
        heapq.heappush(self._due, (when, next(self._order), upload))

    def _again(self, when: float, upload: _Upload) -> None:
        with self._lock:
            if self._closing:
                return  # past the drain: it stays unsettled, and counts as failed
            self._push(when, upload)
            self._wake.notify()

    def _attempt(self, upload: _Upload) -> None:
        device = upload.device
        if not self._busy[device].acquire(blocking=False):
            self._again(time.monotonic() + BUSY_RETRY_S, upload)
            return
        try:
            if upload.request is None:
                upload.request = self._new_request(upload)
            answer = self._clients[device].send(upload.request)
        finally:
            self._busy[device].release()
        self._settle(upload, answer)

    def _new_request(self, upload: _Upload) -> Request:
        image = self._jpegs.make(self.plan.size if self.plan.exact_size else None)
        upload.sha256 = hashlib.sha256(image).hexdigest()
        # captured_at as the camera took it: the meant time on the wall clock.
        taken = datetime.now(UTC) - timedelta(seconds=time.monotonic() - upload.meant_at)
        captured = taken.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            self.tally.sent += 1
            self._pending += 1
        return self._clients[upload.device].request(Photo(image=image, captured_at=captured))

    def _settle(self, upload: _Upload, answer: Answer) -> None:
        upload.attempts += 1
        now = time.monotonic()
        with self._lock:
            tally = self.tally
            tally.statuses[answer.status] += 1
            if upload.attempts > 1:
                tally.retries += 1
            if answer.status in (200, 201):
                self._pending -= 1
                tally.accepted += 1
                tally.duplicates += answer.status == 200
                latency_ms = max(1, round((now - upload.meant_at) * 1000))
                tally.latency.record_value(min(latency_ms, LATENCY_MAX_MS))
                tally.latency_series.append((round(upload.meant_at - self.started, 3), latency_ms))
                photo_id = result_of(answer, upload.attempts).photo_id
                if photo_id:
                    tally.photos.append({"id": photo_id, "sha256": upload.sha256})
                self._wake.notify()
                return
            if not should_retry(answer.status):
                self._pending -= 1
                tally.failed += 1
                self._wake.notify()
                return
        delay = self._clients[upload.device].backoff.delay(upload.attempts, answer.retry_after)
        self._again(now + delay, upload)

    # -- figures while it runs -----------------------------------------------------------------

    def progress_line(self) -> str:
        t = self.tally
        elapsed = max(1e-3, time.monotonic() - self.started)
        deferred = sum(n for status, n in t.statuses.items() if status in (429, 503))
        return (f"{elapsed:6.0f} s  sent {t.sent}  accepted {t.accepted}  deferred {deferred}  "
                f"failed {t.failed}  {t.accepted / elapsed:.1f}/s  p99 {t.latency.get_value_at_percentile(99)} ms")


def terminal_progress(fleet: Fleet) -> None:
    """A live line on a terminal; nothing when standard error is not one."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + fleet.progress_line() + "\x1b[K")
        sys.stderr.flush()
