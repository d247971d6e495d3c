"""Admission: whether gateways take new uploads, decided by the store keeper.

When the local store fills past its high watermark the store keeper closes
admission and every gateway answers uploads with 503 and ``Retry-After`` until
usage falls under the low watermark. The decision is one small object in the
local store that gateways read every few seconds. A decision the store keeper has
not renewed for ``STALE_AFTER_S`` is ignored (the keeper is down): the gateways
then take uploads, and a store that is really full refuses them itself.

The watermark holds at the site's rate although decisions are seconds apart: an
open decision also gives each gateway an **allowance**, its share of the room left
under the high watermark when the keeper decided. Each gateway keeps a running
total of the bytes it stored and sends it with every photo it queues; the keeper
returns, in each decision, the last total it heard from each gateway. A gateway's
photos the decision does not count yet are exactly its total now less the total
the keeper heard: it refuses once they spend its allowance, so usage passes the
high watermark by at most one photo per gateway before the next decision arrives.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import orjson

from services.common.localstore import LocalStore
from services.common.messages import PUBLISHER

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
    # Bytes each gateway may store beyond what used_bytes counts (None: no limit, e.g. an older keeper).
    allowance_bytes: int | None = None
    # The running total of stored bytes the keeper last heard from each gateway.
    heard_bytes: dict[str, int] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, body: bytes) -> Admission:
        """Parse a decision; raise ValueError or TypeError when it is not a well-formed one.

        Fields this release does not know (from a newer keeper) are ignored.
        """
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise TypeError("an admission decision is a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        decision = cls(**{k: v for k, v in data.items() if k in known})
        if not isinstance(decision.open, bool) or not isinstance(decision.decided_at, str):
            raise TypeError("open must be a boolean and decided_at a string")
        if decision.allowance_bytes is not None and (
                isinstance(decision.allowance_bytes, bool) or not isinstance(decision.allowance_bytes, int)):
            raise TypeError("allowance_bytes must be a whole number of bytes")
        if decision.heard_bytes is not None and not isinstance(decision.heard_bytes, dict):
            raise TypeError("heard_bytes must map gateways to bytes")
        if decision.decided_at:
            decided = datetime.fromisoformat(decision.decided_at)
            if decided.tzinfo is None:
                raise ValueError(f"decided_at {decision.decided_at!r} has no offset")
        return decision

    def stale(self, now: datetime) -> bool:
        if not self.decided_at:
            return True
        return (now - datetime.fromisoformat(self.decided_at)).total_seconds() > STALE_AFTER_S


class AdmissionView:
    """A gateway's view of admission: the keeper's latest decision, and what this gateway stored."""

    def __init__(self, publisher: str = PUBLISHER) -> None:
        self.current = Admission()
        self.publisher = publisher
        self.stored_bytes = 0  # running total of the bytes this gateway stored (sent with each photo)
        self._stored_at_read = 0  # ... when the current decision was read

    def update(self, decision: Admission) -> None:
        self.current = decision
        self._stored_at_read = self.stored_bytes

    def admits(self) -> bool:
        """Whether an upload may go ahead (checked before its body is read)."""
        return self.current.open and self._room() > 0

    def refusal(self) -> str:
        """Why uploads are refused, for the problem's detail."""
        return self.current.reason or "this gateway's share of the room under the high watermark is used up"

    def reserve(self, nbytes: int) -> bool:
        """Count a photo about to be stored against the allowance; False when it is spent."""
        if not self.admits():
            return False
        self.stored_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """A reserved photo was not stored after all (it was there already, or the write failed)."""
        self.stored_bytes -= nbytes

    def _room(self) -> float:
        decision = self.current
        if decision.allowance_bytes is None or decision.stale(datetime.now(UTC)):
            return float("inf")
        heard = (decision.heard_bytes or {}).get(self.publisher)
        # A keeper that has not heard from this gateway yet (it just started): what was
        # stored since the decision was read is what it cannot count.
        uncounted = self.stored_bytes - (heard if heard is not None else self._stored_at_read)
        return decision.allowance_bytes - uncounted


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
