"""The Grafana dashboard and the Prometheus alerting rules shipped in packaging/monitoring, checked
offline: promtool (from Debian's prometheus package, which scripts/install.sh test unpacks into
.venv/bin) checks the rules and runs their unit tests, and parses every dashboard query. That the
metrics they name are ones the daemon exports is checked against a live /metrics of a cluster
member (tests/cluster/test_cluster.py), where every family is present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import monitoring

REPO = Path(__file__).resolve().parents[2]


def promtool() -> str:
    found = REPO / ".venv" / "bin" / "promtool"
    path = str(found) if found.exists() else shutil.which("promtool")
    assert path, "promtool is missing: scripts/install.sh test puts it in .venv/bin"
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_alert_rules_are_valid_and_fire_on_the_faults_they_name() -> None:
    checked = run_promtool("check", "rules", monitoring.ALERTS.name, cwd=monitoring.MONITORING)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", monitoring.ALERT_TESTS.name, cwd=monitoring.MONITORING)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for rule in monitoring.alert_rules()}
    assert {"AwsomeFSNoLeader", "AwsomeFSNodeFenced", "AwsomeFSNodeExpired", "AwsomeFSChecksumErrors",
            "AwsomeFSDeviceNearlyFull", "AwsomeFSMemberLagging"} <= names
    for rule in monitoring.alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    tests = yaml.safe_load(monitoring.ALERT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert names == fired, f"alerts no unit test makes fire: {sorted(names - fired)}"


def test_dashboard_structure_and_every_query_parses(tmp_path: Path) -> None:
    dash = monitoring.dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["description"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"awsomefs_dashboard:query{i}", "expr": expr}
        for i, expr in enumerate(monitoring.dashboard_queries())]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    parsed = run_promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr


def test_every_metric_the_dashboard_and_alerts_read_is_one_the_daemon_names() -> None:
    """Offline half of the check (the live half: tests/cluster/test_cluster.py, and for [site]
    tests/repl/test_sites_cluster.py): every name appears in the daemon's source, so a renamed
    metric cannot leave a panel silently empty."""
    source = "\n".join(p.read_text() for p in (REPO / "awsomefsd").rglob("*.py"))
    # names made by f-strings, e.g. f"awsomefs_site_{direction}_lag_seconds": a placeholder is any word
    templates = [re.compile(re.sub(r"\\\{[^}]*\\\}", "[a-z0-9_]+", re.escape(t)))
                 for t in re.findall(r'f"(awsomefs_[a-z0-9_{}]*\{[a-z0-9_{}]*)"', source)]
    missing = []
    for name in monitoring.metric_names_used():
        declared = {name, name.removesuffix("_total")} | {name.removesuffix(suffix) for suffix in ("_bucket", "_count", "_sum")}
        if not any(f'"{candidate}"' in source or any(t.fullmatch(candidate) for t in templates)
                   for candidate in declared):
            missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("broken", ["expr", "threshold"])
def test_a_broken_rule_is_caught(tmp_path: Path, broken: str) -> None:
    """The checks above can fail: a query that does not parse, and an alert whose threshold no
    longer fires on its unit test's series."""
    text = monitoring.ALERTS.read_text()
    if broken == "expr":
        text = text.replace("awsomefs_lease_fenced == 1", "awsomefs_lease_fenced == == 1")
    else:
        text = text.replace("< 0.10", "< 0.01")
    (tmp_path / monitoring.ALERTS.name).write_text(text)
    shutil.copy(monitoring.ALERT_TESTS, tmp_path)
    command = ("check", "rules", monitoring.ALERTS.name) if broken == "expr" else ("test", "rules", monitoring.ALERT_TESTS.name)
    assert run_promtool(*command, cwd=tmp_path).returncode != 0
