"""Alert rules through promtool (Debian's prometheus package): syntax, unit tests, and coverage of each alert."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.observe.metrics import metric_names

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROM_DIR / "forkrl-alerts.yaml"
TESTS = sorted((PROM_DIR / "tests").glob("*.test.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (`make debian`)")
    return path


def run(promtool, *args, cwd=None):
    res = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_rules_and_example_config_are_valid(promtool):
    assert "SUCCESS: 9 rules found" in run(promtool, "check", "rules", str(RULES))
    run(promtool, "check", "config", str(PROM_DIR / "prometheus.yml"))


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(promtool, path):
    assert "SUCCESS" in run(promtool, "test", "rules", path.name, cwd=path.parent)


def test_every_alert_has_a_firing_and_a_quiet_case():
    assert len(TESTS) >= 2
    firing, quiet = set(), set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../forkrl-alerts.yaml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names == firing, f"alerts without a firing test: {names - firing}"
    assert names == quiet, f"alerts without a not-firing test: {names - quiet}"


def test_rules_read_only_exported_series_with_run_in_their_labels():
    known = metric_names()
    for a in alerts():
        used = set(re.findall(r"\bforkrl_[a-z0-9_]+", a["expr"]))
        assert used, a["alert"]
        for name in used:
            assert name in known or re.sub(r"_(bucket|sum|count)$", "", name) in known, (a["alert"], name)
        assert "{{ $labels.run }}" in a["annotations"]["summary"], a["alert"]
        assert a["labels"]["severity"] in {"info", "warning", "critical"}, a["alert"]
