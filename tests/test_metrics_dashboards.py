"""The Grafana dashboard: generated file up to date, valid structure, and
every query aimed at metrics that shardqa or its rules actually produce."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from shardqa.monitoring import dashboards, metrics

RULES = dashboards.DASHBOARD_DIR.parent / "alerts" / "shardqa.rules.yaml"


def all_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(dashboards.DASHBOARD_DIR.glob("*.json"))}


def exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_committed_json_is_what_the_generator_builds():
    assert set(all_dashboards()) == set(dashboards.DASHBOARDS)
    for name in dashboards.DASHBOARDS:
        committed = (dashboards.DASHBOARD_DIR / name).read_text()
        assert committed == dashboards.render(name), f"{name} is stale: run python -m shardqa.monitoring.dashboards"
        chart_copy = (dashboards.CHART_DASHBOARD_DIR / name).read_text()
        assert chart_copy == committed, f"the Helm chart's {name} is stale: run python -m shardqa.monitoring.dashboards"


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_dashboard_structure(name):
    dashboard = all_dashboards()[name]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        # The data source is the variable, never a uid of one Grafana.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    # Panels must not overlap on the grid.
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {panel['id']} overlaps another"
                cells.add((x, y))


def known_series() -> set[str]:
    names = set()
    for spec in metrics.SPECS:
        if spec.kind == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    # Exported by the Ray Serve controller itself.
    names.add("ray_serve_deployment_replica_healthy")
    return names


PROMQL_WORDS = {"sum", "by", "rate", "max", "histogram_quantile", "le", "or"}


def test_queries_use_only_existing_series():
    known = known_series()
    for name, dashboard in all_dashboards().items():
        for expr in exprs(dashboard):
            for ident in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=[{\[])", expr):
                assert ident in known, f"{name}: unknown series {ident} in {expr}"
            # Label values aside, every metric the expression names is known.
            bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"', "", expr)
            for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
                assert ident in known or ident in PROMQL_WORDS or ident in {
                    "application", "deployment", "endpoint", "status", "code", "result", "stage", "shard",
                    "index_version", "model", "shards",
                }, f"{name}: unexpected identifier {ident} in {expr}"


def test_latency_panels_draw_the_target_line():
    dashboard = all_dashboards()["shardqa-overview.json"]
    latency = [p for p in dashboard["panels"] if p["title"].startswith("Latency")]
    assert len(latency) == 2
    for panel in latency:
        legends = [t["legendFormat"] for t in panel["targets"]]
        assert any(legend.startswith("target") for legend in legends)
        assert any("shardqa:target_latency_seconds" in t["expr"] for t in panel["targets"])
        override = panel["fieldConfig"]["overrides"][0]
        assert override["matcher"]["options"] == "^target.*"
        assert {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}} in override["properties"]
    uncached = next(p for p in latency if "uncached" in p["title"])
    assert [t["legendFormat"] for t in uncached["targets"]][:3] == ["p50", "p95", "p99"]


def test_every_series_is_narrowed_to_the_chosen_namespaces():
    """One Prometheus may scrape several releases: the dashboard shows the
    namespaces picked in its variable ("All" also matches a local scrape
    without the label)."""
    dashboard = all_dashboards()["shardqa-overview.json"]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "namespace")
    assert variable["includeAll"] and variable["allValue"] == ".*" and variable["multi"]
    for expr in exprs(dashboard):
        for series, selector in re.findall(r"\b((?:shardqa[_:]|ray_serve_)[A-Za-z0-9_:]*)(\{[^}]*\})?", expr):
            assert selector.startswith('{namespace=~"$namespace"'), f"{series} in {expr}"
