"""Per-device limits: one device cannot take the gateway from the others.

Each device has a token bucket of photos (a sustained rate and a burst) and a
limit of uploads at once. Past either it is answered ``429`` with ``Retry-After``
before its body is read, so a device in a retry loop, or a camera taken over,
costs the gateway next to nothing and the other devices do not notice.

A device is known here by its bearer token, which is in the request's head (the
device_id is in the body): a token authorises exactly one device, and a request
cannot spend another device's allowance without that device's token. With device
auth off (development), the client's address stands in for it.

The state is bounded: a bucket that has filled up again is the same as no bucket
and is dropped as the oldest entries are looked at, and past ``MAX_TRACKED``
entries the least recently seen device is forgotten (it then starts with a full
bucket), so a client inventing many tokens cannot grow the gateway's memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.common.config import DeviceLimits

# Ten times the site's devices: about 3 MB of state at most.
MAX_TRACKED = 10_000
# A device refused again and again is logged at most this often.
WARN_EVERY_S = 60.0
# A device refused within this long counts as throttled now (the gauge).
THROTTLED_WINDOW_S = 60.0


class _Device:
    __slots__ = ("device_id", "in_flight", "last_refused", "last_warned", "refused_since_warned", "tokens",
                 "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.in_flight = 0
        self.device_id: str | None = None  # learnt once a request of it is authorised
        self.last_refused = -math.inf
        self.last_warned = -math.inf
        self.refused_since_warned = 0


@dataclass(frozen=True)
class Refusal:
    """Why a device was refused, and when it may send again."""

    reason: str  # "rate" or "in_flight"
    detail: str
    retry_after_s: int
    device_id: str | None
    warn: bool  # the first refusal of a while: worth a log line
    refused_since_warned: int


class DeviceSlot:
    """One admitted upload: the device's place, to be released when the upload ends."""

    __slots__ = ("_device", "_limiter", "released")

    def __init__(self, limiter: DeviceLimiter, device: _Device) -> None:
        self._limiter = limiter
        self._device = device
        self.released = False

    def identify(self, device_id: str) -> None:
        """Name the device (known once its body is read and its token checked), for log lines."""
        self._device.device_id = device_id

    def refund(self) -> None:
        """Give back the photo this upload took from the bucket (it was refused for another reason)."""
        device = self._device
        device.tokens = min(float(self._limiter.limits.burst), device.tokens + 1)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._device.in_flight -= 1


class DeviceLimiter:
    def __init__(self, limits: DeviceLimits, *, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        self.limits = limits
        self.rate_per_s = limits.photos_per_minute / 60
        self._clock = clock
        self._max_tracked = max_tracked
        self._devices: OrderedDict[str, _Device] = OrderedDict()

    def __len__(self) -> int:
        return len(self._devices)

    def admit(self, key: str) -> DeviceSlot | Refusal:
        """Take one photo from ``key``'s bucket and a place among its uploads, or say why not."""
        now = self._clock()
        device = self._device(key, now)
        limits = self.limits
        if device.in_flight >= limits.max_inflight:
            return self._refuse(device, now, "in_flight", 1,
                                f"this device already has {device.in_flight} uploads in flight, the most one device "
                                f"may have at once; send the next when one is answered")
        device.tokens = min(float(limits.burst), device.tokens + (now - device.updated) * self.rate_per_s)
        device.updated = now
        if device.tokens < 1:
            wait = max(1, math.ceil((1 - device.tokens) / self.rate_per_s))
            return self._refuse(device, now, "rate", wait,
                                f"this device sends faster than the {limits.photos_per_minute:g} photos a minute "
                                f"(after a burst of {limits.burst}) one device may send; retry after {wait} s")
        device.tokens -= 1
        device.in_flight += 1
        return DeviceSlot(self, device)

    def throttled(self) -> int:
        """Devices refused within the last minute."""
        since = self._clock() - THROTTLED_WINDOW_S
        return sum(1 for device in self._devices.values() if device.last_refused >= since)

    def _device(self, key: str, now: float) -> _Device:
        device = self._devices.get(key)
        if device is not None:
            self._devices.move_to_end(key)
        else:
            self._forget_idle(now)
            device = self._devices[key] = _Device(float(self.limits.burst), now)
        return device

    def _forget_idle(self, now: float) -> None:
        """Drop the least recently seen devices while their buckets are full again, or past the bound."""
        refill_s = self.limits.burst / self.rate_per_s
        for _ in range(len(self._devices)):
            key, device = next(iter(self._devices.items()))
            if device.in_flight:
                self._devices.move_to_end(key)  # in use: its place is kept whatever the bound says
                continue
            full_again = now - device.updated >= refill_s and now - device.last_refused >= THROTTLED_WINDOW_S
            if not full_again and len(self._devices) < self._max_tracked:
                return
            # A full bucket is the same as none; past the bound, this device starts afresh when it returns.
            del self._devices[key]

    def _refuse(self, device: _Device, now: float, reason: str, retry_after_s: int, detail: str) -> Refusal:
        device.last_refused = now
        device.refused_since_warned += 1
        warn = now - device.last_warned >= WARN_EVERY_S
        refusal = Refusal(reason=reason, detail=detail, retry_after_s=retry_after_s, device_id=device.device_id,
                          warn=warn, refused_since_warned=device.refused_since_warned)
        if warn:
            device.last_warned = now
            device.refused_since_warned = 0
        return refusal
