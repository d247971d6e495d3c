"""The site's load, proved on one machine: photoferry as processes, simulated devices beside it.

Phases, each on a fresh private site (``devtools.site``), the simulator being
``photoferry fleet``'s (an open model: latency runs from when a photo was meant
to be sent):

- **load**: 1,000 devices x 2 photos a minute x 250 KB (mixed JSON and msgpack)
  against a 5 MB/s cap for ``--minutes``: accepted, failed, 5xx, upload latency,
  CPU and peak memory of each part, and the backlog's growth against the
  predicted 8.33 - 5 = 3.33 MB/s;
- **lag**: a load the cap carries (1,000 x 1/min, 4.2 MB/s): receipt to S3, p50/p99;
- **burst**: every device sends at the same instant, then retries as the contract
  says: all accepted, the gateway's peak memory, the time until all are in S3;
  with the site's mix of formats, all JSON (the most memory per photo), and 40
  maximum-size (16 MiB) photos; then a full store with the devices retrying
  every second for ``--minutes`` (at most 10): the gateway's memory over time;
- **headroom**: against the embedded store (the site-in-a-box's), shipping paused,
  rising rates until upload p99 passes 250 ms: the rate one gateway holds, as a
  multiple of the site's 33 photos/s, and each part's share of a core at every
  step (what saturates is what limits);
- **fresh**: the site's day compressed (8.33 MB/s in, a 5 MB/s cap, a 60 s fresh
  window) with the default fresh share and with none: the newest photos' lag and
  the backlog, over time.

Writes ``docs/benchmarks-site.json``, PNG plots beside it and the tables in
``docs/benchmarks.md`` (between its markers); phases not run keep their results.

    python -m bench.site [--minutes 10] [--phases load,lag,burst,headroom,fresh] [--headroom-step 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from devtools.servers import REPO
from devtools.site import ADMIN_TOKEN, DEVICE_SECRET, PREFIX, REMOTE_BUCKET, PrivateSite
from services.common.tokens import device_token
from services.devices.client import DeviceClient, Photo, result_of
from services.devices.fleet import Fleet, FleetPlan
from services.devices.jpegs import JpegMaker
from services.devices.verify import check_arrivals, expected_of

MB = 1_000_000
CAP = 5 * MB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
OUT = REPO / "docs"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def private_site(cap: str = "5MB", store: str = "s3", **settings: str) -> Iterator[PrivateSite]:
    with tempfile.TemporaryDirectory(prefix="photoferry-bench-site-") as workdir:
        # Sweeps as often as a site does (k3s base: 5m): each lists the whole store.
        site = PrivateSite(Path(workdir), cap=cap, store=store,
                           settings={"PHOTOFERRY_LOG_LEVEL": "info", "PHOTOFERRY_RECONCILE_EVERY": "5m", **settings})
        try:
            site.start()
            yield site
        finally:
            site.stop()


def status(site: PrivateSite) -> dict[str, Any]:
    return requests.get(f"{site.services['store'].url}/api/status", timeout=10,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()


def operator(site: PrivateSite, method: str, path: str, body: object = None) -> None:
    requests.request(method, f"{site.services['store'].url}{path}", json=body, timeout=10,
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).raise_for_status()


class Sampler:
    """Every few seconds: the keeper's figures, the uplink's bytes, each part's CPU."""

    def __init__(self, site: PrivateSite, every_s: float = 5.0) -> None:
        self.site = site
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()
        self.cpu_start = {name: cpu_seconds(pid) for name, pid in site.pids().items()}
        self.cpu_start["simulator (this process)"] = cpu_seconds(os.getpid())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_bytes, last_t = 0, time.monotonic()
        while not self._stop.wait(self.every_s):
            assert self.site.s3_link is not None
            now = time.monotonic()
            sent = self.site.s3_link.total()
            figures = status(self.site)
            self.samples.append({
                "t": round(now - self.started, 1), "egress_wire": (sent - last_bytes) / (now - last_t),
                "backlog_bytes": figures["backlog_bytes"], "cap": figures["cap_bytes_per_s"],
                "ingest": figures["ingest_bytes_per_s"], "fresh_lag_p99": figures["fresh"]["lag"]["p99_s"],
            })
            last_bytes, last_t = sent, now

    def resources(self) -> dict[str, dict[str, float]]:
        elapsed = time.monotonic() - self.started
        pids = {**self.site.pids(), "simulator (this process)": os.getpid()}
        return {name: {"cpu_s": round(cpu_seconds(pid) - self.cpu_start.get(name, 0.0), 1),
                       "cpu_share_of_a_core": round((cpu_seconds(pid) - self.cpu_start.get(name, 0.0)) / elapsed, 3),
                       "peak_rss_mb": round(memory_kib(pid, "VmHWM") / 1024, 1)}
                for name, pid in pids.items()}


