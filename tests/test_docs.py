"""The documentation cannot drift from the code: its runnable commands run, its links lead somewhere,
and what it lists (variables, metrics, alerts) is what the code has.

A shell block fenced as ```sh test is run, as written, against a stack the test
starts (gateway, store keeper, shipper), with the variables ``.stack/env`` gives
after ``make up``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devtools.servers import REPO
from tests.conftest import start_service, stop_cleanly
from tests.helpers import ADMIN_TOKEN, DEVICE_SECRET, Site

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "k3s" / "README.md",
        *sorted((REPO / "deploy" / "k3s" / "components").glob("*/README.md"))]
BLOCK = re.compile(r"^( *)```sh test\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def runnable() -> list[tuple[str, str]]:
    return [(f"{doc.relative_to(REPO)}:{doc.read_text()[:m.start()].count(chr(10)) + 1}", textwrap.dedent(m.group(2)))
            for doc in DOCS for m in BLOCK.finditer(doc.read_text())]


@pytest.fixture(scope="module")
def stack(site: Site, logs: Path) -> Iterator[dict[str, str]]:
    env = site.env(PHOTOFERRY_S3_PREFIX="site-dev/")
    started = {name: start_service(name, env, logs) for name in ("store", "gateway", "shipper")}
    client = {
        **os.environ,
        # As .stack/env has them after make up (devtools/stack.py writes it).
        "PHOTOFERRY_GATEWAY_URL": started["gateway"].url, "PHOTOFERRY_STORE_URL": started["store"].url,
        "PHOTOFERRY_ADMIN_TOKEN": ADMIN_TOKEN, "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET,
        "PHOTOFERRY_S3_ENDPOINT": site.remote.endpoint, "PHOTOFERRY_S3_BUCKET": site.remote_bucket,
        "PHOTOFERRY_S3_PREFIX": "site-dev/", "AWS_ACCESS_KEY_ID": site.remote.access_key,
        "AWS_SECRET_ACCESS_KEY": site.remote.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
        # kubectl from the project's own tools (the kubectl wheel), as after make test.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    yield client
    for service in started.values():
        stop_cleanly(service)


def test_the_docs_have_runnable_commands() -> None:
    places = {where.split(":")[0] for where, _ in runnable()}
    assert {"README.md", "docs/runbook.md", "docs/capacity.md", "deploy/k3s/README.md"} <= places


@pytest.mark.servers
@pytest.mark.parametrize(("where", "script"), runnable(), ids=[where for where, _ in runnable()])
def test_each_runnable_command_in_the_docs_works(stack: dict[str, str], where: str, script: str) -> None:
    # .venv/bin is where make puts the tools; the suite may run from another interpreter's venv.
    script = script.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=stack, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{where}:\n{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def _anchors(path: Path) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_link_in_the_docs_leads_somewhere(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{doc.relative_to(REPO)} links to {target}: no such heading"


def test_every_variable_the_services_read_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    source = "".join(p.read_text() for p in (REPO / "services" / "common").glob("config.py"))
    for variable in sorted(set(re.findall(r'"(PHOTOFERRY_[A-Z0-9_]+)"', source))):
        assert f"`{variable}`" in readme, f"{variable} is read by the services but not in the README"


def test_every_metric_and_alert_is_in_the_monitoring_guide() -> None:
    guide = (REPO / "docs" / "monitoring.md").read_text()
    sources = "".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    for family in sorted(set(re.findall(r'"(photoferry_[a-z_]+)"', sources))):
        if "{service}" not in family:
            assert family in guide, f"the metric {family} is not in docs/monitoring.md"
    rules = yaml.safe_load((REPO / "deploy" / "k3s" / "components" / "monitoring" / "alerts.yaml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert f"`{rule['alert']}`" in guide, f"the alert {rule['alert']} is not in docs/monitoring.md"
