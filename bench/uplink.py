"""The band above the cap on a real bottleneck, side by side with fixed caps: does it use the idle uplink
and yield the moment the farm needs it?

One site on the uplink bed (``devtools.uplink``: a 40 Mbit/s link, 5 MB/s, behind a router's
token-bucket queue), one backlog, and three shippers in turn, set at run time through the operator API:

- **fixed floor**: the cap at 20% of the link (1 MB/s), no band;
- **fixed ceiling**: the cap at 90% of the link (4.5 MB/s), rclone's way;
- **scavenger**: the cap at 20% and a band above it up to 90%.

Each runs through three phases of ``--phase`` seconds after settling: the link idle but for the
shipper; the farm's bulk upload (one TCP flow to a sink across the uplink) on; off again. Before them
all, the quiet link gives the probe's own round trip. Everything is measured on the far side of the
uplink: the shipper's bytes reaching S3 (a counting proxy before the remote), the farm's reaching its
sink, and the interactive probe's round trips (64 bytes every 50 ms).

The goals: idle, the shipper sends at least 85% of the ceiling; the farm's upload starts: within 2 s the
shipper is back at its floor (a 1 s window at most 15% above it), the farm gets at least what it gets
against the fixed floor and the probe's p95 is within 5 ms of the fixed floor's; it stops: the shipper is
back within 5 s (a 1 s window at 85% of its idle egress); scavenging on the idle link raises the probe's
p95 by at most 25 ms; nothing lost or shipped twice.

Writes ``docs/benchmarks-uplink.json``, ``docs/bench-uplink.png`` (rates and the probe's latency over
time) and the table in ``docs/benchmarks.md`` (between its markers). Needs root.

    python -m bench.uplink [--phase 30] [--variants floor,ceiling,scavenger] [--photo-size 250000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.site import pct
from devtools.servers import REPO, wait_until
from devtools.uplink import UplinkSite, site_on_uplink

MB = 1_000_000
OUT = REPO / "docs"
DOC = OUT / "benchmarks.md"
DOC_START = "<!-- the uplink's table below is written by make bench-uplink from benchmarks-uplink.json -->"
DOC_END = "<!-- end of the uplink's table -->"
PHASES = ("idle", "farm on", "farm off")
WINDOW_S = 1.0  # egress over a sliding window, for when the shipper is back at its floor or back up
SERIES_BIN_S = 0.25  # resolution of the saved series


def variants(link: float, floor: float, ceiling: float) -> dict[str, dict[str, Any]]:
    """Each shipper's settings, as the operator API takes them."""
    return {
        "fixed floor": {"rate": floor * link, "ceiling": "off", "floor": floor * link},
        "fixed ceiling": {"rate": ceiling * link, "ceiling": "off", "floor": ceiling * link},
        "scavenger": {"rate": floor * link, "ceiling": ceiling * link, "floor": floor * link},
    }


def egress(buckets: dict[float, int], start: float, end: float) -> float:
    return sum(n for at, n in buckets.items() if start <= at < end) / (end - start) if end > start else 0.0


def first_window(buckets: dict[float, int], start: float, end: float, *, at_most: float | None = None,
                 at_least: float | None = None) -> float | None:
    """Seconds from ``start`` to the middle of the first 1 s window (sliding by 100 ms) whose egress is at
    most ``at_most`` (or at least ``at_least``); None when none is before ``end``."""
    at = start
    while at + WINDOW_S <= end:
        rate = egress(buckets, at, at + WINDOW_S)
        if (at_most is not None and rate <= at_most) or (at_least is not None and rate >= at_least):
            return round(at + WINDOW_S / 2 - start, 2)
        at += 0.1
    return None


def binned(buckets: dict[float, int], start: float, end: float) -> list[float]:
    """Bytes per second in bins of SERIES_BIN_S from ``start``."""
    bins = [0.0] * int((end - start) / SERIES_BIN_S + 1)
    for at, n in buckets.items():
        if start <= at < end:
            bins[int((at - start) / SERIES_BIN_S)] += n / SERIES_BIN_S
    return [round(b) for b in bins]


def run_variant(rig: UplinkSite, name: str, settings: dict[str, Any], phase_s: float,
                settle_s: float) -> dict[str, Any]:
    """One shipper through the phases; its marks on the clock, and the shipper's own view meanwhile."""
    rig.operator("PUT", "/api/shipping/rate", {"rate": settings["rate"], "ceiling": settings["ceiling"]})
    rig.operator("POST", "/api/shipping/resume")
    started = time.monotonic()
    states: list[tuple[float, str, float, float | None]] = []
    marks = {"start": started}

    def watch(until: float) -> None:
        while time.monotonic() < until:
            status = rig.shipper_status()
            states.append((round(time.monotonic() - started, 2), status["scavenging"],
                           status["allowed_bytes_per_s"], status["queueing_delay_s"]))
            time.sleep(0.25)

    watch(started + settle_s)
    for phase in PHASES:
        marks[phase] = time.monotonic()
        if phase == "farm on":
            rig.farm.start()
        elif phase == "farm off":
            rig.farm.stop()
        watch(marks[phase] + phase_s)
    marks["end"] = time.monotonic()
    rig.operator("POST", "/api/shipping/pause")
    wait_until(lambda: rig.shipper_status()["in_flight"] == 0, timeout=60, what=f"{name}'s shipments to settle")
    print(f"{name}: done", flush=True)
    return {"settings": settings, "marks": marks, "shipper_view": states}


