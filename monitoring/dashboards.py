"""The Grafana dashboard of shardqa, built in code and committed as JSON.

Panels are generated so every latency panel gets the same quantile queries
and the same target line; `python -m shardqa.monitoring.dashboards` rewrites
monitoring/dashboards/*.json (the Helm chart ships copies, kept equal by the
tests).

Target lines are the `shardqa:target_latency_seconds` series recorded by the
alert rules, not numbers frozen into the JSON, so the line moves when a
deployment changes its targets in the chart's values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
#: The Helm chart ships its own copy (Helm reads files only inside the chart).
CHART_DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "shardqa" / "files" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE_WINDOW = "$__rate_interval"
#: The single-question endpoint, which the latency targets are about.
ANSWER_ENDPOINT = "/v1/answer"

Panel = dict[str, Any]


#: Every series of shardqa (and Ray Serve's) in a query is narrowed to the
#: chosen release namespaces; "All" also matches series without the label
#: (a local Prometheus).
_SERIES = re.compile(r"\b((?:shardqa[_:]|ray_serve_)[A-Za-z0-9_:]*)(\{([^}]*)\})?")
NAMESPACE_MATCHER = 'namespace=~"$namespace"'


def _in_namespace(expr: str) -> str:
    def narrow(m: re.Match) -> str:
        inner = m.group(3)
        return f"{m.group(1)}{{{NAMESPACE_MATCHER}{',' + inner if inner else ''}}}"

    return _SERIES.sub(narrow, expr)


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": _in_namespace(expr), "legendFormat": legend, "refId": ref, "range": True}


def _quantile(q: float, metric: str, by: str, selector: str = "") -> str:
    by_clause = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({by_clause}) (rate({metric}_bucket{selector}[{RATE_WINDOW}])))"


def _target_line_override(legend_prefix: str = "target") -> dict[str, Any]:
    # Draw the target series as a dashed red threshold line.
    return {
        "matcher": {"id": "byRegexp", "options": f"^{legend_prefix}.*"},
        "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.lineWidth", "value": 2},
            {"id": "custom.fillOpacity", "value": 0},
        ],
    }


def _timeseries(title: str, targets: list[dict], unit: str, description: str = "", overrides=None) -> Panel:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 5, "showPoints": "never"},
            },
            "overrides": overrides or [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]}},
    }


def _stat(title: str, expr: str, unit: str, thresholds: list[dict], description: str = "", legend: str = "") -> Panel:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, legend, "A")],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": thresholds}},
            "overrides": [],
        },
        # With a legend the series name is the point (the index version);
        # Grafana's "auto" shows only the value of a single series.
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "textMode": "name" if legend else "auto"},
    }


def _row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _latency_panel(title: str, cached: str, quantiles: tuple[float, ...], target_quantiles: tuple[str, ...]) -> Panel:
    # One question per request: batch calls and probes would skew the quantiles.
    selector = f'{{endpoint="{ANSWER_ENDPOINT}",cached="{cached}"}}'
    targets = [
        _target(_quantile(q, "shardqa_request_duration_seconds", "", selector), f"p{round(q * 100)}", chr(65 + i))
        for i, q in enumerate(quantiles)
    ]
    for j, tq in enumerate(target_quantiles):
        targets.append(
            _target(
                f'max(shardqa:target_latency_seconds{{quantile="{tq}",cached="{cached}"}})',
                f"target p{round(float(tq) * 100)}",
                chr(65 + len(quantiles) + j),
            )
        )
    return _timeseries(
        title,
        targets,
        "s",
        f"End-to-end latency of {ANSWER_ENDPOINT} measured in the ingress, over all ingress replicas; dashed: the target.",
        [_target_line_override()],
    )


def overview() -> dict[str, Any]:
    panels: list[Panel] = [
        _row("Service"),
        _stat(
            "Requests per second",
            f"sum(rate(shardqa_requests_total[{RATE_WINDOW}]))",
            "reqps",
            [{"color": "blue", "value": None}],
        ),
        _stat(
            # The questions the error-ratio alert judges: answer calls, not probes or /metrics.
            "5xx ratio of answer calls",
            f'sum(rate(shardqa_requests_total{{endpoint=~"/v1/answer.*",status=~"5.."}}[{RATE_WINDOW}]))'
            f' / sum(rate(shardqa_requests_total{{endpoint=~"/v1/answer.*"}}[{RATE_WINDOW}]))',
            "percentunit",
            [{"color": "green", "value": None}, {"color": "red", "value": 0.01}],
        ),
        _stat(
            "Cache hit ratio",
            f'sum(rate(shardqa_cache_requests_total{{result="hit"}}[{RATE_WINDOW}])) / sum(rate(shardqa_cache_requests_total[{RATE_WINDOW}]))',
            "percentunit",
            [{"color": "blue", "value": None}],
        ),
        _stat(
            "Index being served",
            "max by (index_version, model, shards) (shardqa_index_info == 1)",
            "none",
            [{"color": "green", "value": None}],
            "Version and model of the index the replicas answer from.",
            "{{index_version}} · {{model}} · {{shards}} shards",
        ),
        _latency_panel("Latency, uncached (p50 / p95 / p99)", "false", (0.5, 0.95, 0.99), ("0.5", "0.99")),
        _latency_panel("Latency, cached (p50 / p99)", "true", (0.5, 0.99), ("0.5",)),
        _timeseries(
            "Requests per second by endpoint and status",
            [_target(f"sum by (endpoint, status) (rate(shardqa_requests_total[{RATE_WINDOW}]))", "{{endpoint}} {{status}}", "A")],
            "reqps",
        ),
        _timeseries(
            "Errors per second by code",
            [_target(f"sum by (code) (rate(shardqa_errors_total[{RATE_WINDOW}]))", "{{code}}", "A")],
            "reqps",
            "User errors (4xx) and failures (5xx) by their error code.",
        ),
        _timeseries(
            "Answer cache",
            [
                _target(f"sum by (result) (rate(shardqa_cache_requests_total[{RATE_WINDOW}]))", "{{result}}", "A"),
            ],
            "ops",
            "Lookups per second by result; errors mean the cache is unreachable or slower than its timeout.",
        ),
        _row("Stages"),
        _timeseries(
            "Stage latency p50",
            [_target(_quantile(0.5, "shardqa_stage_duration_seconds", "stage"), "{{stage}}", "A")],
            "s",
        ),
        _timeseries(
            "Stage latency p99",
            [
                _target(_quantile(0.99, "shardqa_stage_duration_seconds", "stage"), "{{stage}}", "A"),
                _target('max(shardqa:target_latency_seconds{quantile="0.99",cached="false"})', "target p99 (end-to-end)", "B"),
            ],
            "s",
            "Each stage against the end-to-end p99 target it has to fit under.",
            [_target_line_override()],
        ),
        _row("Shards"),
        _timeseries(
            "In-flight requests per shard",
            [_target("sum by (shard) (shardqa_shard_inflight_requests)", "shard {{shard}}", "A")],
            "short",
            "Summed over ingress replicas; a shard that keeps more in flight than the others is the bottleneck.",
        ),
        _timeseries(
            "Questions per second per shard",
            [_target(f"sum by (shard) (rate(shardqa_shard_questions_total[{RATE_WINDOW}]))", "shard {{shard}}", "A")],
            "reqps",
        ),
        _timeseries(
            "Shard inference latency p99",
            [
                _target(_quantile(0.99, "shardqa_shard_inference_duration_seconds", "shard"), "shard {{shard}}", "A"),
                _target('max(shardqa:target_latency_seconds{quantile="0.99",cached="false"})', "target p99 (end-to-end)", "B"),
            ],
            "s",
            "One batched forward pass per shard.",
            [_target_line_override()],
        ),
        _timeseries(
            "Batch size per shard (mean and p95)",
            [
                _target(
                    f"sum by (shard) (rate(shardqa_shard_questions_total[{RATE_WINDOW}])) "
                    f"/ sum by (shard) (rate(shardqa_shard_batch_size_count[{RATE_WINDOW}]))",
                    "mean shard {{shard}}",
                    "A",
                ),
                _target(_quantile(0.95, "shardqa_shard_batch_size", "shard"), "p95 shard {{shard}}", "B"),
            ],
            "short",
        ),
        _timeseries(
            "Shard batches read on fewer threads (service busy)",
            [
                _target(
                    # The counter appears with its first increment: until then
                    # the share is 0, not "no data".
                    f"(sum by (shard) (rate(shardqa_shard_batches_under_load_total[{RATE_WINDOW}])) "
                    f"or 0 * sum by (shard) (rate(shardqa_shard_batch_size_count[{RATE_WINDOW}]))) "
                    f"/ sum by (shard) (rate(shardqa_shard_batch_size_count[{RATE_WINDOW}]))",
                    "shard {{shard}}",
                    "A",
                ),
            ],
            "percentunit",
            "Where a shard's model copy has more threads than threads_under_load (CPU replicas with num_cpus >= 2 by "
            "default), it reads on all of them while its question is the only one in flight, and on threads_under_load "
            "when the ingress has others, reads one question on several shards at once, or the shard batches several. "
            "Near 100% at steady load, low when questions arrive one at a time; always 0 where the model has one "
            "thread count.",
        ),
        _timeseries(
            "Shards read per request",
            [
                _target(
                    f"sum(rate(shardqa_shard_calls_total[{RATE_WINDOW}])) / sum(rate(shardqa_shards_touched_count[{RATE_WINDOW}]))",
                    "mean",
                    "A",
                ),
                _target(_quantile(0.95, "shardqa_shards_touched", ""), "p95", "B"),
            ],
            "short",
        ),
        _timeseries(
            "Routing score of the best-routed passage",
            [
                _target(_quantile(0.5, "shardqa_route_score", ""), "p50", "A"),
                _target(_quantile(0.05, "shardqa_route_score", ""), "p5", "B"),
            ],
            "short",
            "Each routing signal is normalised to the question's best passage, so the winner scores at most the sum of "
            "the router's weights (3.65 by default) when all signals agree on it. A falling p5 means more questions "
            "on which the signals disagree: vaguer questions, or questions the corpus does not cover.",
        ),
        _timeseries(
            "Questions routed with the dense encoder",
            [
                _target(
                    f'sum(rate(shardqa_routes_total{{dense="true"}}[{RATE_WINDOW}])) / sum(rate(shardqa_routes_total[{RATE_WINDOW}]))',
                    "share",
                    "A",
                ),
            ],
            "percentunit",
            "The router skips the question encoder when the lexical ranking is confident (about 60% of SQuAD "
            "questions); a rising share means flatter lexical matches and a slower route stage.",
        ),
        _timeseries(
            "Questions answered from the best passage alone",
            [
                _target(
                    f'sum(rate(shardqa_read_rounds_total{{rounds="1"}}[{RATE_WINDOW}])) / sum(rate(shardqa_read_rounds_total[{RATE_WINDOW}]))',
                    "share",
                    "A",
                ),
            ],
            "percentunit",
            "Uncached questions read in one round: the best-routed passage was confident (read_first_stop_logit) "
            "or was the only one worth reading. A falling share means more questions wait for a second round.",
        ),
        _timeseries(
            "Healthy Serve replicas per deployment",
            [_target('sum by (application, deployment) (ray_serve_deployment_replica_healthy{application="shardqa"})', "{{deployment}}", "A")],
            "short",
            "From the Ray Serve controller; a shard or ingress deployment at zero fires ShardQADeploymentWithoutHealthyReplicas.",
        ),
    ]
    _layout(panels)
    return {
        "uid": "shardqa-overview",
        "title": "shardqa",
        "description": "Latency against targets, traffic, errors, cache and per-shard load of shardqa.",
        "tags": ["shardqa"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    # One dashboard for every release a Prometheus scrapes:
                    # pick the release's namespace, or all of them.
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(shardqa_index_info, namespace)", "refId": "namespaces"},
                    "definition": "label_values(shardqa_index_info, namespace)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "hide": 0,
                    "refresh": 2,
                    "sort": 1,
                    "regex": "",
                },
            ]
        },
        "panels": panels,
    }


def _layout(panels: list[Panel]) -> None:
    """Give each panel an id and a grid position: stats four to a line,
    graphs two to a line, rows full width."""
    x = y = 0
    line_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
        if panel["type"] == "row":
            width, height = 24, 1
        elif panel["type"] == "stat":
            width, height = 6, 4
        else:
            width, height = 12, 8
        if x + width > 24 or panel["type"] == "row":
            if x:
                y += line_height
            x, line_height = 0, 0
        panel["gridPos"] = {"x": x, "y": y, "w": width, "h": height}
        x += width
        line_height = max(line_height, height)
        if panel["type"] == "row":
            x, y, line_height = 0, y + height, 0


DASHBOARDS = {"shardqa-overview.json": overview}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    for folder in (DASHBOARD_DIR, CHART_DASHBOARD_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        for name in DASHBOARDS:
            (folder / name).write_text(render(name))


if __name__ == "__main__":
    main()
