"""The shipper under the broker's rules, measured side by side with a baseline checkout.

Each scenario runs on a private site (``devtools.site``) with photos of about
250 KB, once with this checkout's services and, given ``--baseline REF``, once
with the services of that git revision (a temporary worktree), so every figure
has its baseline beside it:

- **alarm**: 250 photos queued at a 1 MB/s cap, 15 s of draining, then the broker's
  disk alarm (it blocks every connection that publishes) for 40 s: egress on the
  wire before and while it lasts, as a share of the cap (goal 80% or more while
  photos wait), how long the
  gateway takes to refuse an upload and an operator's request to be answered,
  and after the alarm: lost, duplicated and parked photos;
- **after-pause**: shipping paused, 120 photos uploaded and left past the fresh
  window (30 s, share 0.5, cap 1 MB/s), then shipping resumed while new photos
  arrive at a quarter of the cap: the new photos' receipt to S3, p50 and p90
  (goal p90 6 s or less), and the backlog's egress meanwhile;
- **lag**: 12 photos a second under a 5 MB/s cap, nothing waiting: receipt to S3,
  p50 and p99 (goal p99 under 1 s).

Receipt to S3 is what the shippers report in their shipped notices (the gateway's
receipt time to the end of the upload); egress is counted on the wire by the
proxy in front of the remote S3.

    python -m bench.shipper_rules [--scenarios alarm,after-pause,lag] [--baseline d7f1d65]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import requests

from devtools.servers import REPO, wait_until
from devtools.site import ADMIN_TOKEN, DEVICE_SECRET, PREFIX, REMOTE_BUCKET, PrivateSite
from services.common import topology
from services.common.shipping import ShippedNotice
from services.common.tokens import device_token
from services.devices.client import DeviceClient, Photo, result_of
from services.devices.jpegs import JpegMaker

MB = 1_000_000
SIZE = 250_000
DOC = REPO / "docs" / "benchmarks.md"
DOC_START, DOC_END = "<!-- shipper-rules:start -->", "<!-- shipper-rules:end -->"


# -- a site, and what it tells ---------------------------------------------------------------


@contextlib.contextmanager
def private_site(code: Path, cap: int, **settings: str) -> Iterator[PrivateSite]:
    with tempfile.TemporaryDirectory(prefix="photoferry-bench-rules-") as workdir:
        site = PrivateSite(Path(workdir), cap=str(cap), code=code, settings={"PHOTOFERRY_LOG_LEVEL": "info",
                                                                           "PHOTOFERRY_RECONCILE_EVERY": "5m",
                                                                           **settings})
        try:
            site.start()
            yield site
        finally:
            site.stop()


class Notices:
    """Every shipped notice the shippers publish, heard on a queue of our own: photo id -> (lag, class)."""

    def __init__(self, site: PrivateSite) -> None:
        self.site = site
        self.shipped: dict[str, tuple[float, str]] = {}
        self.heard_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    def __enter__(self) -> Notices:
        self._thread.start()
        self._ready.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _listen(self) -> None:
        connection = await aio_pika.connect(self.site.rabbit.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("", exclusive=True)
            await queue.bind(topology.SHIPPED_EXCHANGE)

            async def heard(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                notice = ShippedNotice.from_json(message.body)
                for photo_id, _size, lag, kind in notice.photos if notice else []:
                    self.shipped.setdefault(photo_id, (lag, kind))
                    self.heard_at.setdefault(photo_id, time.monotonic())

            await queue.consume(heard, no_ack=True)
            self._ready.set()
            await asyncio.get_running_loop().run_in_executor(None, self._stop.wait)


def device(site: PrivateSite, name: str) -> DeviceClient:
    return DeviceClient(site.services["gateway"].url, name, device_token(DEVICE_SECRET, name))


def send(client: DeviceClient, jpegs: JpegMaker) -> tuple[int, str | None, float]:
    """One upload, no retries: (status, photo id when accepted, seconds the answer took)."""
    started = time.monotonic()
    result = result_of(client.send(client.request(Photo(image=jpegs.make(), captured_at=_now()))), 1)
    return result.status, result.photo_id, time.monotonic() - started


def upload(site: PrivateSite, count: int, prefix: str) -> list[str]:
    """``count`` photos from as many devices (none past its own limits), accepted; their ids."""
    jpegs = JpegMaker(SIZE)

    def one(n: int) -> str:
        client = device(site, f"{prefix}-{n}")
        try:
            status, photo_id, _ = send(client, jpegs)
        finally:
            client.close()
        assert status == 201 and photo_id, status
        return photo_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def operator(site: PrivateSite, method: str, path: str, body: object = None) -> float:
    """An operator's request; how long its answer took."""
    started = time.monotonic()
    requests.request(method, f"{site.services['store'].url}{path}", json=body, timeout=30,
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).raise_for_status()
    return time.monotonic() - started