def fleet(site: PrivateSite, **plan: Any) -> Fleet:
    return Fleet(FleetPlan(gateway=site.services["gateway"].url, **plan), secret=DEVICE_SECRET)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def lags_from_logs(site: PrivateSite, ids: set[str] | None = None) -> list[tuple[float, float, str]]:
    """(when shipped, seconds from receipt to S3, class) of every photo the shipper logged."""
    found = []
    for line in (site.workdir / "logs" / "shipper.log").read_text(errors="replace").splitlines():
        if '"photo shipped"' in line:
            entry = json.loads(line)
            if ids is None or entry["photo_id"] in ids:
                found.append((entry["time"], float(entry["lag_s"]), entry.get("class", "")))
    return found


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- phases ----------------------------------------------------------------------------------


def phase_load(minutes: float) -> dict[str, Any]:
    with private_site() as site:
        plan = dict(devices=1000, per_minute=2, duration_s=minutes * 60, size=250_000, fmt="mixed", workers=128,
                    seed=1, drain_s=120)
        with Sampler(site) as sampler:
            run = fleet(site, **plan)
            report = run.run()
        resources = sampler.resources()
    samples = sampler.samples
    steady = [(s["t"], s["backlog_bytes"]) for s in samples if s["t"] > 60 and s["t"] < minutes * 60]
    statuses = report["statuses"]
    return {
        "plan": plan, "report": {k: v for k, v in report.items() if k != "photos"},
        "server_errors": sum(n for code, n in statuses.items() if code.startswith("5") and code != "503"),
        "backlog_growth_bytes_per_s": round(slope(steady), 1) if len(steady) > 2 else None,
        "predicted_growth_bytes_per_s": round(1000 * 2 / 60 * 250_000 - CAP, 1),
        "resources": resources, "samples": samples,
        "latency_series": run.tally.latency_series[::10],
    }


def phase_lag(minutes: float) -> dict[str, Any]:
    with private_site() as site:
        report = fleet(site, devices=1000, per_minute=1, duration_s=minutes * 60, size=250_000, fmt="mixed",
                       workers=128, seed=2).run()
        ids = {p["id"] for p in report["photos"]}
        check_arrivals(site.remote_client(), REMOTE_BUCKET, PREFIX, expected_of(report["photos"]), timeout_s=300)
        lags = [lag for _, lag, _ in lags_from_logs(site, ids)]
    return {"accepted": report["accepted"], "failed": report["failed"], "shipped": len(lags),
            "receipt_to_s3_p50_s": pct(lags, 0.5), "receipt_to_s3_p99_s": pct(lags, 0.99),
            "upload_latency_ms": report["latency_ms"]}


MAX_IMAGE = 16 * 2**20
# The burst's variants: every device at the same instant, then retrying as the contract says.
BURSTS = {
    "mixed": dict(devices=1000, size=250_000, fmt="mixed"),
    "json": dict(devices=1000, size=250_000, fmt="json"),  # base64 text: the most memory per photo
    # As many maximum-size photos as keep the gateway's byte budget full several times over.
    "max": dict(devices=40, size=MAX_IMAGE, fmt="json", exact_size=True),
}
REFUSED_DEVICES = 1000


