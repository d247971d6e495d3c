"""``make up`` stopped (by SIGINT to make alone) and started again keeps every photo, setting and figure,
and ships what waited."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import REPO, free_port, wait_until
from services.common.s3 import s3_client
from services.common.tokens import device_token
from tests.helpers import encode, jpeg, photo

pytestmark = pytest.mark.servers


class Stack:
    """``python -m devtools.stack`` as ``make up`` runs it, in a folder of the test's."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def start(self, *, through_make: bool = False) -> dict[str, str]:
        # No broker answers there: the stack starts its own node, with its data in the folder.
        env = {**os.environ, "PHOTOFERRY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
               "PHOTOFERRY_RECONCILE_EVERY": "5s"}
        command = [sys.executable, "-m", "devtools.stack", "--workdir", str(self.workdir)]
        if through_make:  # `make up` itself, with this interpreter and nothing installed first
            command = ["make", "--no-print-directory", "-o", ".venv/.installed", "up",
                       f"BIN={Path(sys.executable).parent}", f"UP_ARGS=--workdir {self.workdir}"]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True,
                                        # As from a terminal: SIGINT is not ignored (a background job's is).
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        up = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("photoferry is up."):
                    up.set()

        threading.Thread(target=read, daemon=True).start()
        wait_until(lambda: up.is_set() or self.process.poll() is not None, timeout=180,  # type: ignore[union-attr]
                   what="make up's banner", interval=0.5)
        assert up.is_set(), "".join(self.output[-40:])
        exported = (self.workdir / "env").read_text().splitlines()
        return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in exported)

    def stop(self) -> None:
        """Ctrl-C, as a terminal sends it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError("make up did not stop on SIGINT:\n" + "".join(self.output[-40:])) from None
        # make re-raises the SIGINT once its recipe has stopped; the stack itself exits 0.
        assert self.process is None or self.process.returncode in (0, -signal.SIGINT), "".join(self.output[-40:])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path / "stack")
    yield running
    running.stop()


def test_a_restarted_stack_keeps_photos_settings_and_history_and_ships_what_waited(stack: Stack) -> None:
    # `make up` itself, stopped by SIGINT to make alone: make does not pass it on to its recipe.
    env = stack.start(through_make=True)
    operator = {"Authorization": f"Bearer {env['PHOTOFERRY_ADMIN_TOKEN']}"}
    keeper, gateway = env["PHOTOFERRY_STORE_URL"], env["PHOTOFERRY_GATEWAY_URL"]
    device = {"Authorization": f"Bearer {device_token(env['PHOTOFERRY_DEVICE_SECRET'], 'cam-stack')}",
              "Content-Type": "application/json"}
    assert requests.post(f"{keeper}/api/shipping/pause", headers=operator, timeout=10).status_code == 200
    uploads = [photo("cam-stack", jpeg(30_000)) for _ in range(3)]
    ids = []
    for fields in uploads:
        answer = requests.post(f"{gateway}/v1/photos", data=encode(fields, "json"), headers=device, timeout=30)
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["id"])
    stack.stop()  # SIGINT to make's process only

    env = stack.start()
    keeper, gateway = env["PHOTOFERRY_STORE_URL"], env["PHOTOFERRY_GATEWAY_URL"]

    def figures() -> dict:  # type: ignore[type-arg]
        return requests.get(f"{keeper}/api/status", headers=operator, timeout=10).json()  # type: ignore[no-any-return]

    wait_until(lambda: figures()["swept_at"] is not None, timeout=60, what="a first sweep")
    status = figures()
    assert status["control"]["paused"] is True and status["shipping"] == "paused"
    assert status["devices"] >= 1 and status["backlog_objects"] >= 3
    assert requests.get(f"{keeper}/api/history", headers=operator, timeout=10).json(), "the history was lost"
    for photo_id in ids:
        answer = requests.get(f"{gateway}/v1/photos/{photo_id}", headers=device, timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "queued", answer.text
    again = requests.post(f"{gateway}/v1/photos", data=encode(uploads[0], "json"), headers=device, timeout=30)
    assert again.status_code == 200 and again.json()["id"] == ids[0]

    remote = s3_client(env["PHOTOFERRY_S3_ENDPOINT"], access_key=env["AWS_ACCESS_KEY_ID"],
                       secret_key=env["AWS_SECRET_ACCESS_KEY"], region="us-east-1")

    def shipped() -> set[str]:
        listing = remote.list_objects_v2(Bucket=env["PHOTOFERRY_S3_BUCKET"], Prefix=env["PHOTOFERRY_S3_PREFIX"])
        return {item["Key"].rsplit("/", 1)[-1] for item in listing.get("Contents", [])}

    assert requests.post(f"{keeper}/api/shipping/resume", headers=operator, timeout=10).status_code == 200
    wait_until(lambda: set(ids) <= shipped(), timeout=60, what="what waited, shipped", interval=1)
    parked = requests.get(f"{keeper}/api/parked", headers=operator, timeout=10).json()["parked"]
    assert parked == []
    stack.stop()

    env = stack.start()  # the remote stand-in keeps what it was sent
    assert set(ids) <= shipped()

