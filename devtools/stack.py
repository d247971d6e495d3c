"""``make up``: run the whole stack locally, as processes, until Ctrl-C.

Reuses the RabbitMQ at ``PHOTOFERRY_AMQP_URL`` when it answers, else starts a
private node (its data in ``.stack/rabbitmq``); keeps the site's photos in the
embedded store (``.stack/store``); starts an S3-protocol server standing in for
the remote S3 (its objects saved to ``.stack/remote-s3/objects`` at a stop and
loaded at the next start, since moto keeps them in memory); starts the services;
writes ``.stack/env`` (what the ``photoferry`` command and curl need to reach it)
and prints where everything is and what to try. Ctrl-C (or SIGINT to ``make``
alone, or SIGTERM) stops everything it started, and nothing else; a start after
a stop finds every photo, setting, queued message and the history as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika

from devtools.servers import (
    REPO,
    RabbitNode,
    S3Server,
    ServiceProcess,
    free_port,
    port_is_free,
)
from services.common.config import StoreSettings
from services.common.localstore import LocalStore
from services.common.s3 import ensure_bucket, s3_client

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SERVICES = ("gateway", "store", "shipper")
DEV_DEVICE = "cam-dev-01"
LOCAL_BUCKET = "photoferry"
REMOTE_BUCKET = "photoferry-remote"
REMOTE_PREFIX = "site-dev/"


def _broker_accepts(url: str) -> bool:
    async def attempt() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(attempt())
    except Exception:
        return False
    return True


def _persistent_secret(path: Path) -> str:
    """A secret kept across runs, so device tokens printed earlier stay valid."""
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _preferred_port(port: int) -> int:
    return port if port_is_free(port) else 0


def _follow(name: str, logfile: Path, offset: int) -> None:
    """Echo a service's log from ``offset`` on to the terminal, prefixed with its name."""
    with open(logfile, "rb") as raw:
        raw.seek(offset)
        log = io.TextIOWrapper(raw, errors="replace")
        while True:
            line = log.readline()
            if not line:
                time.sleep(0.2)
                continue
            sys.stdout.write(f"{name:>8} | {line}")
            sys.stdout.flush()


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, object]] = []  # stopped in reverse order
        self.services: dict[str, ServiceProcess] = {}

    def broker_url(self) -> str:
        url = os.environ.get("PHOTOFERRY_AMQP_URL") or DEFAULT_AMQP_URL
        if _broker_accepts(url):
            print(f"using the RabbitMQ at {urlsplit(url).hostname}:{urlsplit(url).port or 5672}")
            return url
        print("no RabbitMQ answers at PHOTOFERRY_AMQP_URL; starting a private node (about 10 s)")
        node = RabbitNode(self.workdir / "rabbitmq", amqp_port=_preferred_port(5673) or None,
                          nodename="photoferry-stack@localhost")
        node.start()
        self.started.append(("rabbitmq", node))
        print(f"private RabbitMQ on port {node.amqp_port} (management on {node.management_port})")
        return node.url

    def s3_server(self, name: str, port: int) -> S3Server:
        server = S3Server(self.workdir / name, port=_preferred_port(port) or None)
        server.start()
        self.started.append((name, server))
        print(f"{name}: {server.kind} at {server.endpoint}")
        return server

    def start_service(self, name: str, env: dict[str, str], port: int) -> None:
        service = ServiceProcess(name, env, port=port, logfile=self.workdir / "logs" / f"{name}.log")
        # The log file outlives a run; echo only what this run writes.
        earlier = service.logfile.stat().st_size if service.logfile.exists() else 0
        service.start()
        threading.Thread(target=_follow, args=(name, service.logfile, earlier), daemon=True).start()
        self.services[name] = service
        self.started.append((name, service))

    def stop(self) -> None:
        for name, thing in reversed(self.started):
            if name == "remote-s3":
                saved = _save_remote(thing, self.workdir / "remote-s3" / "objects")  # type: ignore[arg-type]
                print(f"saved {saved} objects of the remote stand-in")
            thing.stop()  # type: ignore[attr-defined]
            print(f"stopped {name}")


