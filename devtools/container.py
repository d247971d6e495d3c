"""Inside a rehearsed pod (devtools/rehearsal.py): the container runtime's part, and stand-ins.

``start SPEC`` runs as root in the pod's network namespace and in a mount and UTS
namespace of its own: it builds the container's file system (this machine's root seen
through an overlay, the image's own files, the volumes mounted where the manifest says,
the root remounted read-only when the manifest asks), sets the hostname, enters that
root, drops to the container's user and groups without privileges, and becomes the
container's command. ``exec SPEC -- ARGV`` does the same for a probe or a hook in a
running container (the kubelet enters its namespaces first).

Stand-ins for images that cannot run here: ``minio ARGS`` serves S3 (moto) with the
health and cluster-metrics endpoints MinIO's manifests and the store keeper use, and
``trace-sink`` takes Jaeger's OTLP/HTTP, admin and UI ports.
"""

from __future__ import annotations

import argparse
import ctypes
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
CAP_LAST = 40  # the highest capability number Linux defines
MINIO_PORT = 9000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def start(specfile: Path) -> None:
    """Build the container's file system in this (private) mount namespace, then become the container."""
    spec = json.loads(specfile.read_text())
    socket.sethostname(spec["hostname"])
    root = Path(spec["root"])
    layer = root.with_name(root.name + ".layer")
    for path in (root, layer):
        path.mkdir(parents=True, exist_ok=True)
    # The image is this machine's root seen through an overlay, so changes stay in this container.
    _mount("-t", "tmpfs", "tmpfs", str(layer))
    (layer / "upper").mkdir()
    (layer / "work").mkdir()
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={layer}/upper,workdir={layer}/work", str(root))
    _mount("--bind", str(root), str(root))  # a mount of its own, to be made read-only alone
    for folder in spec["clear"]:
        shutil.rmtree(f"{root}{folder}", ignore_errors=True)
    for path, item in spec["files"].items():
        target = Path(f"{root}{path}")
        if item.get("directory"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(item["content"])
        os.chown(target, item["owner"], item["owner"])
        target.chmod(item["mode"])
    for folder in spec["traversable"]:
        target = Path(f"{root}{folder}")
        target.chmod(target.stat().st_mode | 0o111)
    for source, name in ((spec["hosts"], "/etc/hosts"), (spec["resolv"], "/etc/resolv.conf")):
        _mount("--bind", "-o", "ro", source, f"{root}{name}")
    for mount in spec["mounts"]:
        target = Path(f"{root}{mount['target']}")
        if Path(mount["source"]).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        _mount("--bind", mount["source"], str(target))
        if mount["readonly"]:
            _mount("-o", "remount,bind,ro", str(target))
    # What runs here (this checkout, its interpreter) must stay visible where a pod's volume covers it
    # (a checkout under /tmp, where MinIO and RabbitMQ mount an emptyDir).
    for path in spec["keep"]:
        if any(path == m["target"] or path.startswith(m["target"].rstrip("/") + "/") for m in spec["mounts"]):
            target = Path(f"{root}{path}")
            target.mkdir(parents=True, exist_ok=True)
            _mount("--bind", path, str(target))
            _mount("-o", "remount,bind,ro", str(target))
    for system in ("/proc", "/dev", "/sys"):
        _mount("--rbind", system, f"{root}{system}")
    if spec["read_only_root"]:
        _mount("-o", "remount,bind,ro", str(root))  # submounts (volumes, /proc) keep their own flags
    # Tell the kubelet the file system is in place: hooks and exec probes may enter it now.
    root.with_name(root.name + ".started").touch()
    become(spec)
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


def become(spec: dict[str, Any]) -> None:
    """Enter the container's root and drop to its user, as the runtime does before the command."""
    os.chroot(spec["root"])
    os.chdir(spec["workdir"])
    if spec["no_new_privileges"] and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    for capability in range(CAP_LAST + 1):
        _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # capabilities: drop: [ALL]
    os.setgroups(spec["groups"])
    os.setgid(spec["group"])
    os.setuid(spec["user"])


def exec_in(specfile: Path, argv: list[str]) -> None:
    """Run a probe's or hook's command in a running container whose namespaces we have entered."""
    spec = json.loads(specfile.read_text())
    become(spec)
    os.execvpe(argv[0], argv, spec["env"])


# -- stand-ins -----------------------------------------------------------------------------------

def minio(args: list[str]) -> None:
    """S3 on MinIO's port, with the endpoints MinIO's probes and the store keeper's disk reading use.

    ``args`` are the manifest's (``server DIR ...``): the disk figures are those of DIR,
    and the metrics are public only with ``MINIO_PROMETHEUS_AUTH_TYPE=public``, as in MinIO.
    """
    from devtools.moto_keepalive import serve_s3

    positional, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("--"):
            skip = "=" not in arg
        else:
            positional.append(arg)
    data = positional[1] if len(positional) > 1 and positional[0] == "server" else "/"
    public = os.environ.get("MINIO_PROMETHEUS_AUTH_TYPE") == "public"

    def wrap(app: Any) -> Any:
        def minio_endpoints(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path in ("/minio/health/live", "/minio/health/ready"):
                start_response("200 OK", [("Content-Length", "0")])
                return [b""]
            if path == "/minio/v2/metrics/cluster":
                if not public:
                    start_response("403 Forbidden", [("Content-Length", "0")])
                    return [b""]
                disk = os.statvfs(data)
                body = (f"minio_cluster_capacity_usable_total_bytes {disk.f_blocks * disk.f_frsize}\n"
                        f"minio_cluster_capacity_usable_free_bytes {disk.f_bavail * disk.f_frsize}\n").encode()
                start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4"),
                                          ("Content-Length", str(len(body)))])
                return [body]
            return app(environ, start_response)

        return minio_endpoints

    serve_s3("0.0.0.0", MINIO_PORT, wrap)


def trace_sink(ports: tuple[int, ...] = (4318, 14269, 16686)) -> None:
    """Answer OTLP/HTTP exports and Jaeger's admin and UI ports; say which services sent spans."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    seen: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for spans in request.resource_spans:
                for attribute in spans.resource.attributes:
                    if attribute.key == "service.name" and attribute.value.string_value not in seen:
                        seen.add(attribute.value.string_value)
                        print(f"spans from {attribute.value.string_value}", flush=True)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler) for port in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    servers[0].serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start").add_argument("spec", type=Path)
    exec_command = commands.add_parser("exec")
    exec_command.add_argument("spec", type=Path)
    exec_command.add_argument("argv", nargs=argparse.REMAINDER)
    commands.add_parser("minio").add_argument("args", nargs=argparse.REMAINDER)
    commands.add_parser("trace-sink")
    args = parser.parse_args()
    if args.command == "start":
        start(args.spec)
    elif args.command == "exec":
        exec_in(args.spec, args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    elif args.command == "minio":
        minio(args.args[1:] if args.args[:1] == ["--"] else args.args)
    else:
        trace_sink()


if __name__ == "__main__":
    main()
