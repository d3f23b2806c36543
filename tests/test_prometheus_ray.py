"""Metrics of every Ray Serve replica reach Prometheus.

A Serve deployment with two replicas records through shardqa.monitoring.metrics;
Prometheus scrapes Ray's metrics-export port with the relabelling the chart's
PodMonitor and the local config use. The scraped numbers must add up over
both replicas to exactly the requests sent, under shardqa's metric names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shardqa.monitoring.metrics import SPECS
from test_prometheus import Prometheus, free_port, prometheus_binary

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
CHART_PODMONITOR = ROOT / "deploy" / "helm" / "shardqa" / "templates" / "podmonitor.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.prometheus, pytest.mark.slow]

APP = r"""
import sys, time
import ray
from ray import serve

metrics_port, http_port = int(sys.argv[1]), int(sys.argv[2])
# A busy machine can time the raylet out during startup; a second try
# usually finds the imports warm.
for attempt in range(3):
    try:
        ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port)
        break
    except Exception as exc:
        if "timed out during startup" not in str(exc) or attempt == 2:
            raise
        ray.shutdown()
serve.start(http_options={"host": "127.0.0.1", "port": http_port})


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=2)
class Recorder:
    def __init__(self):
        from shardqa.monitoring import metrics

        self.metrics = metrics
        metrics.set_index_info("v-test", "tiny", 2)
        metrics.set_index_not_served(False)

    async def __call__(self, request):
        import asyncio

        start = time.perf_counter()
        with self.metrics.shard_inflight(0):
            await asyncio.sleep(0.004)
        self.metrics.record_shard_inference(0, 0.003, 2, under_load=True)
        # One of every other kind, so every shardqa metric crosses Ray's exporter.
        self.metrics.record_stage("route", 0.001)
        self.metrics.record_cache("miss")
        self.metrics.record_shards_touched(2)
        self.metrics.record_route_score(7.5)
        self.metrics.record_route(dense=False)
        self.metrics.record_read_rounds(1)
        self.metrics.record_error("invalid_question")
        self.metrics.record_request("/v1/answer", 200, time.perf_counter() - start, cached=False)
        return "ok"


serve.run(Recorder.bind(), name="shardqa", route_prefix="/")
print("READY", flush=True)
while True:
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def serve_app(tmp_path_factory):
    prometheus_binary()  # skip (or fail in CI) before starting Ray for nothing
    workdir = tmp_path_factory.mktemp("ray-app")
    metrics_port, http_port = free_port(), free_port()
    log_path = workdir / "app.log"
    log = log_path.open("w")
    # Flush replica metrics to the node's agent often, so the test need not
    # wait out Ray's default 10 s report interval.
    # A busy machine can need more than Ray's default wait for its raylet.
    env = {
        **os.environ,
        "RAY_metrics_report_interval_ms": "500",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_raylet_start_wait_time_s": "300",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", APP, str(metrics_port), str(http_port)], stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while "READY" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "Serve did not start: " + log_path.read_text()[-2000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{http_port}", metrics_port
    finally:
        # The app's session holds Ray's raylet and workers: end the whole group.
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()


def test_all_replicas_reach_prometheus_under_shardqa_names(serve_app, tmp_path):
    url, metrics_port = serve_app
    relabel = yaml.safe_load(LOCAL_CONFIG.read_text())["scrape_configs"][0]["metric_relabel_configs"]
    # The chart's PodMonitor carries the same rewrite.
    chart = CHART_PODMONITOR.read_text()
    assert "regex: ray_(shardqa_.*)" in chart and "replacement: $1" in chart
    prom = Prometheus(
        tmp_path,
        [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}], "metric_relabel_configs": relabel}],
    )
    try:
        sent = 60
        # Concurrent requests spread over both replicas (each takes at most two at a time).
        with httpx.Client(base_url=url, timeout=30) as client:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                statuses = list(pool.map(lambda _: client.get("/").status_code, range(sent)))
        assert statuses == [200] * sent

        deadline = time.monotonic() + 120
        total = 0.0
        while time.monotonic() < deadline:
            result = prom.query('sum(shardqa_requests_total{endpoint="/v1/answer"})')
            total = float(result[0]["value"][1]) if result else 0.0
            if total >= sent:
                break
            time.sleep(1)
        assert total == sent, f"Prometheus saw {total} of {sent} requests"

        # Both replicas' numbers arrived, told apart by Serve's replica tag.
        per_replica = prom.query('sum by (replica) (shardqa_requests_total{endpoint="/v1/answer"})')
        assert len(per_replica) == 2, per_replica
        assert all(float(r["value"][1]) > 0 for r in per_replica)
        assert {r["metric"].get("replica", "") != "" for r in per_replica} == {True}

        # Histograms keep shardqa's buckets; the quantile lands where the work is (>= 4 ms sleep).
        # (No upper bound: how slow a shared machine is says nothing about the metrics.)
        p50 = prom.scalar('histogram_quantile(0.5, sum by (le) (shardqa_request_duration_seconds_bucket{endpoint="/v1/answer"}))')
        mean = prom.scalar('sum(shardqa_request_duration_seconds_sum{endpoint="/v1/answer"}) / '
                           'sum(shardqa_request_duration_seconds_count{endpoint="/v1/answer"})')
        assert p50 >= 0.004 and mean >= 0.004, (p50, mean)
        names = [n for n in httpx.get(f"{prom.url}/api/v1/label/__name__/values", timeout=5).json()["data"] if "shardqa" in n]
        for spec in SPECS:
            suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
            for suffix in suffixes:
                assert spec.name + suffix in names, f"{spec.name + suffix} missing; scraped: {names}"
        assert prom.scalar("sum(shardqa_shard_batch_size_count)") == sent
        assert prom.scalar("sum(shardqa_shard_inference_duration_seconds_count)") == sent
        # Means come from exact counters: Ray rebuilds a histogram's _sum from
        # bucket midpoints (2 questions per batch, 2 shards per request here).
        assert prom.scalar("sum(shardqa_shard_questions_total)") == 2 * sent
        assert prom.scalar("sum(shardqa_shard_batches_under_load_total)") == sent
        assert prom.scalar("sum(shardqa_shard_calls_total)") == 2 * sent
        # Per-replica gauges stay apart; after the traffic nothing is in flight.
        assert prom.scalar("sum(shardqa_shard_inflight_requests)") == 0
        info = prom.query("shardqa_index_info == 1")
        assert {r["metric"]["index_version"] for r in info} == {"v-test"}
        # Nothing under Ray's prefix is left for shardqa's metrics.
        assert prom.query('count({__name__=~"ray_shardqa_.*"})') == []
    finally:
        prom.close()
