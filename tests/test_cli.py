"""The operator command line, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

from services.common.tokens import token_matches


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_token_prints_the_devices_token() -> None:
    result = run_cli("token", "cam-042", env={**os.environ, "PHOTOFERRY_DEVICE_SECRET": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert token_matches("s3cret", "cam-042", result.stdout.strip())


def test_token_needs_the_secret_and_a_valid_device_id() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PHOTOFERRY_DEVICE_SECRET"}
    missing = run_cli("token", "cam-042", env=env)
    assert missing.returncode == 2 and "PHOTOFERRY_DEVICE_SECRET" in missing.stderr
    bad = run_cli("token", "cam/042", env={**env, "PHOTOFERRY_DEVICE_SECRET": "s3cret"})
    assert bad.returncode == 2 and "device_id" in bad.stderr
