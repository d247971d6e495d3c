"""Cap accuracy and utilisation on the wire: the shipper side by side with rclone.

For each cap, a backlog of photos of realistic sizes (mostly around 250 KB, some
of several MB) is uploaded through the gateway; the shipper drains it to the
remote S3 through a byte-counting proxy; then ``rclone copy --bwlimit`` copies the
same objects between the same endpoints through the same proxy. The proxy's 10 ms
buckets give each run's worst 1 s and 250 ms windows and its mean rate from first
to last byte (trimmed by a second at each end), as fractions of the cap.

    python -m bench.shipper_cap [--caps 2MB,5MB] [--photos 150] [--seed 7]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from devtools.proxy import CountingProxy, mean_rate, peak_rate
from devtools.servers import RabbitNode, S3Server, ServiceProcess, free_port, wait_until
from services.common import photos
from services.common.s3 import ensure_bucket, s3_client
from services.common.units import parse_rate
from tests.helpers import DEVICE_SECRET, jpeg, photo, upload

LOCAL_BUCKET = "bench-local"
REMOTE_BUCKET = "bench-remote"


def photo_sizes(count: int, seed: int) -> list[int]:
    """Mostly around 250 KB (log-normal), about one in twelve between 2 and 8 MB."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        if rng.random() < 0.08:
            sizes.append(rng.randint(2_000_000, 8_000_000))
        else:
            sizes.append(int(min(1_500_000, max(20_000, rng.lognormvariate(12.43, 0.5)))))
    return sizes


