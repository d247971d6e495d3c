"""The dashboard and the alerts: promtool checks and unit-tests the rules, the PrometheusRule
carries the same ones, and every metric they use is one the running services expose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from devtools.monitoring import ALERTS, RULE, prometheus_rule
from devtools.servers import REPO, ServiceProcess, wait_until
from tests.conftest import start_service, stop_cleanly
from tests.helpers import Site, upload_many

MONITORING = ALERTS.parent
DASHBOARD = MONITORING / "dashboard.json"
# promtool comes with Debian's prometheus package, which `make test` installs.
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_alert_fires_when_it_should_and_not_otherwise() -> None:
    tested = promtool("test", "rules", "alerts.test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_prometheus_rule_is_the_rule_file() -> None:
    assert RULE.read_text() == prometheus_rule(), "run make monitoring"


def alerts() -> list[dict]:  # type: ignore[type-arg]
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_names_an_entry_of_the_runbook() -> None:
    runbook = REPO / "docs" / "runbook.md"
    headings = {_anchor(line.lstrip("#").strip()) for line in runbook.read_text().splitlines()
                if line.startswith("## ")}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/runbook.md#"), rule["alert"]
        assert url.split("#", 1)[1] in headings, f"{rule['alert']}: no runbook entry {url}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def _anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule)."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def used_metrics() -> set[str]:
    expressions = [rule["expr"] for rule in alerts()]
    expressions += [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
                    for target in panel.get("targets", [])]
    return {_family(name) for expr in expressions for name in re.findall(r"\bphotoferry_[a-z_]+", expr)}


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] == "photoferry" and len(graphs) >= 12
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in graphs)
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))


@pytest.fixture(scope="module")
def services(site: Site, logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    started = {name: start_service(name, site.env(), logs) for name in ("store", "gateway", "shipper")}
    yield started
    for service in started.values():
        stop_cleanly(service)


@pytest.mark.servers
def test_every_metric_the_dashboard_and_alerts_use_is_exposed(services: dict[str, ServiceProcess]) -> None:
    upload_many(services["gateway"].url, 1, device="cam-metrics", size=10_000)
    exposed: set[str] = set()

    def scraped() -> bool:
        for service in services.values():
            text = requests.get(f"{service.url}/metrics", timeout=10).text
            for line in text.splitlines():
                name = line.split()[2] if line.startswith("# TYPE") else line.split("{")[0].split(" ")[0]
                if name.startswith("photoferry_"):
                    exposed.add(_family(name))
        return used_metrics() <= exposed

    wait_until(scraped, timeout=30, what="every metric the dashboard and the alerts use")
    assert used_metrics() - exposed == set()
