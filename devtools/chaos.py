"""Chaos: the whole site under a steady load of devices while its parts fail, and a ledger after each round.

The site is private to the run: a RabbitMQ node, a local store and a remote S3
stand-in as processes, the three services, and two misbehaving proxies, one
between the services and the broker, one between the shipper and S3. Simulated
devices (``services.devices.fleet``) send photos and retry as the contract says.
At random moments (a printed seed replays them) one fault at a time:

- ``kill-gateway``, ``kill-store``, ``kill-shipper``, ``kill-broker``: ``kill -9``, then started again;
- ``remote-stopped``: the remote S3 frozen (SIGSTOP), then resumed;
- ``broker-latency``, ``broker-cut``, ``broker-half-open``: the broker link slow, cut, or silently dropping;
- ``broker-alarm``: the broker's disk alarm (it blocks every publisher), then cleared;
- ``s3-latency``, ``s3-cut``, ``s3-half-open``, ``s3-slow``: the same for S3, and a link below the cap.

After the load, the ledger: every photo answered 2xx is in the remote bucket,
byte-identical, one object each; nothing is parked; the queues drain. Any
miss fails the round.

    python -m devtools.chaos --rounds 3 --seed 42
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.servers import wait_until
from devtools.site import DEVICE_SECRET, PREFIX, REMOTE_BUCKET, PrivateSite
from services.common import photos, topology
from services.devices.fleet import Fleet, FleetPlan
from services.devices.verify import check_arrivals, expected_of

FAULTS = ("kill-gateway", "kill-store", "kill-shipper", "kill-broker", "remote-stopped",
          "broker-latency", "broker-cut", "broker-half-open", "broker-alarm",
          "s3-latency", "s3-cut", "s3-half-open", "s3-slow")


@dataclass(frozen=True)
class RoundPlan:
    devices: int = 50
    per_minute: float = 12.0
    load_s: float = 40.0
    size: int = 50_000
    faults: int = 4
    fault_s: tuple[float, float] = (3.0, 8.0)  # how long each fault lasts
    settle_s: float = 300.0  # after the load, how long the site gets to ship everything
    order: tuple[str, ...] = ()  # these faults in this order (at random moments); empty: drawn at random


@dataclass
class Ledger:
    round: int
    seed: int
    photos: int = 0  # accepted by the gateway (2xx)
    sent: int = 0
    failed: int = 0  # never accepted: the devices would still hold them
    retries: int = 0
    faults: list[str] = field(default_factory=list)
    arrived: int = 0
    lost: int = 0  # accepted, not in S3
    different: int = 0  # in S3 with other bytes
    duplicates: int = 0  # objects in S3 no accepted photo explains
    reuploads: int = 0  # photos uploaded more than once (harmless, but wasted uplink)
    parked: int = 0
    queued_after: dict[str, int] = field(default_factory=dict)  # queues not empty at the end
    settle_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.different or self.duplicates or self.parked or self.queued_after)

    @property
    def still_queued(self) -> int:
        return sum(self.queued_after.values())


def run_round(site: PrivateSite, number: int, seed: int, plan: RoundPlan,
              say: Callable[[str], None] = print) -> Ledger:
    """One round of load and faults, then the ledger."""
    rng = random.Random(seed)
    ledger = Ledger(round=number, seed=seed)
    gateway = site.services["gateway"]
    fleet = Fleet(FleetPlan(gateway=gateway.url, devices=plan.devices, per_minute=plan.per_minute,
                            duration_s=plan.load_s, size=plan.size, seed=seed, drain_s=plan.settle_s,
                            workers=32, device_prefix=f"r{number}", max_backoff_s=10),
                  secret=DEVICE_SECRET)
    report: dict[str, Any] = {}
    load = threading.Thread(target=lambda: report.update(fleet.run()), name="fleet")
    started = time.monotonic()
    load.start()
    # Fault start times spread over the load, one at a time, leaving its last 10 s clean.
    slots = sorted(rng.uniform(3, max(4.0, plan.load_s - 10)) for _ in range(plan.faults))
    for i, at in enumerate(slots):
        fault = plan.order[i % len(plan.order)] if plan.order else rng.choice(FAULTS)
        lasts = rng.uniform(*plan.fault_s)
        pause = started + at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        say(f"  round {number}: {time.monotonic() - started:5.1f} s  {fault} for {lasts:.1f} s")
        heal = site.inject(fault)
        time.sleep(lasts)
        heal()
        ledger.faults.append(fault)
    load.join()
    settle_started = time.monotonic()
    ledger.sent, ledger.photos, ledger.failed, ledger.retries = (
        report["sent"], report["accepted"], report["failed"], report["retries"])
    expected = expected_of(report["photos"])
    arrival = check_arrivals(site.remote_client(), REMOTE_BUCKET, PREFIX, expected, timeout_s=plan.settle_s,
                             full=True)
    ledger.arrived = len(arrival.arrived) - len(arrival.different)
    ledger.lost = len(arrival.missing)
    ledger.different = len(arrival.different)
    # Objects of this round's devices that no accepted photo explains (earlier rounds' are expected).
    ledger.duplicates = len([key for key in arrival.unexpected
                             if photos.owner_of(photos.id_from_key(key)).startswith(f"r{number}-")])
    # A copy of a shipped photo may still wait out a retry delay (up to 2 min after two failures);
    # it is acknowledged as a duplicate when it comes back.
    remaining = max(30.0, plan.settle_s - (time.monotonic() - settle_started))
    try:
        wait_until(lambda: sum(site.queued().values()) == 0, timeout=remaining, what="the queues drained",
                   interval=1)
    except TimeoutError:
        pass
    ledger.queued_after = {name: n for name, n in site.queued().items() if n}
    ledger.parked = max(site.parked_markers(), site.queued()[topology.PARKED_QUEUE])
    ledger.reuploads = sum(n - 1 for photo_id, n in site.uploads_per_photo().items()
                           if n > 1 and photo_id in expected)
    ledger.settle_s = round(time.monotonic() - settle_started, 1)
    return ledger


def describe(ledger: Ledger) -> str:
    return (f"round {ledger.round} (seed {ledger.seed}): {ledger.photos} photos accepted of {ledger.sent} sent, "
            f"{ledger.failed} never accepted, {ledger.retries} device retries; faults: {', '.join(ledger.faults)}; "
            f"in S3 byte-identical: {ledger.arrived}, lost {ledger.lost}, different {ledger.different}, "
            f"duplicates {ledger.duplicates}, re-uploads {ledger.reuploads}, parked {ledger.parked}, "
            f"still queued {ledger.still_queued} {ledger.queued_after or ''}; settled in {ledger.settle_s} s "
            + ("CLEAN" if ledger.clean else "FAILED"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, help="replays a run (printed at its start)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--per-minute", type=float, default=12.0)
    parser.add_argument("--load", type=float, default=90.0, help="seconds of load per round")
    parser.add_argument("--faults", type=int, default=8, help="faults per round")
    parser.add_argument("--size", type=int, default=80_000)
    parser.add_argument("--report", type=Path, help="write the ledgers (JSON) here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"chaos: seed {seed} (replay with --seed {seed})", flush=True)
    plan = RoundPlan(devices=args.devices, per_minute=args.per_minute, load_s=args.load, size=args.size,
                     faults=args.faults)
    ledgers = []
    with tempfile.TemporaryDirectory(prefix="photoferry-chaos-") as workdir:
        site = PrivateSite(Path(workdir))
        try:
            site.start()
            rounds = random.Random(seed)
            for number in range(1, args.rounds + 1):
                ledger = run_round(site, number, rounds.randrange(2**31), plan, say=lambda s: print(s, flush=True))
                ledgers.append(ledger)
                print(describe(ledger), flush=True)
        finally:
            site.stop()
    total = sum(ledger.photos for ledger in ledgers)
    print(f"chaos: {len(ledgers)} rounds, {total} photos, {sum(len(ledger.faults) for ledger in ledgers)} faults, "
          f"lost {sum(ledger.lost for ledger in ledgers)}, duplicates {sum(ledger.duplicates for ledger in ledgers)}")
    if args.report:
        args.report.write_text(json.dumps([asdict(ledger) for ledger in ledgers], indent=1))
    sys.exit(0 if all(ledger.clean for ledger in ledgers) else 1)


if __name__ == "__main__":
    main()