def figures(rig: UplinkSite, runs: dict[str, dict[str, Any]], quiet: tuple[float, float],
            ceiling: float) -> dict[str, Any]:
    """The goals' figures for each shipper, from what crossed the uplink."""
    shipped, farm = rig.shipper_buckets(), rig.sink.buckets()
    quiet_p95 = pct(rig.pinger.between(*quiet), 0.95)
    out: dict[str, Any] = {"quiet_probe_p95_ms": _ms(quiet_p95), "variants": {}}
    for name, run in runs.items():
        marks, floor = run["marks"], run["settings"]["floor"]
        band = run["settings"]["ceiling"] != "off"  # a fixed cap has nothing to yield or take back
        spans = {phase: (marks[phase], marks[nxt]) for phase, nxt in zip(PHASES, (*PHASES[1:], "end"), strict=True)}
        idle = egress(shipped, *spans["idle"])
        on_start, on_end = spans["farm on"]
        off_start, off_end = spans["farm off"]
        probe = {phase: pct(rig.pinger.between(*span), 0.95) for phase, span in spans.items()}
        out["variants"][name] = {
            "floor_bytes_per_s": floor,
            "band": band,
            "idle_shipper_bytes_per_s": round(idle),
            "idle_share_of_ceiling": round(idle / ceiling, 3),
            "farm_on_farm_bytes_per_s": round(egress(farm, on_start, on_end)),
            "farm_on_shipper_bytes_per_s": round(egress(shipped, on_start, on_end)),
            "farm_off_shipper_bytes_per_s": round(egress(shipped, off_start, off_end)),
            "probe_p95_ms": {phase: _ms(value) for phase, value in probe.items()},
            "idle_probe_p95_rise_ms": _ms(probe["idle"] - quiet_p95) if probe["idle"] and quiet_p95 else None,
            "back_at_floor_after_s": first_window(shipped, on_start, on_end, at_most=1.15 * floor) if band else None,
            "back_up_after_s": first_window(shipped, off_start, off_end, at_least=0.85 * idle) if band else None,
            "series": {"t0": marks["start"], "bin_s": SERIES_BIN_S,
                       "shipper": binned(shipped, marks["start"], marks["end"]),
                       "farm": binned(farm, marks["start"], marks["end"]),
                       "probe_ms": [(round(when - marks["start"], 3), round(rtt * 1000, 2))
                                    for when, rtt in rig.pinger.samples if marks["start"] <= when < marks["end"]],
                       "marks": {k: round(v - marks["start"], 2) for k, v in marks.items()}},
            "shipper_view": run["shipper_view"],
        }
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- the table and the plot --------------------------------------------------------------------------