def _remote_client(remote: S3Server):  # type: ignore[no-untyped-def]
    return s3_client(remote.endpoint, access_key=remote.access_key, secret_key=remote.secret_key, region="us-east-1")


def _saved_objects(folder: Path) -> LocalStore:
    return LocalStore(StoreSettings(f"file://{folder}", "", "", REMOTE_BUCKET, "us-east-1", 30))


def _save_remote(remote: S3Server, folder: Path) -> int:
    """Copy the remote stand-in's objects (with their metadata) to ``folder``: moto forgets them at a stop."""
    if remote.kind != "moto":
        return 0  # MinIO keeps its own
    client, saved = _remote_client(remote), _saved_objects(folder)
    shutil.rmtree(folder, ignore_errors=True)
    asyncio.run(saved.ensure_bucket())
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=REMOTE_BUCKET):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=REMOTE_BUCKET, Key=item["Key"])
            asyncio.run(saved.put(item["Key"], got["Body"].read(),
                                  metadata={"Content-Type": got.get("ContentType", "application/octet-stream"),
                                            **got.get("Metadata", {})}))
            count += 1
    return count


def _restore_remote(remote: S3Server, folder: Path) -> int:
    if remote.kind != "moto" or not folder.is_dir():
        return 0
    client, saved = _remote_client(remote), _saved_objects(folder)

    async def keys() -> list[str]:
        return [item["path"] async for page in saved.list("") for item in page]

    count = 0
    for key in asyncio.run(keys()):
        data, stored = saved.read_with_metadata(key)  # type: ignore[misc]
        client.put_object(Bucket=REMOTE_BUCKET, Key=key, Body=data, ContentType=stored.content_type,
                          Metadata=stored.metadata)
        count += 1
    return count


def _watch_make(stop: threading.Event) -> None:
    """Stop when ``make`` (our parent) is handling SIGINT: it does not pass it on to its recipe,
    it only waits for the recipe to end (a terminal's Ctrl-C reaches the whole group instead)."""
    status = Path(f"/proc/{os.getppid()}/status")
    while not stop.wait(0.5):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            return
        if fields.get("Name", "").strip() != "make":
            return
        # A signal being handled is blocked while its handler runs: make waits for us in it.
        if int(fields.get("SigBlk", "0"), 16) & (1 << (signal.SIGINT - 1)):
            os.kill(os.getpid(), signal.SIGINT)
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".stack")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    stack = Stack(args.workdir)
    # Ctrl-C and SIGTERM both end in an orderly stop of what was started (set
    # explicitly: a shell may start a background job with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    watching = threading.Event()
    threading.Thread(target=_watch_make, args=(watching,), daemon=True).start()
    try:
        amqp_url = stack.broker_url()
        store_url = f"file://{(args.workdir / 'store').resolve()}"
        asyncio.run(LocalStore(StoreSettings(store_url, "", "", LOCAL_BUCKET, "us-east-1", 10)).ensure_bucket())
        remote = stack.s3_server("remote-s3", 9100)
        ensure_bucket(_remote_client(remote), REMOTE_BUCKET)
        restored = _restore_remote(remote, args.workdir / "remote-s3" / "objects")
        if restored:
            print(f"loaded {restored} objects into the remote stand-in")

        device_secret = _persistent_secret(args.workdir / "device-secret")
        admin_token = _persistent_secret(args.workdir / "admin-token")
        ports = {name: _preferred_port(8080 + i) or free_port() for i, name in enumerate(SERVICES)}
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PHOTOFERRY_LOG_FORMAT": os.environ.get("PHOTOFERRY_LOG_FORMAT", "text"),
            "PHOTOFERRY_AMQP_URL": amqp_url,
            "PHOTOFERRY_STORE_ENDPOINT": store_url,
            "PHOTOFERRY_STORE_BUCKET": LOCAL_BUCKET,
            "PHOTOFERRY_S3_ENDPOINT": remote.endpoint,
            "PHOTOFERRY_S3_BUCKET": REMOTE_BUCKET,
            "PHOTOFERRY_S3_PREFIX": REMOTE_PREFIX,
            "AWS_ACCESS_KEY_ID": remote.access_key,
            "AWS_SECRET_ACCESS_KEY": remote.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PHOTOFERRY_DEVICE_SECRET": device_secret,
            "PHOTOFERRY_ADMIN_TOKEN": admin_token,
            "PHOTOFERRY_SHIP_RATE": os.environ.get("PHOTOFERRY_SHIP_RATE", "40Mbit"),
            "PHOTOFERRY_RECONCILE_EVERY": os.environ.get("PHOTOFERRY_RECONCILE_EVERY", "30s"),
        }
        env.update({f"PHOTOFERRY_{name.upper()}_PORT": str(port) for name, port in ports.items()})
        for name in SERVICES:
            if (REPO / "services" / name / "__main__.py").exists():
                stack.start_service(name, env, ports[name])

        env_file = args.workdir / "env"
        client_env = _client_env(env, ports)
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in client_env.items()))
        env_file.chmod(0o600)
        _print_welcome(ports, amqp_url, store_url, remote, env_file)
        while all(s.process and s.process.poll() is None for s in stack.services.values()):
            time.sleep(0.5)
        exited = [n for n, s in stack.services.items() if s.process and s.process.poll() is not None]
        print(f"{', '.join(exited)} exited; stopping the stack")
    except KeyboardInterrupt:
        print("\nstopping the stack")
    finally:
        watching.set()
        stack.stop()