def shipping_messages(site: PrivateSite, figure: str = "messages") -> int:
    """Messages on both shipping queues (``messages``: ready or in a shipper's hands)."""
    return sum(int(site.rabbit.management("GET", f"queues/%2F/{name}").get(figure, 0))  # type: ignore[union-attr]
               for name in (topology.FRESH_QUEUE, topology.SHIP_QUEUE))


def remote_counts(site: PrivateSite) -> dict[str, int]:
    """Objects in the remote bucket per photo id (more than one would be a duplicate)."""
    counts: dict[str, int] = {}
    client = site.remote_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=REMOTE_BUCKET, Prefix=PREFIX):
        for item in page.get("Contents", []):
            photo_id = item["Key"].rsplit("/", 1)[-1]
            counts[photo_id] = counts.get(photo_id, 0) + 1
    return counts


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- scenarios --------------------------------------------------------------------------------


def scenario_alarm(code: Path) -> dict[str, Any]:
    cap, control_s, alarm_s = 1 * MB, 15.0, 40.0
    with private_site(code, cap) as site:
        assert site.s3_link is not None
        operator(site, "POST", "/api/shipping/pause")
        queued = upload(site, 250, "cam-alarm")
        wait_until(lambda: shipping_messages(site, "messages_ready") >= 250, timeout=60, what="photos queued")
        operator(site, "POST", "/api/shipping/resume")
        # The same drain without an alarm first, to compare with.
        wait_until(lambda: site.s3_link.total() > 0, timeout=60, what="shipping under way")  # type: ignore[union-attr]
        time.sleep(2)  # past the start (the bench's own schedule, not a wait for a condition)
        started, sent_before = time.monotonic(), site.s3_link.total()
        time.sleep(control_s)
        control = (site.s3_link.total() - sent_before) / (time.monotonic() - started)
        site.rabbit.set_disk_alarm(True)
        wait_until(site.rabbit.disk_alarm, timeout=30, what="the disk alarm")
        raised, sent_before = time.monotonic(), site.s3_link.total()
        waiting_before = shipping_messages(site)
        client = device(site, "cam-alarm-late")
        status, _, refused_s = send(client, JpegMaker(SIZE))
        operator_s = operator(site, "PUT", "/api/shipping/rate", {"rate": cap})
        # Egress while photos still wait (the shipped notices wait for the alarm too: ask the queues).
        while time.monotonic() - raised < alarm_s and shipping_messages(site) > 0:
            time.sleep(0.2)
        lasted = time.monotonic() - raised
        egress = (site.s3_link.total() - sent_before) / lasted
        shipped_during = waiting_before - shipping_messages(site)
        site.rabbit.set_disk_alarm(False)
        wait_until(lambda: not site.rabbit.disk_alarm(), timeout=30, what="the alarm cleared")
        accepted_after = wait_for_acceptance(client)
        client.close()
        wait_until(lambda: all(remote_counts(site).get(i) for i in queued), timeout=300, what="every photo in S3",
                   interval=2)
        counts = remote_counts(site)
        parked = site.parked_markers()
    return {"egress_before_alarm_share_of_cap": round(control / cap, 3),
            "egress_during_alarm_share_of_cap": round(egress / cap, 3), "alarm_measured_s": round(lasted, 1),
            "shipped_during_alarm": shipped_during, "gateway_answer": status, "gateway_answer_s": round(refused_s, 2),
            "operator_answer_s": round(operator_s, 2), "accepted_after_alarm_s": accepted_after,
            "lost": sum(1 for i in queued if counts.get(i, 0) == 0),
            "duplicated": sum(1 for n in counts.values() if n > 1), "parked": parked}


def wait_for_acceptance(client: DeviceClient) -> float | None:
    """Seconds until the gateway takes a photo again (None: not within a minute)."""
    started = time.monotonic()
    jpegs = JpegMaker(SIZE)
    while time.monotonic() - started < 60:
        if send(client, jpegs)[0] in (200, 201):
            return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    return None