def phase_burst(minutes: float) -> dict[str, Any]:
    """Every burst variant, each on a fresh site, then devices retrying against a full store."""
    results: dict[str, Any] = {}
    for name, burst in BURSTS.items():
        print(f"  burst {name}: {burst}", flush=True)
        results[name] = burst_once(**burst)
        print(f"  burst {name}: {_burst_summary(results[name])}", flush=True)
    results["refused"] = refused_for(minutes)
    print(f"  refused: {_burst_summary(results['refused'])}", flush=True)
    return results


def burst_once(*, devices: int, size: int, fmt: str, exact_size: bool = False) -> dict[str, Any]:
    with private_site() as site:
        started = time.monotonic()
        report = fleet(site, devices=devices, per_minute=1, duration_s=0, size=size, fmt=fmt, burst=True,
                       workers=256, seed=3, max_backoff_s=10, exact_size=exact_size).run()
        accepted_s = time.monotonic() - started
        arrival = check_arrivals(site.remote_client(), REMOTE_BUCKET, PREFIX, expected_of(report["photos"]),
                                 timeout_s=600, poll_s=1)
        all_in_s = time.monotonic() - started
        gateway_peak = memory_kib(site.pids()["gateway"], "VmHWM") / 1024
    return {"devices": devices, "size": size, "format": fmt,
            "report": {k: v for k, v in report.items() if k != "photos"}, "accepted_after_s": round(accepted_s, 1),
            "all_in_s3_after_s": round(all_in_s, 1), "missing": len(arrival.missing),
            "gateway_peak_rss_mb": round(gateway_peak, 1)}


def refused_for(minutes: float) -> dict[str, Any]:
    """A full store (every upload answered 503) and the site's devices retrying every second."""
    # Room for a few photos: past the high watermark after them, the keeper closes admission; with
    # shipping paused, no shipped copy can be evicted to make room, so the store stays full.
    with private_site(PHOTOFERRY_STORE_CAPACITY="5MB") as site:
        operator(site, "POST", "/api/shipping/pause")
        filler = DeviceClient(site.services["gateway"].url, "filler", device_token(DEVICE_SECRET, "filler"))
        jpegs = JpegMaker(250_000)
        deadline = time.monotonic() + 120
        while "store is full" not in result_of(filler.send(filler.request(Photo(image=jpegs.make(),
                                                                                captured_at=_now()))), 1).detail:
            if time.monotonic() > deadline:
                raise RuntimeError("the store never refused uploads: admission did not close")
        filler.close()
        gateway = site.pids()["gateway"]
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while True:
                rss.append((round(time.monotonic() - started, 1), memory_kib(gateway, "VmRSS") / 1024))
                if stop.wait(5):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        report = fleet(site, devices=REFUSED_DEVICES, per_minute=1, duration_s=0, size=250_000, fmt="mixed",
                       burst=True, workers=256, seed=5, max_backoff_s=1, drain_s=minutes * 60).run()
        stop.set()
        sampler.join()
        gateway_peak = memory_kib(gateway, "VmHWM") / 1024
    second_half = [(t / 60, mb) for t, mb in rss if t >= rss[-1][0] / 2]
    return {"devices": REFUSED_DEVICES, "minutes": minutes,
            "report": {k: v for k, v in report.items() if k not in ("photos", "latency_ms")},
            "refused_per_s": round(report["statuses"].get("503", 0) / report["duration_s"], 1),
            "gateway_rss_mb": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                               "max": round(max(mb for _, mb in rss), 1)},
            "rss_slope_mb_per_min_second_half": round(slope(second_half), 2) if len(second_half) > 2 else None,
            "gateway_peak_rss_mb": round(gateway_peak, 1), "rss_samples": rss}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _burst_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("rss_samples",)}