def measure(proxy: CountingProxy, cap: float) -> dict[str, float]:
    buckets = proxy.buckets()
    return {
        "peak_1s": peak_rate(buckets, 1.0) / cap,
        "peak_250ms": peak_rate(buckets, 0.25) / cap,
        "drain": mean_rate(buckets, trim_s=1.0) / cap,
        "bytes": sum(buckets.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="2MB,5MB", help="caps to measure at, comma-separated")
    parser.add_argument("--photos", type=int, default=150, help="photos in each backlog")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rclone = shutil.which("rclone")
    if rclone is None:
        raise SystemExit("rclone is not installed (apt-get install rclone)")

    workdir = Path(tempfile.mkdtemp(prefix="photoferry-bench-"))
    rabbit, local, remote = RabbitNode(workdir / "rabbitmq"), S3Server(workdir / "local"), S3Server(workdir / "remote")
    started: list = []  # type: ignore[type-arg]
    try:
        for server in (rabbit, local, remote):
            server.start()
            started.append(server)
        ensure_bucket(s3_client(local.endpoint, access_key=local.access_key, secret_key=local.secret_key,
                                region="us-east-1"), LOCAL_BUCKET)
        ensure_bucket(s3_client(remote.endpoint, access_key=remote.access_key, secret_key=remote.secret_key,
                                region="us-east-1"), REMOTE_BUCKET)
        proxy = CountingProxy("127.0.0.1", remote.port).start()
        started.append(proxy)
        env = {
            **os.environ, "PHOTOFERRY_AMQP_URL": rabbit.url, "PHOTOFERRY_STORE_ENDPOINT": local.endpoint,
            "PHOTOFERRY_STORE_ACCESS_KEY": local.access_key, "PHOTOFERRY_STORE_SECRET_KEY": local.secret_key,
            "PHOTOFERRY_STORE_BUCKET": LOCAL_BUCKET, "PHOTOFERRY_S3_ENDPOINT": proxy.endpoint,
            "PHOTOFERRY_S3_BUCKET": REMOTE_BUCKET, "AWS_ACCESS_KEY_ID": remote.access_key,
            "AWS_SECRET_ACCESS_KEY": remote.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
            "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET, "PHOTOFERRY_LOG_FORMAT": "json",
            "PHOTOFERRY_LOG_LEVEL": "warning",
        }
        port = free_port()
        gateway = ServiceProcess("gateway", {**env, "PHOTOFERRY_GATEWAY_PORT": str(port)}, port=port,
                                 logfile=workdir / "gateway.log")
        gateway.start()
        started.append(gateway)
        sizes = photo_sizes(args.photos, args.seed)
        print(f"backlog: {len(sizes)} photos, {sum(sizes) / 1e6:.1f} MB "
              f"({sum(s > 1_500_000 for s in sizes)} of 2-8 MB)", flush=True)

        results: dict[tuple[str, str], dict[str, float]] = {}
        for cap_text in args.caps.split(","):
            cap = parse_rate(cap_text)
            device = f"bench-{cap_text.lower()}"
            ids = [_upload(gateway, device, size) for size in sizes]
            proxy.reset()
            _ship(env, local, ids, cap, device, workdir, timeout=10 * sum(sizes) / cap + 60)
            results[(cap_text, "photoferry")] = measure(proxy, cap)
            proxy.reset()
            _rclone(rclone, local, remote, proxy, cap, device)
            results[(cap_text, "rclone")] = measure(proxy, cap)
            print(f"{cap_text}: done", flush=True)

        print(f"\n{'cap':>8} {'tool':<11} {'1 s peak':>9} {'250 ms peak':>12} {'drain':>7} {'MB':>6}")
        for cap_text in args.caps.split(","):
            for tool in ("photoferry", "rclone"):
                r = results[(cap_text, tool)]
                print(f"{cap_text:>8} {tool:<11} {r['peak_1s']:>9.1%} {r['peak_250ms']:>12.1%} "
                      f"{r['drain']:>7.1%} {r['bytes'] / 1e6:>6.1f}")
            ours, theirs = results[(cap_text, "photoferry")], results[(cap_text, "rclone")]
            print(f"{'':>8} {'ratio':<11} {_over(ours['peak_1s'], theirs['peak_1s']):>9} "
                  f"{_over(ours['peak_250ms'], theirs['peak_250ms']):>12} {ours['drain'] / theirs['drain']:>6.2f}x")
        print("\nratios: overshoot above the cap, photoferry / rclone (lower is better); drain, photoferry / rclone")
    finally:
        for thing in reversed(started):
            thing.stop()


def _upload(gateway: ServiceProcess, device: str, size: int) -> str:
    response = upload(gateway.url, photo(device, jpeg(size)))
    response.raise_for_status()
    return str(response.json()["id"])


def _ship(env: dict[str, str], local: S3Server, ids: list[str], cap: float, device: str, workdir: Path, *,
          timeout: float) -> None:
    """Run a shipper at ``cap`` until every photo of ``ids`` is marked shipped."""
    port = free_port()
    shipper = ServiceProcess("shipper", {**env, "PHOTOFERRY_SHIPPER_PORT": str(port),
                                         "PHOTOFERRY_SHIP_RATE": str(int(cap)),
                                         "PHOTOFERRY_S3_PREFIX": f"photoferry-{device}/"},
                             port=port, logfile=workdir / f"shipper-{device}.log")
    shipper.start()
    wanted = {photos.shipped_marker_key(i) for i in ids}
    markers = s3_client(local.endpoint, access_key=local.access_key, secret_key=local.secret_key,
                        region="us-east-1")
    try:
        wait_until(lambda: wanted <= _keys(markers, LOCAL_BUCKET, photos.SHIPPED_PREFIX), timeout=timeout,
                   what="the shipper to drain", interval=1)
    finally:
        shipper.stop()


def _keys(client, bucket: str, prefix: str) -> set[str]:  # type: ignore[no-untyped-def]
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found |= {item["Key"] for item in page.get("Contents", [])}
    return found


def _rclone(rclone: str, local: S3Server, remote: S3Server, proxy: CountingProxy, cap: float, device: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # rclone 1.60 refuses to start with it
    for name, server, endpoint in (("SRC", local, local.endpoint), ("DST", remote, proxy.endpoint)):
        env |= {f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
                f"RCLONE_CONFIG_{name}_ENDPOINT": endpoint, f"RCLONE_CONFIG_{name}_REGION": "us-east-1",
                f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": server.access_key,
                f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": server.secret_key}
    subprocess.run(
        [rclone, "copy", f"SRC:{LOCAL_BUCKET}/photos", f"DST:{REMOTE_BUCKET}/rclone-{device}/photos",
         "--include", f"*-{device}", "--bwlimit", f"{int(cap)}B", "--transfers", "4",
         "--s3-no-check-bucket", "--retries", "1", "--quiet"],
        env=env, check=True, timeout=10 * 3600,
    )


def _over(ours: float, theirs: float) -> str:
    if theirs <= 1.0:
        return "n/a"
    return f"{max(ours - 1.0, 0.0) / (theirs - 1.0):.2f}x"


if __name__ == "__main__":
    main()
