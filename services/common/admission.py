"""Admission: whether gateways take new uploads, decided by the store keeper.

When the local store fills past its high watermark the store keeper closes
admission and every gateway answers uploads with 503 and ``Retry-After`` until
usage falls under the low watermark. The decision is one small object in the
local store that gateways read every few seconds. A decision the store keeper has
not renewed for ``STALE_AFTER_S`` is ignored (the keeper is down): the gateways
then take uploads, and a store that is really full refuses them itself.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import orjson

from services.common.localstore import LocalStore

log = logging.getLogger(__name__)

ADMISSION_KEY = "state/admission.json"
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Admission:
    open: bool = True
    reason: str = ""
    used_bytes: int = 0
    capacity_bytes: int = 0
    decided_at: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, body: bytes) -> Admission:
        """Parse a decision; raise ValueError or TypeError when it is not a well-formed one."""
        decision = cls(**orjson.loads(body))
        if not isinstance(decision.open, bool) or not isinstance(decision.decided_at, str):
            raise TypeError("open must be a boolean and decided_at a string")
        if decision.decided_at:
            decided = datetime.fromisoformat(decision.decided_at)
            if decided.tzinfo is None:
                raise ValueError(f"decided_at {decision.decided_at!r} has no offset")
        return decision

    def stale(self, now: datetime) -> bool:
        if not self.decided_at:
            return True
        return (now - datetime.fromisoformat(self.decided_at)).total_seconds() > STALE_AFTER_S


async def read_admission(store: LocalStore) -> Admission:
    """The keeper's decision, or an open admission when there is none or it is stale."""
    body = await store.read(ADMISSION_KEY)
    if body is None:
        return Admission()
    try:
        decision = Admission.from_json(body)
    except (ValueError, TypeError) as exc:
        log.error("admission object is unreadable; taking uploads", extra={"error": str(exc)})
        return Admission()
    if not decision.open and decision.stale(datetime.now(UTC)):
        log.warning("admission closed by a decision the store keeper has not renewed; taking uploads",
                    extra={"decided_at": decision.decided_at})
        return Admission()
    return decision


async def write_admission(store: LocalStore, decision: Admission) -> None:
    await store.put(ADMISSION_KEY, decision.to_json(), metadata={"Content-Type": "application/json"})
