"""Write the Prometheus operator's PrometheusRule from the plain rule file (make monitoring).

deploy/k3s/components/monitoring/alerts.yaml is the one source of the alerts; the
PrometheusRule in components/prometheus-operator carries the same groups, and a
test keeps the two equal.
"""

from __future__ import annotations

import sys

import yaml

from devtools.servers import REPO

ALERTS = REPO / "deploy" / "k3s" / "components" / "monitoring" / "alerts.yaml"
RULE = REPO / "deploy" / "k3s" / "components" / "prometheus-operator" / "prometheusrule.yaml"
HEADER = "# Generated from ../monitoring/alerts.yaml by `make monitoring`; edit that file, not this one.\n"


def prometheus_rule() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "photoferry", "labels": {"app": "photoferry"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    RULE.write_text(prometheus_rule())
    sys.stdout.write(f"wrote {RULE.relative_to(REPO)}\n")