def render_table(results: dict[str, Any]) -> str:
    link, ceiling = results["link_bytes_per_s"], results["ceiling_bytes_per_s"]
    rows = ["| shipper | idle: shipper egress | farm's upload on: farm / shipper | probe p95, farm on | "
            "at the floor after the farm starts | back up after it stops | probe p95 rise, idle |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in results["figures"]["variants"].items():
        band = f", band to {ceiling / MB:g} MB/s" if name == "scavenger" else ""
        rows.append(
            f"| {name} ({v['floor_bytes_per_s'] / MB:g} MB/s{band}) "
            f"| {v['idle_shipper_bytes_per_s'] / MB:.2f} MB/s ({v['idle_shipper_bytes_per_s'] / link:.0%} of the link, "
            f"{v['idle_share_of_ceiling']:.0%} of the ceiling) "
            f"| {v['farm_on_farm_bytes_per_s'] / MB:.2f} / {v['farm_on_shipper_bytes_per_s'] / MB:.2f} MB/s "
            f"| {_fmt_ms(v['probe_p95_ms']['farm on'])} "
            f"| {_fmt_s(v['back_at_floor_after_s'], v['band'])} | {_fmt_s(v['back_up_after_s'], v['band'])} "
            f"| {_fmt_ms(v['idle_probe_p95_rise_ms'])} |")
    ledger_ = results["ledger"]
    return "\n".join([
        f"Link {link / MB:g} MB/s, {results['phase_s']:g} s a phase, photos of {results['photo_size'] / 1000:g} KB; "
        f"the quiet link's probe p95: {_fmt_ms(results['figures']['quiet_probe_p95_ms'])}.", "",
        *rows, "",
        f"Ledger: {ledger_['photos']:,} photos, {ledger_['in_s3']:,} in S3, {ledger_['marked_but_not_in_s3']} marked "
        f"shipped but not in S3, {ledger_['in_s3_but_not_marked']} in S3 but not marked, "
        f"{ledger_['uploaded_twice']} uploaded twice.", "",
        "![rates and the probe's latency through the phases](bench-uplink.png)",
    ])


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _fmt_s(value: float | None, band: bool) -> str:
    if not band:
        return "(a fixed cap)"
    return "not within the phase" if value is None else f"{value:.1f} s"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = results["figures"]["variants"]
    fig, axes = plt.subplots(len(named), 1, figsize=(10, 3.2 * len(named)), sharex=True, squeeze=False)
    for ax, (name, v) in zip(axes[:, 0], named.items(), strict=True):
        series = v["series"]
        t = [i * series["bin_s"] for i in range(len(series["shipper"]))]
        ax.plot(t, [b / MB for b in series["shipper"]], label="shipper", color="#2f6fb3")
        ax.plot(t, [b / MB for b in series["farm"]], label="farm's upload", color="#7a9a84")
        ax.axhline(v["floor_bytes_per_s"] / MB, color="#c77700", linestyle="--", label="floor (the cap)")
        if name == "scavenger":
            ax.axhline(results["ceiling_bytes_per_s"] / MB, color="#7b4fb0", linestyle=":", label="ceiling")
        for phase in ("farm on", "farm off"):
            ax.axvline(series["marks"][phase], color="grey", linewidth=0.8)
        ax.axvspan(series["marks"]["farm on"], series["marks"]["farm off"], color="grey", alpha=0.08)
        ax.set_ylabel("MB/s")
        ax.set_ylim(0, results["link_bytes_per_s"] / MB * 1.15)
        ax.set_title(name)
        latency = ax.twinx()
        latency.scatter([x for x, _ in series["probe_ms"]], [y for _, y in series["probe_ms"]], s=2, color="#b3261e",
                        label="probe round trip")
        latency.set_yscale("log")
        latency.set_ylabel("probe, ms")
        lines, labels = ax.get_legend_handles_labels()
        more, more_labels = latency.get_legend_handles_labels()
        ax.legend(lines + more, labels + more_labels, loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("seconds (settling, idle, the farm's upload on, off)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_doc(table: str) -> None:
    text = DOC.read_text()
    if DOC_START not in text:
        heading = "## The uplink: the band above the cap against fixed caps (`make bench-uplink`)"
        text += f"\n{heading}\n\n{DOC_START}\n{DOC_END}\n"
    start, end = text.index(DOC_START) + len(DOC_START), text.index(DOC_END)
    DOC.write_text(text[:start] + "\n\n" + table + "\n\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=float, default=30.0, help="seconds of each phase (a smoke run: 5)")
    parser.add_argument("--variants", default="fixed floor,fixed ceiling,scavenger")
    parser.add_argument("--link", default="40mbit", help="the uplink's rate, as tc takes it")
    parser.add_argument("--floor", type=float, default=0.2, help="the cap, as a share of the link")
    parser.add_argument("--ceiling", type=float, default=0.9, help="the band's ceiling, as a share of the link")
    parser.add_argument("--photo-size", type=int, default=250_000)
    parser.add_argument("--out", type=Path, default=OUT / "benchmarks-uplink.json")
    args = parser.parse_args()
    settle_s = max(5.0, args.phase / 6)
    with site_on_uplink(cap="1MB", rate=args.link) as rig:
        link = rig.link_bytes_per_s
        chosen = {name: v for name, v in variants(link, args.floor, args.ceiling).items()
                  if name in args.variants.split(",")}
        # Enough for every shipper at the ceiling through every phase, and a margin.
        need = 1.25 * sum((settle_s + 3 * args.phase) * (v["ceiling"] if v["ceiling"] != "off" else v["rate"])
                          for v in chosen.values())
        rig.operator("POST", "/api/shipping/pause")
        started = time.monotonic()
        ids = rig.fill_backlog(int(need), photo_bytes=args.photo_size)
        print(f"backlog: {len(ids):,} photos in {time.monotonic() - started:.0f} s", flush=True)
        rig.pinger.start()
        quiet_start = time.monotonic()
        time.sleep(min(10.0, args.phase))
        quiet = (quiet_start, time.monotonic())
        runs = {name: run_variant(rig, name, settings, args.phase, settle_s) for name, settings in chosen.items()}
        rig.pinger.stop()
        results = {
            "command": f"python -m bench.uplink --phase {args.phase:g}",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "link_bytes_per_s": link, "ceiling_bytes_per_s": args.ceiling * link, "phase_s": args.phase,
            "photo_size": args.photo_size, "uplink_queue": rig.bed.queue_stats(),
            "figures": figures(rig, runs, quiet, args.ceiling * link), "ledger": rig.ledger(ids),
        }
    args.out.write_text(json.dumps(results, indent=1))
    summary = {name: {k: v for k, v in f.items() if k not in ("series", "shipper_view")}
               for name, f in results["figures"]["variants"].items()}
    print(json.dumps({"quiet_probe_p95_ms": results["figures"]["quiet_probe_p95_ms"], **summary,
                      "ledger": results["ledger"]}, indent=1))
    plot(results, args.out.with_name("bench-uplink.png"))
    print(f"wrote {args.out} and bench-uplink.png beside it")
    if args.out.parent == OUT:
        update_doc(render_table(results))
        print(f"wrote the table in {DOC}")


if __name__ == "__main__":
    main()