HEADROOM_P99_MS = 250
HEADROOM_RATES = (33, 66, 100, 150, 200, 250, 333, 400, 500, 650)


def profile_gateway(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample the gateway's Python stacks with py-spy (out of process, not pausing it) for ``seconds``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "50", "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hottest(collapsed: Path, top: int = 12) -> list[dict[str, Any]]:
    """The functions the samples were in (self time), from py-spy's collapsed stacks."""
    counts: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines() if collapsed.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        counts[frame] = counts.get(frame, 0) + int(count)
        total += int(count)
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:top]
    return [{"function": frame, "share": round(n / total, 3)} for frame, n in ranked] if total else []


def phase_headroom(step_s: float, max_rate: int = HEADROOM_RATES[-1]) -> dict[str, Any]:
    steps = []
    profile: list[dict[str, Any]] = []
    with private_site(store="file") as site:
        operator(site, "POST", "/api/shipping/pause")  # the gateway alone: stored and queued, not shipped
        pids = site.pids()
        # Warm up (connections, first writes of each folder), so the first step measures the site, not its start.
        fleet(site, devices=100, per_minute=6, duration_s=5, size=250_000, fmt="mixed", workers=64, seed=0,
              drain_s=30, device_prefix="warm").run()
        for rate in (r for r in HEADROOM_RATES if r <= max_rate):
            cpu_before, started = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
            stacks = site.workdir / f"gateway-{rate}.collapsed"
            spy = profile_gateway(pids["gateway"], step_s, stacks)
            report = fleet(site, devices=rate * 10, per_minute=6, duration_s=step_s, size=250_000, fmt="mixed",
                           workers=256, seed=rate, drain_s=30, device_prefix=f"h{rate}").run()
            if spy is not None:
                spy.wait(timeout=60)
                profile = hottest(stacks)
            elapsed = time.monotonic() - started
            cores = {name: round((cpu_seconds(pid) - cpu_before[name]) / elapsed, 2) for name, pid in pids.items()}
            step = {"offered_per_s": rate, "accepted_per_s": round(report["accepted"] / report["duration_s"], 1),
                    "p99_ms": report["latency_ms"]["p99"], "p50_ms": report["latency_ms"]["p50"],
                    "failed": report["failed"], "deferred": report["statuses"].get("503", 0),
                    "gateway_cpu_share_of_a_core": cores["gateway"], "cores": cores}
            steps.append(step)
            print(f"  headroom {rate}/s: {step}", flush=True)
            if step["p99_ms"] >= HEADROOM_P99_MS or step["failed"]:
                break
    held = [s for s in steps if s["p99_ms"] < HEADROOM_P99_MS and not s["failed"]]
    best = max((s["offered_per_s"] for s in held), default=0)
    last = steps[-1]["cores"] if steps else {}
    return {"store": "embedded", "p99_limit_ms": HEADROOM_P99_MS, "steps": steps, "held_per_s": best,
            "multiple_of_site": round(best / (1000 * 2 / 60), 1),
            "busiest_at_the_last_step": max(last, key=last.get) if last else None,
            # Where the gateway spent its time at the last step (py-spy, self time): what limits it.
            "gateway_profile_at_the_last_step": profile}


def phase_fresh(minutes: float) -> dict[str, Any]:
    runs = {}
    for share in ("0.5", "0"):
        with private_site(PHOTOFERRY_SHIP_FRESH_WINDOW="60s", PHOTOFERRY_SHIP_FRESH_SHARE=share) as site:
            with Sampler(site) as sampler:
                report = fleet(site, devices=1000, per_minute=2, duration_s=minutes * 60, size=250_000,
                               fmt="mixed", workers=128, seed=4).run()
            lags = lags_from_logs(site)
        fresh = [lag for _, lag, kind in lags if kind == "fresh"]
        runs[share] = {
            "accepted": report["accepted"], "shipped": len(lags), "shipped_fresh": len(fresh),
            "fresh_lag_p50_s": pct(fresh, 0.5), "fresh_lag_p99_s": pct(fresh, 0.99),
            "all_lag_p50_s": pct([lag for _, lag, _ in lags], 0.5),
            "samples": sampler.samples, "lags": [(t, lag, kind) for t, lag, kind in lags][::5],
        }
    return runs


