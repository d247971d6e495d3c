"""An hour's soak: the site's load on a site in a box whose store fills and empties many times.

A private site (``devtools.site``) with the embedded store, a store small enough
(``--capacity``, 1500 MB) that the watermarks and early eviction cycle again and
again, and a cap below ingest (``--cap``, 2 MB/s, against the site's 8.33 MB/s), so
the backlog grows, admission closes and opens, and shipped copies are evicted
early. ``photoferry fleet``'s devices (1,000 x 2/min x 250 KB) retry as the
contract says. Every minute each part's RSS, open files, threads and TCP
connections, and the queues' depths, are sampled; every 5 s the keeper's usage
and the photo bytes really in the store.

It reports each figure's slope (per hour: a leak shows as growth), photos lost
(answered ``2xx`` and neither in the remote bucket nor the local store) and
duplicated (uploaded to the remote more than once), answers ``5xx`` other than
``503``, and the highest usage against the high watermark. Writes
``docs/benchmarks-soak.json``, ``docs/bench-soak.png`` and its table in
``docs/benchmarks.md`` (between its markers).

    python -m bench.soak [--minutes 60] [--capacity 1500MB] [--cap 2MB]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench.site import OUT, memory_kib, private_site, slope, status
from devtools.site import DEVICE_SECRET, PREFIX, REMOTE_BUCKET, PrivateSite
from services.common import photos, topology
from services.common.units import parse_size
from services.devices.fleet import Fleet, FleetPlan
from services.devices.verify import listed_keys

DOC = OUT / "benchmarks.md"
DOC_START = "<!-- the soak's table below is written by make soak from benchmarks-soak.json -->"
DOC_END = "<!-- end of the soak's table -->"
SAMPLE_EVERY_S = 60.0
USAGE_EVERY_S = 5.0
HIGH_WATERMARK, LOW_WATERMARK = 0.9, 0.8


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MB), open files, threads and TCP connections of one process."""
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return {"rss_mb": round(memory_kib(pid, "VmRSS") / 1024, 1), "open_files": len(fds),
            "threads": memory_kib(pid, "Threads"), "sockets": sockets}


