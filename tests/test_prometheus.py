"""A real Prometheus scraping a running shardqa.

The Debian `prometheus` binary runs on a loopback port with its own config
and a temporary storage directory (no systemd), scraping every second. The
test drives a bounded amount of traffic and checks that what Prometheus
computes from the scraped histograms — the request count exactly, and
histogram_quantile(0.99, ...) — agrees with what the client measured.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shardqa.monitoring.metrics import LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"
LOCAL_CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus not found; install the Debian package `prometheus` (make system-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class Prometheus:
    """A Prometheus server on 127.0.0.1, stopped on exit."""

    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": list(rule_files),
            "scrape_configs": scrape_configs,
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str, at: float | None = None) -> float:
        result = self.query(promql, at)
        assert len(result) == 1, f"{promql} -> {result}"
        return float(result[0]["value"][1])

    def targets_up(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]

    def scraped_after(self, moment: float, timeout_s: float = 30) -> float:
        """Wait until every target has been scraped (successfully) after `moment`; return that time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = self.targets_up()
            if targets and all(
                t["health"] == "up" and _rfc3339_to_epoch(t["lastScrape"]) > moment for t in targets
            ):
                return time.time()
            time.sleep(0.2)
        raise AssertionError(f"targets not scraped after {moment}: {self.targets_up()}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _rfc3339_to_epoch(stamp: str) -> float:
    from datetime import datetime

    # Prometheus writes nanoseconds; datetime parses up to microseconds.
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")).timestamp()


# --- shardqa without Ray: one process whose /metrics is the whole service -----------

SERVER = r"""
import sys
import uvicorn
from shardqa.preprocessing.store import open_store
from shardqa.services.api import create_api
from shardqa.services.qa_service import QAService
from shardqa.services.reader import Reader
from shardqa.services.service_config import settings_with
from shardqa.services.shard_client import LocalShards
from shardqa.services.shard_worker import ShardWorker

store_dir, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = settings_with({"model": model, "store": store_dir, "backend": "torch", "route_k": 3})
reader = Reader.load(settings=settings, threads=1)
store = open_store(store_dir)
service = QAService.create(settings, LocalShards([ShardWorker(s, reader, store) for s in range(2)]))
uvicorn.run(create_api(service, settings), host="127.0.0.1", port=port, log_level="warning")
"""


@pytest.fixture(scope="module")
def shardqa_http(tmp_path_factory):
    from shardqa.preprocessing.build import build_index

    workdir = tmp_path_factory.mktemp("served")
    store_dir = workdir / "index"
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    port = free_port()
    log = (workdir / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(store_dir), str(TINY), str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (workdir / "server.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "shardqa did not become ready"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def sample_questions(n: int) -> list[str]:
    data = json.loads(SAMPLE.read_text())["data"]
    questions = [qa["question"] for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    return questions[:n]


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bucket_index(seconds: float) -> int:
    """Index of the histogram bucket holding `seconds` (len = the +Inf bucket)."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


def test_prometheus_p99_agrees_with_the_client(shardqa_http, tmp_path):
    host_port = shardqa_http.removeprefix("http://")
    prom = Prometheus(tmp_path, [{"job_name": "shardqa", "static_configs": [{"targets": [host_port]}]}])
    try:
        with httpx.Client(base_url=shardqa_http, timeout=30) as client:
            # Warm up so every series exists before the measured window opens.
            for question in sample_questions(3):
                assert client.post("/v1/answer", json={"question": question}).status_code == 200
            t0 = prom.scraped_after(time.time())

            # Bounded traffic: 120 distinct questions, a third of them asked
            # again (cache hits), so the histogram spans two latency regimes.
            questions = sample_questions(123)[3:]
            plan = questions + questions[::3]
            latencies, cached = [], 0
            for question in plan:
                start = time.perf_counter()
                response = client.post("/v1/answer", json={"question": question})
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
                cached += response.json()["cached"]
        t1 = prom.scraped_after(time.time())

        window = '{job="shardqa",endpoint="/v1/answer"}'

        def delta(metric: str, by: str = "") -> str:
            grouping = f" by ({by})" if by else ""
            return f"(sum{grouping} ({metric}{window} @ {t1:.3f}) - sum{grouping} ({metric}{window} @ {t0:.3f}))"

        # Every request was scraped: counts are exact.
        assert prom.scalar(delta("shardqa_requests_total")) == len(plan)
        assert prom.scalar(delta("shardqa_request_duration_seconds_count")) == len(plan)
        cached_series = f'{{job="shardqa",endpoint="/v1/answer",cached="true"}}'
        hits = prom.query(f"sum(shardqa_requests_total{cached_series} @ {t1:.3f})")
        assert float(hits[0]["value"][1]) >= cached > 0

        estimate = prom.scalar(
            f"histogram_quantile(0.99, {delta('shardqa_request_duration_seconds_bucket', 'le')})", at=t1
        )
        # The client also pays HTTP and loopback time the ingress does not
        # see; remove its mean (client mean minus server mean) before comparing.
        server_mean = prom.scalar(delta("shardqa_request_duration_seconds_sum")) / len(plan)
        overhead = max(0.0, sum(latencies) / len(latencies) - server_mean)
        client_p99 = nearest_rank(latencies, 0.99)
        adjusted = max(0.0, client_p99 - overhead)

        detail = (
            f"prometheus p99 {estimate * 1000:.2f} ms, client p99 {client_p99 * 1000:.2f} ms, "
            f"transport overhead {overhead * 1000:.2f} ms, adjusted {adjusted * 1000:.2f} ms"
        )
        print(detail)
        assert math.isfinite(estimate), detail
        # Within bucket resolution: the same bucket, or a neighbouring one
        # (the rank-99 request may sit just across a bucket boundary).
        assert abs(bucket_index(estimate) - bucket_index(adjusted)) <= 1, detail
    finally:
        prom.close()


def test_local_config_and_rules_load_in_prometheus(tmp_path):
    """The shipped local configuration is accepted by the real server and its
    alert rules evaluate: nothing is being served, so only ShardQANotServing
    is on its way to firing."""
    local = yaml.safe_load(LOCAL_CONFIG.read_text())
    relabel = local["scrape_configs"][0]["metric_relabel_configs"]
    prom = Prometheus(
        tmp_path,
        [{"job_name": "none", "static_configs": [{"targets": []}], "metric_relabel_configs": relabel}],
        rule_files=[str(ROOT / "monitoring" / "alerts" / "shardqa.rules.yaml")],
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            evaluated = [r for g in groups for r in g["rules"] if r.get("lastEvaluation", "").startswith("20")]
            # ShardQANotServing reads the target series, which another group
            # records: it turns pending from the evaluation after theirs.
            not_serving = [r for r in evaluated if r["name"] == "ShardQANotServing" and r["state"] == "pending"]
            if len(evaluated) == sum(len(g["rules"]) for g in groups) and groups and not_serving:
                break
            assert time.monotonic() < deadline, groups
            time.sleep(0.3)
        assert {g["name"] for g in groups} == {"shardqa-targets", "shardqa-recording", "shardqa-alerts"}
        for group in groups:
            for rule in group["rules"]:
                assert rule["health"] == "ok", rule
                if rule["type"] == "alerting":
                    assert rule["state"] == ("pending" if rule["name"] == "ShardQANotServing" else "inactive"), rule
        assert prom.scalar('shardqa:target_latency_seconds{quantile="0.99"}') == 0.05
    finally:
        prom.close()
