"""The deny list: devices an operator has shut out (a stolen camera), answered ``403`` by every gateway.

One JSON object in the local store, like the shipping control: the store keeper
writes it (``PUT``/``DELETE /api/devices/denied/{id}``, ``photoferry deny``), each
gateway reads it every few seconds, so a change takes effect within seconds and
without a restart, and outlives restarts. Tokens are stateless, so this is how
one device is retired without rotating the whole site's secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from services.common.localstore import LocalStore
from services.common.photos import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

DENY_LIST_KEY = "state/denied-devices.json"
MAX_DENIED = 10_000
MAX_REASON = 200


class DenyListUnreadable(ValueError):
    """The object in the store is not a deny list (written by hand, or by another version)."""


@dataclass(frozen=True)
class DeniedDevice:
    device_id: str
    reason: str
    denied_at: str  # RFC 3339


@dataclass(frozen=True)
class DenyList:
    devices: dict[str, DeniedDevice] = field(default_factory=dict)
    updated_at: str | None = None

    def reason(self, device_id: str) -> str | None:
        """Why ``device_id`` is denied, or None when it is not."""
        denied = self.devices.get(device_id)
        return None if denied is None else denied.reason

    def deny(self, device_id: str, reason: str) -> DenyList:
        entry = DeniedDevice(device_id=device_id, reason=reason, denied_at=_now())
        return DenyList(devices={**self.devices, device_id: entry}, updated_at=entry.denied_at)

    def allow(self, device_id: str) -> DenyList:
        return DenyList(devices={k: v for k, v in self.devices.items() if k != device_id}, updated_at=_now())

    def to_json(self) -> bytes:
        return orjson.dumps({"devices": [vars(d) for d in sorted(self.devices.values(), key=lambda d: d.device_id)],
                             "updated_at": self.updated_at})

    @classmethod
    def from_json(cls, body: bytes) -> DenyList:
        try:
            data: dict[str, Any] = orjson.loads(body)
            devices = [DeniedDevice(device_id=str(d["device_id"]), reason=str(d["reason"]),
                                    denied_at=str(d["denied_at"])) for d in data["devices"]]
            updated_at = data.get("updated_at")
        except (ValueError, TypeError, KeyError) as exc:
            raise DenyListUnreadable(f"{DENY_LIST_KEY} is not a deny list: {exc!r}") from None
        bad = [d.device_id for d in devices if not DEVICE_ID_PATTERN.fullmatch(d.device_id)]
        if bad:
            raise DenyListUnreadable(f"{DENY_LIST_KEY} names {len(bad)} device id(s) that are not ids, e.g. {bad[0]!r}")
        return cls(devices={d.device_id: d for d in devices}, updated_at=updated_at)


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def read_deny_list(store: LocalStore) -> DenyList:
    """The deny list in the store (empty when none was ever written); raise DenyListUnreadable."""
    body = await store.read(DENY_LIST_KEY)
    return DenyList() if body is None else DenyList.from_json(body)


async def write_deny_list(store: LocalStore, deny_list: DenyList) -> None:
    await store.put(DENY_LIST_KEY, deny_list.to_json(), metadata={"Content-Type": "application/json"})