def scenario_after_pause(code: Path) -> dict[str, Any]:
    cap, window = 1 * MB, 30
    with private_site(code, cap, PHOTOFERRY_SHIP_FRESH_WINDOW=f"{window}s",
                      PHOTOFERRY_SHIP_FRESH_SHARE="0.5") as site, Notices(site) as notices:
        assert site.s3_link is not None
        operator(site, "POST", "/api/shipping/pause")
        backlog = upload(site, 120, "cam-old")
        time.sleep(window + 5)  # the scenario: left longer than the fresh window
        operator(site, "POST", "/api/shipping/resume")
        resumed, sent_before = time.monotonic(), site.s3_link.total()
        new: dict[str, float] = {}
        jpegs = JpegMaker(SIZE)
        for n in range(30):  # a quarter of the cap: one 250 KB photo a second
            client = device(site, f"cam-new-{n}")
            status, photo_id, _ = send(client, jpegs)
            client.close()
            if status == 201 and photo_id:
                new[photo_id] = time.monotonic()
            time.sleep(max(0.0, resumed + n + 1 - time.monotonic()))
        wait_until(lambda: set(new) <= set(notices.shipped), timeout=120, what="the new photos shipped")
        elapsed = time.monotonic() - resumed
        egress = (site.s3_link.total() - sent_before) / elapsed
        old_shipped = sum(1 for i in backlog if i in notices.shipped)
        lags = [notices.shipped[i][0] for i in new]
        classes = [notices.shipped[i][1] for i in new]
    return {"new_photos": len(new), "new_receipt_to_s3_p50_s": pct(lags, 0.5),
            "new_receipt_to_s3_p90_s": pct(lags, 0.9), "new_receipt_to_s3_max_s": pct(lags, 1.0),
            "new_shipped_as_fresh": classes.count("fresh"), "old_shipped_meanwhile": old_shipped,
            "egress_share_of_cap": round(egress / cap, 3)}


def scenario_lag(code: Path) -> dict[str, Any]:
    cap, rate, seconds = 5 * MB, 12, 60
    with private_site(code, cap) as site, Notices(site) as notices:
        jpegs = JpegMaker(SIZE)
        clients = [device(site, f"cam-lag-{n}") for n in range(48)]
        sent: list[str] = []
        started = time.monotonic()

        def one(n: int) -> None:
            status, photo_id, _ = send(clients[n % len(clients)], jpegs)
            if status == 201 and photo_id:
                sent.append(photo_id)

        with ThreadPoolExecutor(8) as pool:
            for n in range(rate * seconds):
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
                pool.submit(one, n)
        for client in clients:
            client.close()
        wait_until(lambda: set(sent) <= set(notices.shipped), timeout=120, what="every photo shipped")
        lags = [notices.shipped[i][0] for i in sent]
    return {"photos": len(sent), "receipt_to_s3_p50_s": pct(lags, 0.5), "receipt_to_s3_p90_s": pct(lags, 0.9),
            "receipt_to_s3_p99_s": pct(lags, 0.99), "receipt_to_s3_max_s": pct(lags, 1.0)}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "alarm": scenario_alarm, "after-pause": scenario_after_pause, "lag": scenario_lag,
}


# -- running and reporting --------------------------------------------------------------------


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A temporary worktree of ``ref`` (its services run with this checkout's virtualenv)."""
    with tempfile.TemporaryDirectory(prefix="photoferry-baseline-") as parent:
        path = Path(parent) / "code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False,
                           capture_output=True)


def render(results: dict[str, dict[str, Any]], baseline: str | None) -> str:
    lines = [f"`python -m bench.shipper_rules --baseline {baseline}`" if baseline else
             "`python -m bench.shipper_rules`", ""]
    for name, runs in results.items():
        lines += [f"**{name}**", "", "| figure | this version |" + (f" baseline ({baseline}) |" if baseline else ""),
                  "| --- | --- |" + (" --- |" if baseline else "")]
        for figure, value in runs["this"].items():
            row = f"| {figure.replace('_', ' ')} | {value} |"
            if baseline:
                row += f" {runs.get('baseline', {}).get(figure, '')} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--baseline", help="a git revision to run the same scenarios with, side by side")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-shipper-rules.json")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for name in args.scenarios.split(","):
        results[name] = {"this": SCENARIOS[name](REPO)}
        print(name, "this version:", json.dumps(results[name]["this"]), flush=True)
        if args.baseline:
            with checkout(args.baseline) as code:
                results[name]["baseline"] = SCENARIOS[name](code)
            print(name, f"baseline {args.baseline}:", json.dumps(results[name]["baseline"]), flush=True)
    args.out.write_text(json.dumps({"baseline": args.baseline, "results": results}, indent=1) + "\n")
    text = DOC.read_text()
    if DOC_START in text:
        start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
        DOC.write_text(text[:start] + "\n\n" + render(results, args.baseline) + "\n" + text[end:])
    print(render(results, args.baseline))


if __name__ == "__main__":
    main()