# -- plots -----------------------------------------------------------------------------------


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "load" in results:
        samples = results["load"]["samples"]
        t = [s["t"] / 60 for s in samples]
        fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
        top.plot(t, [s["egress_wire"] / MB for s in samples], label="egress on the wire")
        top.plot(t, [s["cap"] / MB for s in samples], label="cap", linestyle="--")
        top.plot(t, [s["ingest"] / MB for s in samples], label="ingest", alpha=0.7)
        top.set_ylabel("MB/s")
        top.legend(loc="lower right")
        top.set_title("The site's load: 1,000 devices x 2/min x 250 KB, 5 MB/s cap")
        middle.plot(t, [s["backlog_bytes"] / 1e9 for s in samples], label="backlog")
        middle.set_ylabel("backlog, GB")
        series = results["load"]["latency_series"]
        bottom.scatter([x / 60 for x, _ in series], [y for _, y in series], s=2)
        bottom.set_yscale("log")
        bottom.set_ylabel("upload latency, ms")
        bottom.set_xlabel("minutes")
        fig.tight_layout()
        fig.savefig(OUT / "bench-site-load.png", dpi=90)
        plt.close(fig)
    if "fresh" in results:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        for share, run in results["fresh"].items():
            shipped = [(datetime.fromisoformat(when.replace("Z", "+00:00")), lag, kind)
                       for when, lag, kind in run["lags"]]
            first = min(when for when, _, _ in shipped)
            for kind, marker in (("fresh", "o"), ("backlog", "x")):
                points = [((when - first).total_seconds() / 60, lag) for when, lag, k in shipped if k == kind]
                top.scatter([x for x, _ in points], [y for _, y in points], s=4, marker=marker,
                            label=f"share {share}: shipped as {kind}")
            bottom.plot([s["t"] / 60 for s in run["samples"]], [s["backlog_bytes"] / 1e9 for s in run["samples"]],
                        label=f"fresh share {share}")
        top.set_ylabel("receipt to S3, seconds")
        top.legend(fontsize="small")
        top.set_title("The site's day compressed: 8.33 MB/s in, 5 MB/s cap, 60 s fresh window")
        bottom.set_ylabel("backlog, GB")
        bottom.set_xlabel("minutes")
        bottom.legend()
        fig.tight_layout()
        fig.savefig(OUT / "bench-site-fresh.png", dpi=90)
        plt.close(fig)


# -- the tables in docs/benchmarks.md --------------------------------------------------------

DOC = OUT / "benchmarks.md"
DOC_START = "<!-- the tables below are written by make bench-site from benchmarks-site.json -->"
DOC_END = "<!-- end of the tables make bench-site writes -->"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _percentile_ms(series: list[list[float]], until_s: float, q: float) -> float | None:
    return pct([ms for t, ms in series if t < until_s], q)


