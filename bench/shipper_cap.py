"""The shipper side by side with rclone: cap accuracy on the wire, CPU per photo, requests per photo.

For each photo mix and cap, a backlog is uploaded through the gateway; the shipper
(one replica, or two sharing the cap) drains it to the remote S3; then
``rclone copy --bwlimit`` copies the same objects between the same two servers.
Both read the local store and write the remote through byte-counting proxies,
so both are measured alike: the remote proxy's 10 ms buckets give the worst 1 s
and 250 ms windows and the mean rate from first to last byte (trimmed by a second
at each end) as fractions of the cap; both proxies count the HTTP requests each
tool sends per photo; the processes' own CPU time (user + system) divided by
the photos gives CPU per photo.

    python -m bench.shipper_cap [--mixes small,large] [--caps 2MB,5MB] [--replicas 1,2] [--photos 150]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def photo_sizes(mix: str, count: int, seed: int) -> list[int]:
    """small: around 250 KB (log-normal); large: 8 to 12 MB (multipart); mixed: one in twelve of 2-8 MB."""
    rng = random.Random(seed)
    if mix == "large":
        return [rng.randint(8_000_000, 12_000_000) for _ in range(max(4, count // 12))]
    sizes = []
    for _ in range(count):
        if mix == "mixed" and rng.random() < 0.08:
            sizes.append(rng.randint(2_000_000, 8_000_000))
        else:
            sizes.append(int(min(1_500_000, max(20_000, rng.lognormvariate(12.43, 0.5)))))
    return sizes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(remote: CountingProxy, local: CountingProxy, cap: float, count: int, cpu: float) -> dict[str, float]:
    buckets = remote.buckets()
    return {
        "peak_1s": peak_rate(buckets, 1.0) / cap,
        "peak_250ms": peak_rate(buckets, 0.25) / cap,
        "drain": mean_rate(buckets, trim_s=1.0) / cap,
        "bytes": sum(buckets.values()),
        "cpu_ms": 1000 * cpu / count,
        "remote_requests": sum(remote.requests().values()) / count,
        "local_requests": sum(local.requests().values()) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixes", default="small,large", help="photo mixes: small, large, mixed")
    parser.add_argument("--caps", default="2MB,5MB", help="caps to measure at, comma-separated")
    parser.add_argument("--replicas", default="1,2", help="shipper replicas sharing the cap")
    parser.add_argument("--photos", type=int, default=150, help="photos in each small backlog")
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
        remote_proxy = CountingProxy("127.0.0.1", remote.port).start()
        local_proxy = CountingProxy("127.0.0.1", local.port).start()
        started += [remote_proxy, local_proxy]
        env = {
            **os.environ, "PHOTOFERRY_AMQP_URL": rabbit.url, "PHOTOFERRY_STORE_ENDPOINT": local.endpoint,
            "PHOTOFERRY_STORE_ACCESS_KEY": local.access_key, "PHOTOFERRY_STORE_SECRET_KEY": local.secret_key,
            "PHOTOFERRY_STORE_BUCKET": LOCAL_BUCKET, "PHOTOFERRY_S3_ENDPOINT": remote_proxy.endpoint,
            "PHOTOFERRY_S3_BUCKET": REMOTE_BUCKET, "AWS_ACCESS_KEY_ID": remote.access_key,
            "AWS_SECRET_ACCESS_KEY": remote.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
            "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET, "PHOTOFERRY_LOG_FORMAT": "json",
            "PHOTOFERRY_LOG_LEVEL": "warning", "OTEL_SDK_DISABLED": "true",
        }
        port = free_port()
        gateway = ServiceProcess("gateway", {**env, "PHOTOFERRY_GATEWAY_PORT": str(port)}, port=port,
                                 logfile=workdir / "gateway.log")
        gateway.start()
        started.append(gateway)

        rows: list[tuple[str, str, int, str, dict[str, float]]] = []
        for mix in args.mixes.split(","):
            sizes = photo_sizes(mix, args.photos, args.seed)
            print(f"{mix}: {len(sizes)} photos, {sum(sizes) / 1e6:.1f} MB", flush=True)
            for cap_text in args.caps.split(","):
                cap = parse_rate(cap_text)
                for replicas in (int(r) for r in args.replicas.split(",")):
                    device = f"bench-{mix}-{cap_text.lower()}-{replicas}"
                    ids = [_upload(gateway, device, size) for size in sizes]
                    for proxy in (remote_proxy, local_proxy):
                        proxy.reset()
                    cpu = _ship(env, local, local_proxy, ids, cap, device, workdir, replicas,
                                timeout=10 * sum(sizes) / cap + 60)
                    rows.append((mix, cap_text, replicas, "photoferry",
                                 measure(remote_proxy, local_proxy, cap, len(ids), cpu)))
                    for proxy in (remote_proxy, local_proxy):
                        proxy.reset()
                    cpu = _rclone(rclone, local, local_proxy, remote, remote_proxy, cap, device)
                    rows.append((mix, cap_text, replicas, "rclone",
                                 measure(remote_proxy, local_proxy, cap, len(ids), cpu)))
                    print(f"{mix} {cap_text} x{replicas}: done", flush=True)
        _print(rows)
    finally:
        for thing in reversed(started):
            thing.stop()


def _print(rows: list[tuple[str, str, int, str, dict[str, float]]]) -> None:
    print(f"\n{'mix':<6} {'cap':>5} {'rep':>3} {'tool':<10} {'1 s peak':>8} {'250 ms':>7} {'drain':>6} "
          f"{'CPU/photo':>10} {'remote req':>10} {'local req':>9}")
    for mix, cap, replicas, tool, r in rows:
        print(f"{mix:<6} {cap:>5} {replicas:>3} {tool:<10} {r['peak_1s']:>8.1%} {r['peak_250ms']:>7.1%} "
              f"{r['drain']:>6.1%} {r['cpu_ms']:>8.2f}ms {r['remote_requests']:>10.2f} {r['local_requests']:>9.2f}")
    print("\nCPU per photo, photoferry / rclone (same photos, cap and servers):")
    for i in range(0, len(rows), 2):
        ours, theirs = rows[i], rows[i + 1]
        print(f"  {ours[0]:<6} {ours[1]:>5} x{ours[2]}: {ours[4]['cpu_ms'] / theirs[4]['cpu_ms']:.2f}x")


def _upload(gateway: ServiceProcess, device: str, size: int) -> str:
    response = upload(gateway.url, photo(device, jpeg(size)))
    response.raise_for_status()
    return str(response.json()["id"])


def _ship(env: dict[str, str], local: S3Server, local_proxy: CountingProxy, ids: list[str], cap: float,
          device: str, workdir: Path, replicas: int, *, timeout: float) -> float:
    """Run shippers sharing ``cap`` until every photo of ``ids`` is marked shipped; return their CPU seconds."""
    shippers = []
    for n in range(replicas):
        port = free_port()
        shippers.append(ServiceProcess("shipper", {
            **env, "PHOTOFERRY_SHIPPER_PORT": str(port), "PHOTOFERRY_SHIP_RATE": str(int(cap)),
            "PHOTOFERRY_STORE_ENDPOINT": local_proxy.endpoint, "PHOTOFERRY_S3_PREFIX": f"photoferry-{device}/",
        }, port=port, logfile=workdir / f"shipper-{device}-{n}.log"))
    for shipper in shippers:
        shipper.start()
    wanted = {photos.shipped_marker_key(i) for i in ids}
    markers = s3_client(local.endpoint, access_key=local.access_key, secret_key=local.secret_key,
                        region="us-east-1")
    try:
        # Start-up (imports, connecting) is not shipping: count from when they are ready.
        before = sum(cpu_seconds(s.process.pid) for s in shippers)  # type: ignore[union-attr]
        wait_until(lambda: wanted <= _keys(markers, LOCAL_BUCKET, photos.SHIPPED_PREFIX), timeout=timeout,
                   what="the shipper to drain", interval=1)
        return sum(cpu_seconds(s.process.pid) for s in shippers) - before  # type: ignore[union-attr]
    finally:
        for shipper in shippers:
            shipper.stop()


def _keys(client, bucket: str, prefix: str) -> set[str]:  # type: ignore[no-untyped-def]
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found |= {item["Key"] for item in page.get("Contents", [])}
    return found


def _rclone(rclone: str, local: S3Server, local_proxy: CountingProxy, remote: S3Server,
            remote_proxy: CountingProxy, cap: float, device: str) -> float:
    """Copy the same photos with rclone; return the CPU seconds it used."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # rclone 1.60 refuses to start with it
    for name, server, endpoint in (("SRC", local, local_proxy.endpoint), ("DST", remote, remote_proxy.endpoint)):
        env |= {f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
                f"RCLONE_CONFIG_{name}_ENDPOINT": endpoint, f"RCLONE_CONFIG_{name}_REGION": "us-east-1",
                f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": server.access_key,
                f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": server.secret_key}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [rclone, "copy", f"SRC:{LOCAL_BUCKET}/photos", f"DST:{REMOTE_BUCKET}/rclone-{device}/photos",
         "--include", f"*-{device}", "--bwlimit", f"{int(cap)}B", "--transfers", "4",
         "--s3-no-check-bucket", "--retries", "1", "--quiet"],
        env=env, check=True, timeout=10 * 3600,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


if __name__ == "__main__":
    main()