class SoakSampler:
    def __init__(self, site: PrivateSite) -> None:
        self.site = site
        self.started = time.monotonic()
        self.minutes: list[dict[str, Any]] = []
        self.usage: list[tuple[float, float, bool]] = []  # (s, fill, admission open)
        self.on_disk: list[tuple[float, int]] = []  # (s, photo bytes really in the store)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._every_minute, daemon=True),
                         threading.Thread(target=self._usage, daemon=True)]

    def __enter__(self) -> SoakSampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _every_minute(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                queues = {name: int(self.site.rabbit.management("GET", f"queues/%2F/{name}").get("messages", 0))  # type: ignore[union-attr]
                          for name in (topology.FRESH_QUEUE, topology.SHIP_QUEUE, topology.PARKED_QUEUE)}
                parts = {name: process_figures(pid) for name, pid in self.site.pids().items()}
            except (OSError, requests.RequestException) as exc:
                print(f"  a sample failed: {exc}", flush=True)
                continue
            sample = {"t_min": round((time.monotonic() - self.started) / 60, 2), "parts": parts, "queues": queues,
                      "store_bytes_on_disk": _bytes_under(self.site.store_root)}
            self.minutes.append(sample)
            print(f"  minute {sample['t_min']}: {json.dumps(sample)[:400]}", flush=True)

    def _usage(self) -> None:
        while not self._stop.wait(USAGE_EVERY_S):
            try:
                figures = status(self.site)
            except (requests.RequestException, ValueError):
                continue
            self.usage.append((round(time.monotonic() - self.started, 1), figures["store_fill"],
                               figures["admission"]["open"]))
            self.on_disk.append((self.usage[-1][0], _bytes_under(self.site.store_root)))


def _bytes_under(root: Path | None) -> int:
    """Bytes of the photos the embedded store holds (what the disk really carries)."""
    if root is None:
        return 0
    total = 0
    for directory, _, files in os.walk(root / "site-store" / photos.PHOTOS_PREFIX):
        for name in files:
            if not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # evicted while counted
                    total += os.stat(os.path.join(directory, name)).st_size
    return total


def slopes_per_hour(minutes: list[dict[str, Any]]) -> dict[str, float]:
    """Least-squares slope of every sampled figure, per hour (the first two minutes are the warm-up)."""
    steady = [m for m in minutes if m["t_min"] >= 2] or minutes
    if len(steady) < 2:
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in steady:
        for part, figures in sample["parts"].items():
            for name, value in figures.items():
                series.setdefault(f"{part} {name}", []).append((sample["t_min"] / 60, value))
        for queue, depth in sample["queues"].items():
            series.setdefault(f"queue {queue}", []).append((sample["t_min"] / 60, depth))
    return {name: round(slope(points), 2) for name, points in series.items()}


def ledger(site: PrivateSite, accepted: dict[str, str]) -> dict[str, Any]:
    """Photos answered 2xx that are nowhere (lost), and photos uploaded to the remote twice (duplicated)."""

    async def local_keys() -> set[str]:
        return {item["path"] async for page in site.local_store().list(photos.PHOTOS_PREFIX) for item in page}

    # The store first: a photo leaves it only once it is in the remote, so it cannot slip between the two.
    local = asyncio.run(local_keys())
    remote = listed_keys(site.remote_client(), REMOTE_BUCKET, PREFIX + photos.PHOTOS_PREFIX)
    lost = [i for i in accepted if PREFIX + photos.object_key(i) not in remote and photos.object_key(i) not in local]
    uploads = site.uploads_per_photo()

    async def shipped_marker(photo_id: str) -> bool:
        return await site.local_store().exists(photos.shipped_marker_key(photo_id))

    return {"accepted": len(accepted), "in_remote": sum(PREFIX + photos.object_key(i) in remote for i in accepted),
            "lost": len(lost), "duplicated": sum(1 for n in uploads.values() if n > 1),
            "lost_photos": [{"id": i, "shipped_marker": asyncio.run(shipped_marker(i)), "uploads_logged": uploads[i]}
                            for i in lost[:20]]}


def run(minutes: float, capacity: str, cap: str) -> dict[str, Any]:
    settings = {"PHOTOFERRY_STORE_CAPACITY": capacity, "PHOTOFERRY_STORE_HIGH_WATERMARK": str(HIGH_WATERMARK),
                "PHOTOFERRY_STORE_LOW_WATERMARK": str(LOW_WATERMARK), "PHOTOFERRY_RETAIN": "7d",
                "PHOTOFERRY_RECONCILE_EVERY": "1m"}
    with private_site(cap=cap, store="file", **settings) as site:
        plan = FleetPlan(gateway=site.services["gateway"].url, devices=1000, per_minute=2, duration_s=minutes * 60,
                         size=250_000, fmt="mixed", workers=128, seed=7, drain_s=120, device_prefix="soak")
        with SoakSampler(site) as sampler:
            report = Fleet(plan, secret=DEVICE_SECRET).run()
        accepted = {p["id"]: p["sha256"] for p in report["photos"]}
        high_bytes = HIGH_WATERMARK * parse_size(capacity)
        on_disk = [b for _, b in sampler.on_disk] + [m["store_bytes_on_disk"] for m in sampler.minutes]
        closings = sum(1 for a, b in zip(sampler.usage, sampler.usage[1:], strict=False) if a[2] and not b[2])
        statuses = report["statuses"]
        return {
            "minutes": minutes, "capacity": capacity, "cap": cap,
            "fleet": {k: v for k, v in report.items() if k != "photos"},
            "server_errors_other_than_503": sum(n for s, n in statuses.items() if s.startswith("5") and s != "503"),
            "refused_503": statuses.get("503", 0),
            "admission_closed_times": closings,
            "max_fill": max((u[1] for u in sampler.usage), default=None),
            "high_watermark": HIGH_WATERMARK,
            "max_bytes_on_disk": max(on_disk, default=None),
            "max_bytes_on_disk_vs_high_watermark": round(max(on_disk, default=0) / high_bytes, 3),
            "max_bytes_past_high_watermark": max(0, int(max(on_disk, default=0) - high_bytes)),
            "ledger": ledger(site, accepted),
            "slopes_per_hour": slopes_per_hour(sampler.minutes),
            "minutes_sampled": sampler.minutes,
            "usage": sampler.usage,
            "on_disk": sampler.on_disk,
        }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (usage_axis, memory_axis) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    usage = results["usage"]
    usage_axis.plot([u[0] / 60 for u in usage], [u[1] for u in usage],
                    label="fill, the keeper's (budget or file system, the fuller)")
    capacity = parse_size(results["capacity"])
    usage_axis.plot([t / 60 for t, _ in results["on_disk"]], [b / capacity for _, b in results["on_disk"]],
                    label="photo bytes on disk / capacity", linewidth=0.8)
    usage_axis.axhline(results["high_watermark"], color="#b3261e", linestyle="--", label="high watermark")
    usage_axis.set_ylabel("fill")
    usage_axis.legend(loc="lower right")
    usage_axis.set_title(f"Soak: the site's load, a {results['capacity']} store, a {results['cap']}/s cap")
    for part in results["minutes_sampled"][0]["parts"] if results["minutes_sampled"] else []:
        memory_axis.plot([m["t_min"] for m in results["minutes_sampled"]],
                         [m["parts"][part]["rss_mb"] for m in results["minutes_sampled"]], label=part)
    memory_axis.set_ylabel("RSS (MB)")
    memory_axis.set_xlabel("minutes")
    memory_axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def render_table(results: dict[str, Any], command: str) -> str:
    ledger_ = results["ledger"]
    growing = {k: v for k, v in results["slopes_per_hour"].items() if "rss" in k or "open_files" in k}
    rows = [
        f"`{command}` ({results['minutes']:g} min; plot: [bench-soak.png](bench-soak.png)):",
        "",
        "| goal | measured |",
        "| --- | --- |",
        f"| 0 lost, 0 duplicated | {ledger_['lost']} lost, {ledger_['duplicated']} duplicated, of "
        f"{ledger_['accepted']:,} accepted ({ledger_['in_remote']:,} in S3, the rest waiting in the store) |",
        f"| 0 `5xx` other than the watermark's `503` | {results['server_errors_other_than_503']} "
        f"(`503`: {results['refused_503']:,}; admission closed {results['admission_closed_times']} times) |",
        f"| usage never above the high watermark ({results['high_watermark']:.0%}) | highest fill "
        f"{results['max_fill']}; photo bytes on disk at most {results['max_bytes_on_disk_vs_high_watermark']:.1%} "
        f"of the high watermark ({results['max_bytes_past_high_watermark']:,} bytes past it; one photo is "
        "250,000) |",
        "| no growth (slope per hour, after the first 2 min; the remote stand-in keeps every photo in memory) | "
        + ", ".join(f"{k} {v:+g}" for k, v in sorted(growing.items())) + " |",
    ]
    return "\n".join(rows)


def update_doc(table: str) -> None:
    text = DOC.read_text()
    if DOC_START not in text:
        text += f"\n## An hour's soak\n\n{DOC_START}\n{DOC_END}\n"
    start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
    DOC.write_text(text[:start] + "\n\n" + table + "\n\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--capacity", default="1500MB", help="the store's size: small, so watermarks cycle")
    parser.add_argument("--cap", default="2MB", help="the egress cap, below the site's 8.33 MB/s of ingest")
    parser.add_argument("--out", type=Path, default=OUT / "benchmarks-soak.json")
    args = parser.parse_args()
    command = f"python -m bench.soak --minutes {args.minutes:g} --capacity {args.capacity} --cap {args.cap}"
    results = run(args.minutes, args.capacity, args.cap)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}
    results["command"] = command
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k not in ("minutes_sampled", "usage", "on_disk")},
                     indent=1))
    plot(results, args.out.with_name("bench-soak.png"))
    if args.out.parent == OUT:
        update_doc(render_table(results, command))
    print(f"wrote {args.out} and its plot")


if __name__ == "__main__":
    main()
