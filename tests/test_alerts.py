"""Alert rules: valid for promtool, behaving as their unit tests say, and
aimed at the targets the rest of shardqa uses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shardqa.config import get_settings

ALERTS = Path(__file__).resolve().parent.parent / "monitoring" / "alerts"
RULES = ALERTS / "shardqa.rules.yaml"
RULE_TESTS = ALERTS / "tests" / "shardqa.rules.test.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found; install the Debian package `prometheus` (make system-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def rules() -> dict[str, list[dict]]:
    return {group["name"]: group["rules"] for group in yaml.safe_load(RULES.read_text())["groups"]}


@pytest.mark.prometheus
def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.prometheus
def test_promtool_unit_tests():
    # promtool resolves rule_files relative to the test file's directory.
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_targets_match_settings():
    settings = get_settings()
    targets = {}
    for rule in rules()["shardqa-targets"]:
        labels = rule.get("labels", {})
        targets[(rule["record"], labels.get("quantile"), labels.get("cached"))] = float(
            rule["expr"].removeprefix("vector(").removesuffix(")")
        )
    assert targets[("shardqa:target_latency_seconds", "0.5", "false")] == settings.target_p50_ms / 1000
    assert targets[("shardqa:target_latency_seconds", "0.99", "false")] == settings.target_p99_ms / 1000
    assert targets[("shardqa:target_latency_seconds", "0.5", "true")] == settings.target_cached_p50_ms / 1000


def test_every_required_alert_exists_and_is_unit_tested():
    alerts = {rule["alert"] for rule in rules()["shardqa-alerts"]}
    assert {
        "ShardQALatencyP99AboveTarget",
        "ShardQAErrorRatioHigh",
        "ShardQADeploymentWithoutHealthyReplicas",
        "ShardQANotServing",
        "ShardQAIndexNotServed",
        "ShardQACacheUnavailable",
    } <= alerts
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts <= tested, f"alerts never shown firing in unit tests: {alerts - tested}"
    for rule in rules()["shardqa-alerts"]:
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
