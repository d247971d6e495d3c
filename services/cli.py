"""``photoferry``: the command line for a site's operators, a client of the store keeper's API.

    photoferry status [--json]          backlog, rates, ETA, store, shipping, devices
    photoferry pause [--until TIME]     stop shipping (until an RFC 3339 time)
    photoferry resume                   ship again
    photoferry rate 40Mbit              override the cap;  photoferry rate --schedule: back to the schedule
    photoferry rate --fresh-share 0.3   fresh photos' share of the cap (--fresh-share schedule: the schedule's)
    photoferry rate --ceiling 160Mbit   above the cap, ship on idle uplink up to this (off: never; schedule)
    photoferry parked                   parked photos and why
    photoferry replay                   send parked photos back to shipping
    photoferry token DEVICE_ID          print a device's token (needs PHOTOFERRY_DEVICE_SECRET)
    photoferry deny DEVICE_ID --reason TEXT   every gateway refuses the device (403) within seconds
    photoferry allow DEVICE_ID          take it off the deny list
    photoferry denied                   the deny list, with the reasons
    photoferry fleet --devices N ...    simulate a site's devices (needs PHOTOFERRY_DEVICE_SECRET)
    photoferry remote [--last N]        the newest photos in the remote bucket (PHOTOFERRY_S3_*, AWS_*)

The operator commands talk to PHOTOFERRY_STORE_URL (default http://127.0.0.1:8081)
with PHOTOFERRY_ADMIN_TOKEN. ``fleet`` posts to PHOTOFERRY_GATEWAY_URL (or
--gateway; an https:// gateway is verified against PHOTOFERRY_GATEWAY_CA_FILE or
--ca-file) and, with --verify, checks the remote bucket the shipper uses
(PHOTOFERRY_S3_ENDPOINT, PHOTOFERRY_S3_BUCKET, PHOTOFERRY_S3_PREFIX, AWS_*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from services.common.config import CliConfig, ConfigError
from services.common.photos import DEVICE_ID_PATTERN
from services.common.tokens import device_token
from services.common.units import format_bytes, format_duration, parse_duration, parse_size


class CliError(Exception):
    """Something the operator should read: what went wrong, and what to do."""


def _call(config: CliConfig, method: str, path: str, body: object = None) -> Any:
    if not config.admin_token:
        raise CliError("set PHOTOFERRY_ADMIN_TOKEN to the site's operator token")
    request = urllib.request.Request(
        f"{config.store_url}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {config.admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise CliError(f"{method} {path}: {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"the store keeper at {config.store_url} does not answer ({exc.reason}); "
                       "set PHOTOFERRY_STORE_URL") from None


def _status(config: CliConfig, args: argparse.Namespace) -> int:
    s = _call(config, "GET", "/api/status")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    rate = lambda n: f"{format_bytes(n)}/s"  # noqa: E731 (a local shorthand)
    text = s["text"]
    lines = [
        f"backlog      {text['backlog']}; " + (text["oldest_unshipped_age"] if s["oldest_unshipped_age_s"] is None
                                                else f"oldest waiting {text['oldest_unshipped_age']}"),
        f"rates        in {rate(s['ingest_bytes_per_s'])}, out {rate(s['egress_bytes_per_s'])}, "
        f"cap {rate(s['cap_bytes_per_s'])}",
        f"drains       {text['eta_drain']}",
        f"fresh        {_fresh(s)}",
        f"idle uplink  {text['scavenging']}",
        f"store        {s['store_fill']:.0%} full: {format_bytes(s['store_used_bytes'])} of "
        f"{format_bytes(s['store_capacity_bytes'])}"
        + ("" if s["store_disk_total_bytes"] is None else
           f", disk {format_bytes(s['store_disk_free_bytes'])} free of {format_bytes(s['store_disk_total_bytes'])}")
        + f", full {text['store_full']}; "
        + ("taking uploads" if s["admission"]["open"] else f"REFUSING uploads: {s['admission']['reason']}"),
        f"shipping     {s['shipping']}, {len(s['shippers'])} shipper(s)"
        + ("; the link is slower than the cap" if s["link_limited"] else ""),
        f"parked       {s['parked']}",
        f"devices      {s['devices']}, silent: {', '.join(s['silent_devices']) or 'none'}",
    ]
    print("\n".join(lines))
    return 0


def _fresh(s: dict[str, Any]) -> str:
    fresh, lag = s["fresh"], s["fresh"]["lag"]
    window = format_duration(fresh["window_s"])
    if fresh["share"] <= 0:
        return f"no share of the cap: strictly oldest first (window {window})"
    shipped = ("none shipped lately" if not lag["photos"] else
               f"{lag['photos']} shipped lately, receipt to S3 p50 {format_duration(lag['p50_s'])}, "
               f"p99 {format_duration(lag['p99_s'])}")
    return (f"up to {fresh['share']:.0%} of the cap for photos younger than {window}; "
            f"out {format_bytes(fresh['egress_bytes_per_s'])}/s; {shipped}")


def _pause(config: CliConfig, args: argparse.Namespace) -> int:
    control = _call(config, "POST", "/api/shipping/pause", {"until": args.until} if args.until else {})
    print("shipping paused" + (f" until {control['paused_until']}" if control.get("paused_until") else ""))
    return 0


def _resume(config: CliConfig, args: argparse.Namespace) -> int:
    _call(config, "POST", "/api/shipping/resume")
    print("shipping resumed")
    return 0


def _rate(config: CliConfig, args: argparse.Namespace) -> int:
    if args.schedule and args.rate is not None:
        raise CliError("give a rate (photoferry rate 40Mbit) or --schedule, not both")
    body: dict[str, Any] = {}
    if args.schedule or args.rate is not None:
        body["rate"] = None if args.schedule else args.rate
    if args.fresh_share is not None:
        body["fresh_share"] = None if args.fresh_share == "schedule" else args.fresh_share
    if args.ceiling is not None:
        body["ceiling"] = None if args.ceiling == "schedule" else args.ceiling
    if not body:
        raise CliError("give a rate (photoferry rate 40Mbit), --schedule, --fresh-share or --ceiling")
    control = _call(config, "PUT", "/api/shipping/rate", body)
    ceiling = control["ceiling_bytes_per_s"]
    print(f"cap now {format_bytes(control['cap_bytes_per_s'])}/s"
          + (" (override)" if control["rate_override"] is not None else " (the schedule)")
          + f"; fresh photos' share {control['fresh_share']:.0%}"
          + (" (override)" if control["fresh_share_override"] is not None else " (the schedule)")
          + ("; no shipping on idle uplink above it" if ceiling is None else
             f"; on idle uplink up to {format_bytes(ceiling)}/s")
          + (" (override)" if control["ceiling_override"] is not None else " (the schedule)"))
    return 0


def _parked(config: CliConfig, args: argparse.Namespace) -> int:
    answer = _call(config, "GET", "/api/parked")
    for photo in answer["parked"]:
        print(f"{photo['id']}  {photo['parked_at']}  {photo['reason']}")
    print(f"{len(answer['parked'])} parked with a reason; {answer['messages_on_parking_queue']} on the parking queue")
    return 0


def _replay(config: CliConfig, args: argparse.Namespace) -> int:
    print(f"{_call(config, 'POST', '/api/parked/replay')['replayed']} parked photos sent back to shipping")
    return 0


def _token(config: CliConfig, args: argparse.Namespace) -> int:
    if not config.device_secret:
        raise CliError("set PHOTOFERRY_DEVICE_SECRET to the site's device secret")
    print(device_token(config.device_secret, _device_id(args.device_id)))
    return 0


def _device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise CliError("a device_id is 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return device_id


def _deny(config: CliConfig, args: argparse.Namespace) -> int:
    answer = _call(config, "PUT", f"/api/devices/denied/{_device_id(args.device_id)}", {"reason": args.reason})
    print(f"{answer['device_id']} denied ({answer['reason']}): every gateway refuses it within seconds")
    return 0


def _allow(config: CliConfig, args: argparse.Namespace) -> int:
    answer = _call(config, "DELETE", f"/api/devices/denied/{_device_id(args.device_id)}")
    print(f"{answer['device_id']} allowed again")
    return 0


def _denied(config: CliConfig, args: argparse.Namespace) -> int:
    answer = _call(config, "GET", "/api/devices/denied")
    for device in answer["denied"]:
        print(f"{device['device_id']}  {device['denied_at']}  {device['reason']}")
    print(f"{len(answer['denied'])} device(s) denied")
    return 0


def _fleet(config: CliConfig, args: argparse.Namespace) -> int:
    from services.devices.fleet import Fleet, FleetPlan, terminal_progress

    if not config.device_secret:
        raise CliError("set PHOTOFERRY_DEVICE_SECRET to the site's device secret")
    try:
        plan = FleetPlan(gateway=(args.gateway or config.gateway_url).rstrip("/"), devices=args.devices,
                         per_minute=args.per_minute, duration_s=parse_duration(args.duration),
                         size=parse_size(args.size), fmt=args.format, burst=args.burst,
                         drain_s=parse_duration(args.drain), workers=args.workers, seed=args.seed,
                         ca_file=args.ca_file or config.gateway_ca_file)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if plan.devices < 1 or plan.per_minute <= 0 or plan.workers < 1:
        raise CliError("--devices, --per-minute and --workers must be above zero")
    fleet = Fleet(plan, secret=config.device_secret, progress=terminal_progress)
    report = fleet.run()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    summary = {k: v for k, v in report.items() if k != "photos"}
    print(json.dumps(summary, indent=2))
    failed = report["failed"] > 0
    if args.verify:
        failed = not _verify(config, args, report) or failed
    if args.report:
        with open(args.report, "w") as out:
            json.dump(report, out, indent=1)
    return 1 if failed else 0


def _verify(config: CliConfig, args: argparse.Namespace, report: dict[str, Any]) -> bool:
    from services.common.s3 import s3_client
    from services.devices.verify import check_arrivals, expected_of

    bucket = args.s3_bucket or config.remote_bucket
    if not bucket:
        raise CliError("--verify needs the remote bucket: --s3-bucket or PHOTOFERRY_S3_BUCKET")
    endpoint = args.s3_endpoint or config.remote_endpoint
    prefix = config.remote_prefix if args.s3_prefix is None else args.s3_prefix
    client = s3_client(endpoint)

    def progress(arrived: int, expected: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rin the remote bucket: {arrived} of {expected}\x1b[K")

    arrival = check_arrivals(client, bucket, prefix, expected_of(report["photos"]),
                             timeout_s=parse_duration(args.verify_timeout), progress=progress)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"verified: {len(arrival.arrived) - len(arrival.different)} of {len(report['photos'])} accepted photos "
          f"in s3://{bucket}/{prefix} with the SHA-256 the devices sent")
    for photo_id in arrival.missing:
        print(f"missing    {photo_id}")
    for photo_id in arrival.different:
        print(f"different  {photo_id}")
    return not arrival.missing and not arrival.different


def _remote(config: CliConfig, args: argparse.Namespace) -> int:
    # boto3 takes a while to import: only the commands that need it do.
    from botocore.exceptions import BotoCoreError, ClientError

    from services.common.s3 import s3_client

    if not config.remote_bucket:
        raise CliError("set PHOTOFERRY_S3_BUCKET (and PHOTOFERRY_S3_ENDPOINT, PHOTOFERRY_S3_PREFIX, AWS_*)")

    client = s3_client(config.remote_endpoint)
    found: list[dict[str, Any]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=config.remote_bucket,
                                                                      Prefix=config.remote_prefix):
            found.extend(page.get("Contents", []))
    except (ClientError, BotoCoreError) as exc:
        raise CliError(f"could not list s3://{config.remote_bucket}/{config.remote_prefix}: {exc}") from None
    found.sort(key=lambda item: item["LastModified"])
    for item in found[-args.last:]:
        print(f"{item['LastModified']:%Y-%m-%d %H:%M:%S}  {format_bytes(item['Size']):>9}  {item['Key']}")
    print(f"{len(found)} objects in s3://{config.remote_bucket}/{config.remote_prefix}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoferry", description="Operate a photoferry site.")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="backlog, rates, ETA, store, shipping, devices")
    status.add_argument("--json", action="store_true", help="the figures as JSON")
    status.set_defaults(run=_status)
    pause = commands.add_parser("pause", help="stop shipping")
    pause.add_argument("--until", help="resume by itself at this RFC 3339 time")
    pause.set_defaults(run=_pause)
    commands.add_parser("resume", help="ship again").set_defaults(run=_resume)
    rate = commands.add_parser("rate", help="override the egress cap, or return to the schedule")
    rate.add_argument("rate", nargs="?", help="e.g. 40Mbit, 5MB, 5MiB")
    rate.add_argument("--schedule", action="store_true", help="drop the override: the schedule decides")
    rate.add_argument("--fresh-share", help="fresh photos' share of the cap, e.g. 0.3 or 30%%; 'schedule' drops it")
    rate.add_argument("--ceiling", help="above the cap, ship on idle uplink up to this, e.g. 160Mbit; 'off' never; "
                                        "'schedule' drops it")
    rate.set_defaults(run=_rate)
    commands.add_parser("parked", help="list parked photos and why").set_defaults(run=_parked)
    commands.add_parser("replay", help="send parked photos back to shipping").set_defaults(run=_replay)
    token = commands.add_parser("token", help="print the bearer token of a device")
    token.add_argument("device_id")
    token.set_defaults(run=_token)
    deny = commands.add_parser("deny", help="refuse a device at every gateway (a stolen camera), without a restart")
    deny.add_argument("device_id")
    deny.add_argument("--reason", required=True, help="why, as the device reads it in its 403 answers")
    deny.set_defaults(run=_deny)
    allow = commands.add_parser("allow", help="take a device off the deny list")
    allow.add_argument("device_id")
    allow.set_defaults(run=_allow)
    commands.add_parser("denied", help="the devices every gateway refuses, and why").set_defaults(run=_denied)
    fleet = commands.add_parser("fleet", help="simulate a site's devices sending photos to a gateway")
    fleet.add_argument("--gateway", help="the gateway's URL (default PHOTOFERRY_GATEWAY_URL)")
    fleet.add_argument("--ca-file",
                       help="the site's CA, to verify an https:// gateway (default PHOTOFERRY_GATEWAY_CA_FILE)")
    fleet.add_argument("--devices", type=int, default=1000)
    fleet.add_argument("--per-minute", type=float, default=2.0, help="photos per device per minute")
    fleet.add_argument("--duration", default="10m", help="how long devices send, e.g. 10m")
    fleet.add_argument("--size", default="250KB", help="mean photo size")
    fleet.add_argument("--format", choices=("json", "msgpack", "mixed"), default="json")
    fleet.add_argument("--burst", action="store_true", help="every device sends one photo at the same instant")
    fleet.add_argument("--drain", default="2m", help="after the last send, how long retries may go on")
    fleet.add_argument("--workers", type=int, default=64, help="requests in flight at most")
    fleet.add_argument("--seed", type=int, help="the same seed sends the same photo sizes and phases")
    fleet.add_argument("--report", help="write the report (JSON) here")
    fleet.add_argument("--verify", action="store_true", help="wait until every accepted photo is in S3")
    fleet.add_argument("--verify-timeout", default="10m")
    fleet.add_argument("--s3-endpoint", help="the remote's endpoint (default PHOTOFERRY_S3_ENDPOINT, else AWS)")
    fleet.add_argument("--s3-bucket", help="the remote bucket (default PHOTOFERRY_S3_BUCKET)")
    fleet.add_argument("--s3-prefix", help="the shipper's key prefix (default PHOTOFERRY_S3_PREFIX)")
    fleet.set_defaults(run=_fleet)
    remote = commands.add_parser("remote", help="the newest photos in the remote bucket the shipper writes to")
    remote.add_argument("--last", type=int, default=10, help="how many to show (newest last)")
    remote.set_defaults(run=_remote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(CliConfig.from_env(os.environ), args))
    except ConfigError as exc:
        print(f"photoferry {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"photoferry {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
