"""Real servers as processes, for the local stack (``make up``) and the tests.

No container engine is assumed: RabbitMQ runs as a private node from the
``rabbitmq-server`` package on its own ports and data folder, and the S3 protocol
is served by MinIO when a ``minio`` binary is on PATH, else by moto's server.
Readiness is probed for real (an AMQP handshake, an S3 listing), never slept on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = REPO / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = REPO / "rabbitmq" / "rabbitmq.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(check, *, timeout: float, what: str, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns true; raise with the last error at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # the last failure is the useful one to report
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:g}s (last error: {last_error!r})")


def amqp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an AMQP 0-9-1 broker answers the protocol header with Connection.Start."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        frame = sock.recv(7)
    # A method frame (type 1) on channel 0 is Connection.Start.
    return len(frame) == 7 and frame[0] == 1 and frame[1:3] == b"\x00\x00"


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class RabbitNode:
    """A private RabbitMQ node: own name, ports, epmd and data folder."""

    def __init__(self, workdir: Path, *, user: str = "photoferry", password: str = "photoferry",
                 amqp_port: int | None = None, nodename: str | None = None) -> None:
        self.workdir = workdir
        self.user = user
        self.password = password
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.management_port = free_port()
        # A node keeps its data under its name: one that must keep its queues across runs names itself.
        self.nodename = nodename or f"photoferry-{self.amqp_port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_SERVER_START_ARGS": (
                f"-rabbitmq_management tcp_config [{{ip,\"127.0.0.1\"}},{{port,{self.management_port}}}]"
            ),
            "HOME": str(self.workdir / "home"),
            # The started PID is then the broker itself, so kill -9 reaches it.
            "RUNNING_UNDER_SYSTEMD": "1",
        }

    def _write_config(self) -> None:
        for sub in ("mnesia", "log", "home", "definitions"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        definitions = self.workdir / "definitions"
        shutil.copy(DEFINITIONS, definitions / "10-topology.json")
        # Users are per site; without one in the definitions no user exists at all.
        users = {
            "users": [{
                "name": self.user,
                "password_hash": _password_hash(self.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            }],
            "permissions": [{
                "user": self.user, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*",
            }],
        }
        (definitions / "20-users.json").write_text(json.dumps(users))
        conf = RABBITMQ_CONF.read_text()
        (self.workdir / "rabbitmq.conf").write_text(
            f"{conf}\nload_definitions = {definitions}\nloopback_users = none\n"
            # Queue figures in the management API refresh every 500 ms, not 5 s.
            "collect_statistics_interval = 500\n"
        )
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start the node (keeping its data across restarts) and wait for an AMQP handshake."""
        if not RABBITMQ_SERVER.exists():
            raise RuntimeError(
                f"{RABBITMQ_SERVER} not found: install the rabbitmq-server package "
                "(apt-get install rabbitmq-server)"
            )
        if not (self.workdir / "rabbitmq.conf").exists():
            self._write_config()
        self._log = open(self.workdir / "server.out", "ab")
        self.process = subprocess.Popen(
            [str(RABBITMQ_SERVER)], env=self._env(), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.workdir / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:\n{tail}")
            return amqp_answers("127.0.0.1", self.amqp_port)

        wait_until(up, timeout=timeout, what=f"RabbitMQ on port {self.amqp_port}", interval=0.25)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop the node cleanly, then the epmd it started."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stop_epmd()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stop_epmd(self) -> None:
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        if Path(epmd).exists():
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"],
                           capture_output=True, timeout=10, check=False)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node; return what it printed."""
        done = subprocess.run([str(RABBITMQCTL), "-n", self.nodename, *args], env=self._env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def set_disk_alarm(self, on: bool) -> None:
        """Raise the broker's disk alarm (a free-disk limit above any disk), or clear it again."""
        self.ctl("set_disk_free_limit", "100000GB" if on else "1MB")

    def disk_alarm(self) -> bool:
        """Whether the node's disk alarm is on now."""
        nodes = self.management("GET", "nodes")
        return any(node.get("disk_free_alarm") for node in nodes)  # type: ignore[union-attr]

    def add_vhost(self, vhost: str) -> None:
        """Create a virtual host this node's user may use fully (isolates one test module)."""
        quoted = urllib.parse.quote(vhost, safe="")
        self.management("PUT", f"vhosts/{quoted}")
        self.management("PUT", f"permissions/{quoted}/{self.user}",
                        {"configure": ".*", "write": ".*", "read": ".*"})

    def url_for(self, vhost: str) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.amqp_port}/{urllib.parse.quote(vhost, safe='')}"

    def management(self, method: str, path: str, body: object = None) -> object:
        """Call the management HTTP API (for tests: queue depths, vhosts)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.management_url}/api/{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
        return json.loads(payload) if payload else None


class S3Server:
    """An S3-protocol server: MinIO when ``minio`` is on PATH, else moto's (in memory, kept alive)."""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 access_key: str = "photoferry", secret_key: str = "photoferry-secret") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.process: subprocess.Popen[bytes] | None = None
        self.kind = "minio" if shutil.which("minio") else "moto"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        """MinIO's cluster metrics (the disk's figures); moto has none."""
        return f"{self.endpoint}/minio/v2/metrics/cluster" if self.kind == "minio" else None

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "server.out", "ab")
        if self.kind == "minio":
            command = ["minio", "server", str(self.workdir / "data"),
                       "--address", f"127.0.0.1:{self.port}", "--quiet"]
            env = {**os.environ, "MINIO_ROOT_USER": self.access_key,
                   "MINIO_ROOT_PASSWORD": self.secret_key, "MINIO_PROMETHEUS_AUTH_TYPE": "public"}
        else:
            command = [sys.executable, "-m", "devtools.moto_keepalive", "--port", str(self.port)]
            env = dict(os.environ)
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=2).close()
            except urllib.error.HTTPError:
                pass  # any S3 answer (even 403 to an anonymous listing) means it is up
            return True

        wait_until(answers, timeout=timeout, what=f"{self.kind} on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class ServiceProcess:
    """One of our services (``python -m services.<name>``) as a child process."""

    def __init__(self, name: str, env: dict[str, str], *, port: int, logfile: Path, code: Path = REPO) -> None:
        self.name = name
        self.code = code  # the checkout whose services run (another one, for a benchmark's baseline)
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.port = port
        self.logfile = logfile
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: str = "ready", timeout: float = 30.0) -> None:
        """Start the service; wait until it is ``ready`` (/readyz), ``alive`` (/healthz), or not at all."""
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"],
                env=self.env, cwd=self.code, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait in ("alive", "ready"):
            wait_until(self.healthy, timeout=timeout, what=f"{self.name} on port {self.port}")
        if wait == "ready":
            wait_until(self.ready, timeout=timeout, what=f"{self.name} readiness")

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        urllib.request.urlopen(f"{self.url}/healthz", timeout=2).close()
        return True

    def ready(self) -> bool:
        self.healthy()
        try:
            urllib.request.urlopen(f"{self.url}/readyz", timeout=2).close()
        except urllib.error.HTTPError:
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        return self.logfile.read_text(errors="replace")[-chars:] if self.logfile.exists() else ""

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL if it does not end in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