# A photo upload as a device sends it (JSON, the image in base64), for the banner and the README.
SAMPLE_UPLOAD = (
    """  curl -sS -X POST "$PHOTOFERRY_GATEWAY_URL/v1/photos" -H "Authorization: Bearer $TOKEN" \\\n"""
    """    -H 'Content-Type: application/json' \\\n"""
    f"""    -d '{{"device_id":"{DEV_DEVICE}","captured_at":"2026-01-01T12:00:00Z","image":"'"$(base64 -w0 """
    """devtools/sample.jpg)"'"}'"""
)


# What the photoferry command (and curl) need to talk to this stack, taken from the services' settings.
CLIENT_SETTINGS = ("PHOTOFERRY_ADMIN_TOKEN", "PHOTOFERRY_DEVICE_SECRET", "PHOTOFERRY_S3_ENDPOINT",
                   "PHOTOFERRY_S3_BUCKET", "PHOTOFERRY_S3_PREFIX", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_DEFAULT_REGION")


def _client_env(env: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    return {
        "PHOTOFERRY_GATEWAY_URL": f"http://127.0.0.1:{ports['gateway']}",
        "PHOTOFERRY_STORE_URL": f"http://127.0.0.1:{ports['store']}",
        **{name: env[name] for name in CLIENT_SETTINGS},
    }


def _print_welcome(ports: dict[str, int], amqp_url: str, store_url: str, remote: S3Server, env_file: Path) -> None:
    broker = urlsplit(amqp_url)
    print(f"""
photoferry is up.
  gateway        http://127.0.0.1:{ports['gateway']}    devices POST here (API: /openapi.json)
  store keeper   http://127.0.0.1:{ports['store']}    the operator page and API
  shipper        http://127.0.0.1:{ports['shipper']}    /status
  local store    {store_url}    the embedded store, bucket {LOCAL_BUCKET}
  remote S3      {remote.endpoint}    {remote.kind} standing in for AWS, bucket {REMOTE_BUCKET}, prefix {REMOTE_PREFIX}
  broker         {broker.hostname}:{broker.port or 5672}

In another terminal, from {REPO}:
  source {env_file.relative_to(REPO) if env_file.is_relative_to(REPO) else env_file}
  .venv/bin/photoferry status                          the site at a glance
  .venv/bin/photoferry fleet --devices 20 --duration 30s --verify
                                                       20 simulated devices, then every photo checked in S3
  .venv/bin/photoferry remote                          the newest photos in the remote bucket
  open "$PHOTOFERRY_STORE_URL/#token=$PHOTOFERRY_ADMIN_TOKEN"   the operator page

Upload the sample photo yourself (201 the first time, 200 with the same id after):
  TOKEN=$(.venv/bin/photoferry token {DEV_DEVICE})
{SAMPLE_UPLOAD}

Ctrl-C stops everything started here.
""", flush=True)


if __name__ == "__main__":
    main()
