"""The shipped Grafana dashboard and Prometheus alert rules (packaging/monitoring), read for tests:
their queries, the metric names they use, and the names a live /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "packaging" / "monitoring"
DASHBOARD = MONITORING / "awsomefs-dashboard.json"
ALERTS = MONITORING / "awsomefs-alerts.yml"
ALERT_TESTS = MONITORING / "awsomefs-alerts.test.yml"
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "1h"}
"""What Grafana puts in place of the dashboard's variables, for checking its queries elsewhere."""
_METRIC = re.compile(r"\bawsomefs_[a-z0-9_]+\b")
_HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[str]:
    """Every query of every panel, variables replaced as Grafana would."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(expr)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names_used() -> set[str]:
    """The AwsomeFS metric names the dashboard's and the alerts' queries read."""
    exprs = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def exported_metric_names(scrape: str) -> set[str]:
    """The series names a /metrics page can carry, from its `# TYPE` lines (a family without
    samples yet, such as an error counter nothing has incremented, is exported all the same)."""
    names = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in _HISTOGRAM_SERIES)
    return names


def counter_value(scrape: str, name: str) -> float:
    """The value of counter `name` (with or without its `_total`) on a /metrics page without labels
    on it; AssertionError when the page does not carry it."""
    for line in scrape.splitlines():
        if line.startswith((name + " ", name + "_total ")):
            return float(line.split()[-1])
    raise AssertionError(f"/metrics carries no {name}")