def render_tables(results: dict[str, Any]) -> str:
    """Markdown tables of the results against the goals (the prose around them says why)."""
    rows = ["| phase | goal | measured |", "| --- | --- | --- |"]
    if "load" in results:
        load, report = results["load"], results["load"]["report"]
        minutes = load["plan"]["duration_s"] / 60
        rows.append(f"| site load, {minutes:g} min: 1,000 devices x 2/min x 250 KB, mixed, 5 MB/s cap "
                    f"| 0 failed, 0 `5xx` | {report['sent']:,} sent, {report['accepted']:,} accepted, "
                    f"{report['failed']:,} failed (never accepted by the end), {load['server_errors']} `5xx` "
                    f"other than `503`, {report['statuses'].get('503', 0):,} deferrals (`503`) |")
        growth = load["backlog_growth_bytes_per_s"]
        rows.append(f"| | backlog growth {load['predicted_growth_bytes_per_s'] / MB:.2f} MB/s | "
                    f"{growth / MB:.2f} MB/s |" if growth else "| | backlog growth | n/a |")
        series = load.get("latency_series", [])
        rows.append(f"| | upload p99 < 100 ms | first 5 min: p50 {_ms(_percentile_ms(series, 300, 0.5))}, "
                    f"p99 {_ms(_percentile_ms(series, 300, 0.99))}; whole run: p50 {_ms(report['latency_ms']['p50'])}, "
                    f"p99 {_ms(report['latency_ms']['p99'])} |")
    if "lag" in results:
        lag = results["lag"]
        rows.append(f"| lag under the cap: 1,000 x 1/min (4.2 MB/s) | `201` → S3 p99 < 2 s | "
                    f"p50 {lag['receipt_to_s3_p50_s']} s, p99 {lag['receipt_to_s3_p99_s']} s; {lag['shipped']:,} of "
                    f"{lag['accepted']:,} shipped; upload p50 {_ms(lag['upload_latency_ms']['p50'])}, "
                    f"p99 {_ms(lag['upload_latency_ms']['p99'])} |")
    if "burst" in results:
        bursts = results["burst"]
        if "report" in bursts:  # results written before the burst had variants
            bursts = {"mixed": bursts}
        goals = {"mixed": "all accepted, gateway RSS ≤ 300 MB", "json": "all accepted, gateway RSS ≤ 300 MB",
                 "max": "all accepted, gateway RSS inside its pod's 1 GiB"}
        for name, burst in bursts.items():
            if name == "refused":
                rss = burst["gateway_rss_mb"]
                rows.append(f"| full store: {burst['devices']:,} devices retrying every second for "
                            f"{burst['minutes']:g} min | gateway RSS flat | {burst['refused_per_s']:,} refusals a "
                            f"second; RSS {rss['start']:.0f} MB at the start, {rss['end']:.0f} MB at the end, "
                            f"{rss['max']:.0f} MB at most, second half's slope "
                            f"{burst['rss_slope_mb_per_min_second_half']} MB/min |")
                continue
            size = burst.get("size", 250_000)
            what = (f"{burst.get('devices', 1000):,} devices at the same instant, "
                    f"{'16 MiB (the largest)' if size == MAX_IMAGE else f'{size / 1000:g} KB'} photos, "
                    f"{burst.get('format', 'mixed')}")
            rows.append(f"| burst: {what} | {goals.get(name, '')} | "
                        f"{burst['report']['accepted']:,} accepted after {burst['report']['retries']:,} retries in "
                        f"{burst['accepted_after_s']} s, all in S3 after {burst['all_in_s3_after_s']} s, "
                        f"{burst['missing']} missing; gateway peak RSS {burst['gateway_peak_rss_mb']:.0f} MB |")
    if "headroom" in results:
        steps = "; ".join(f"{s['offered_per_s']}/s: p50 {_ms(s['p50_ms'])}, p99 {_ms(s['p99_ms'])}, "
                          f"{s['gateway_cpu_share_of_a_core']} core" for s in results["headroom"]["steps"])
        headroom = results["headroom"]
        limit = headroom.get("p99_limit_ms", 100)
        rows.append(f"| headroom: {headroom.get('store', 'moto')} store, shipping paused, rising rates | "
                    f"≥ 10x the site with p99 < {limit} ms | {steps}; held {headroom['multiple_of_site']}x"
                    + (f"; busiest part at the last step: {headroom['busiest_at_the_last_step']}"
                       if headroom.get("busiest_at_the_last_step") else "")
                    + ("; the gateway's time then: " + ", ".join(
                        f"{p['function'].split(' (')[0]} {p['share']:.0%}"
                        for p in headroom["gateway_profile_at_the_last_step"][:5])
                       if headroom.get("gateway_profile_at_the_last_step") else "") + " |")
    parts = ["\n".join(rows)]
    if "load" in results:
        resources = ["| part | CPU (share of a core) | peak RSS |", "| --- | --- | --- |"]
        resources += [f"| {name} | {r['cpu_share_of_a_core']:.2f} | {r['peak_rss_mb']:,.0f} MB |"
                      for name, r in results["load"]["resources"].items()]
        parts += ["Resources over the site load:", "\n".join(resources), "![the site's load](bench-site-load.png)"]
    if "fresh" in results:
        fresh = ["| fresh share | accepted | shipped | shipped as fresh | receipt → S3, fresh | receipt → S3, all "
                 "| backlog growth |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for share, run in results["fresh"].items():
            lags = [lag for _, lag, _ in run["lags"]]
            steady = [(x["t"], x["backlog_bytes"]) for x in run["samples"] if x["t"] > 30]
            growth = f"{slope(steady) / MB:.2f} MB/s" if len(steady) > 2 else "n/a"
            fresh_lag = (f"p50 {run['fresh_lag_p50_s']} s, p99 {run['fresh_lag_p99_s']} s"
                         if run["fresh_lag_p50_s"] is not None else "none")
            fresh.append(f"| {share} | {run['accepted']:,} | {run['shipped']:,} | {run['shipped_fresh']:,} | "
                         f"{fresh_lag} | p50 {pct(lags, 0.5)} s, max {max(lags, default=0)} s | {growth} |")
        parts += ["The site's day compressed (8.33 MB/s in, 5 MB/s cap, 60 s fresh window):", "\n".join(fresh),
                  "![fresh photos first](bench-site-fresh.png)"]
    return "\n\n".join(parts)


def update_doc(results: dict[str, Any]) -> None:
    text = DOC.read_text()
    start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
    DOC.write_text(text[:start] + "\n\n" + render_tables(results) + "\n\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the site-load phase")
    parser.add_argument("--phases", default="load,lag,burst,headroom,fresh")
    parser.add_argument("--out", type=Path, default=OUT / "benchmarks-site.json")
    parser.add_argument("--headroom-step", type=float, default=30.0, help="seconds at each rate of the headroom phase")
    parser.add_argument("--headroom-max-rate", type=int, default=HEADROOM_RATES[-1],
                        help="highest rate (photos/s) the headroom phase tries (a short smoke run: 66)")
    args = parser.parse_args()
    phases = args.phases.split(",")
    # Phases run now replace their earlier results; the others are kept.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}
    results.pop("command", None)
    results.setdefault("commands", {}).update(
        {phase: f"python -m bench.site --minutes {args.minutes:g} --phases {phase}" for phase in phases})
    runners = {
        "load": lambda: phase_load(args.minutes),
        "lag": lambda: phase_lag(min(3.0, args.minutes)),
        "burst": lambda: phase_burst(min(10.0, args.minutes)),
        "headroom": lambda: phase_headroom(args.headroom_step, args.headroom_max_rate),
        "fresh": lambda: phase_fresh(min(4.0, args.minutes)),
    }
    for phase in phases:
        print(f"{phase} ...", flush=True)
        started = time.monotonic()
        results[phase] = runners[phase]()
        print(f"{phase}: done in {time.monotonic() - started:.0f} s", flush=True)
        summary = {k: v for k, v in results[phase].items() if k not in ("samples", "latency_series", "lags")}
        print(json.dumps(summary, indent=1, default=str)[:3000], flush=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    plot(results)
    if args.out.parent == OUT:
        update_doc(results)
    print(f"wrote {args.out}, the plots beside it and the tables in {DOC}")


if __name__ == "__main__":
    main()
