"""Prometheus metrics of the question-answering path.

Every function records into two places:

* this process's ``prometheus_client`` registry, rendered by
  :func:`metrics_response` at ``GET /metrics`` of the ingress. On its own this
  is only one process's view, enough for a single-process server (uvicorn
  without Ray) and for debugging one replica.
* Ray's metrics pipeline (``ray.serve.metrics``), but only inside a Ray Serve
  replica. Each Ray node's metrics agent exports the numbers of every worker
  on that node at its metrics-export port, tagged with ``deployment`` and
  ``replica``; a PodMonitor scrapes that port on every Ray pod, so the numbers
  of all replicas on all nodes reach Prometheus. Ray prefixes the names with
  ``ray_``; the scrape configuration strips that prefix from ``ray_shardqa_*``
  so dashboards and alerts use one set of names whichever way they were
  scraped (see docs/monitoring.md).

A deployment scrapes one of the two paths, never both, or requests would be
counted twice.

Label sets are bounded: stages and cache results are fixed enumerations
(unknown values are programming errors and raise), shards are small integers,
and free-form values (endpoint, error code) are capped per process so a bug
cannot explode the series count.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

STAGES = frozenset({"validate", "cache", "tokenize", "route", "shard_inference", "merge"})
CACHE_RESULTS = frozenset({"hit", "miss", "error"})

#: Latency buckets in seconds, 0.5 ms .. 30 s. The targets (3 ms cached p50,
#: 20 ms p50, 50 ms p99) are exact boundaries so SLO ratios need no
#: interpolation, and the spacing around them is fine enough for
#: histogram_quantile to land within a few milliseconds of the true value.
#: The top reaches answer_timeout_s (30 s), so an overload shows its real
#: p99 instead of flat-lining at the last bucket.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05,
    0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
SHARDS_TOUCHED_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
#: The router's score is a weighted sum of components each normalised to
#: the question's best passage, so the winner's score is at most the sum of
#: the weights (3.65 with the defaults), reached when every signal agrees on
#: it. Fine steps up to there; a few wider ones for custom weights.
ROUTE_SCORE_BUCKETS: tuple[float, ...] = tuple(i / 4 for i in range(1, 17)) + (5.0, 6.0, 8.0)

#: Caps on free-form label values per process; extra values collapse to "other".
MAX_ENDPOINTS = 32
MAX_ERROR_CODES = 64
OTHER = "other"


@dataclass(frozen=True)
class MetricSpec:
    """One metric, described once for both the local registry and Ray."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


REQUESTS = MetricSpec(
    "shardqa_requests_total", "counter", "HTTP requests answered, by endpoint, status code and cache use",
    ("endpoint", "status", "cached"),
)  # fmt: skip
REQUEST_DURATION = MetricSpec(
    "shardqa_request_duration_seconds", "histogram", "End-to-end latency inside the ingress of requests answered with 2xx, or given up by their client (499)",
    ("endpoint", "cached"), LATENCY_BUCKETS,
)  # fmt: skip
STAGE_DURATION = MetricSpec(
    "shardqa_stage_duration_seconds", "histogram", "Latency of one stage of answering a question",
    ("stage",), LATENCY_BUCKETS,
)  # fmt: skip
SHARD_INFERENCE_DURATION = MetricSpec(
    "shardqa_shard_inference_duration_seconds", "histogram", "Reader forward pass of one batch on one shard",
    ("shard",), LATENCY_BUCKETS,
)  # fmt: skip
SHARD_BATCH_SIZE = MetricSpec(
    "shardqa_shard_batch_size", "histogram", "Requests per batched forward pass on one shard",
    ("shard",), BATCH_SIZE_BUCKETS,
)  # fmt: skip
CACHE_REQUESTS = MetricSpec(
    "shardqa_cache_requests_total", "counter", "Answer-cache lookups by result (hit, miss, error)", ("result",)
)  # fmt: skip
# Under Ray a histogram's _sum is rebuilt from bucket midpoints by the
# metrics agent, so means (questions per shard, shards per request) come from
# these exact counters divided by the histograms' _count.
SHARD_QUESTIONS = MetricSpec(
    "shardqa_shard_questions_total", "counter", "Questions read by one shard (the sum of its batch sizes)", ("shard",)
)  # fmt: skip
SHARD_BATCHES_UNDER_LOAD = MetricSpec(
    "shardqa_shard_batches_under_load_total", "counter",
    "Batches one shard read on threads_under_load threads because the service was busy", ("shard",)
)  # fmt: skip
SHARD_CALLS = MetricSpec(
    "shardqa_shard_calls_total", "counter", "Shard calls made by the ingress (the sum of shards read per request)"
)  # fmt: skip
SHARDS_TOUCHED = MetricSpec(
    "shardqa_shards_touched", "histogram", "Shards whose passages an uncached request read", (), SHARDS_TOUCHED_BUCKETS
)  # fmt: skip
SHARD_INFLIGHT = MetricSpec(
    "shardqa_shard_inflight_requests", "gauge", "Requests in flight to one shard", ("shard",)
)  # fmt: skip
ERRORS = MetricSpec("shardqa_errors_total", "counter", "Failed requests by error code", ("code",))
ROUTE_SCORE = MetricSpec(
    "shardqa_route_score", "histogram", "Routing score of the best-routed passage", (), ROUTE_SCORE_BUCKETS
)  # fmt: skip
ROUTES = MetricSpec(
    "shardqa_routes_total", "counter", "Questions routed, by whether the dense question encoder ran (true/false)",
    ("dense",),
)  # fmt: skip
READ_ROUNDS = MetricSpec(
    "shardqa_read_rounds_total", "counter",
    "Uncached questions by sequential reading rounds (2 when the best-routed passage alone was not confident)",
    ("rounds",),
)  # fmt: skip
#: An info metric: value 1 on the series carrying the current labels.
INDEX_INFO = MetricSpec(
    "shardqa_index_info", "gauge", "Index version, model and shard count being served",
    ("index_version", "model", "shards"),
)  # fmt: skip

INDEX_NOT_SERVED = MetricSpec(
    "shardqa_index_not_served", "gauge",
    "1 while the store's current index version is not the one served (refused: another shard count or tokenizer; "
    "or its router fails to load), else 0",
)  # fmt: skip

SPECS: tuple[MetricSpec, ...] = (
    REQUESTS, REQUEST_DURATION, STAGE_DURATION, SHARD_INFERENCE_DURATION, SHARD_BATCH_SIZE, SHARD_QUESTIONS,
    SHARD_BATCHES_UNDER_LOAD, CACHE_REQUESTS, SHARDS_TOUCHED, SHARD_CALLS, SHARD_INFLIGHT, ERRORS, ROUTE_SCORE, ROUTES, READ_ROUNDS, INDEX_INFO,
    INDEX_NOT_SERVED,
)  # fmt: skip


class _LocalMetrics:
    """The process-local prometheus_client registry behind GET /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Process CPU/memory next to the request metrics helps tell a slow
        # model from a starved process when /metrics is scraped directly.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics: dict[str, Counter | Gauge | Histogram] = {}
        for spec in SPECS:
            if spec is INDEX_INFO:
                continue
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=self.registry)
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.help, spec.labels, registry=self.registry)
            else:
                metric = Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=self.registry)
            self.metrics[spec.name] = metric
        # prometheus_client's Info replaces its labels on update, which is
        # exactly the semantics of "the index being served now".
        self.index_info = Info(INDEX_INFO.name.removesuffix("_info"), INDEX_INFO.help, registry=self.registry)

    def record(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        metric = self.metrics[spec.name]
        child = metric.labels(**labels) if spec.labels else metric
        if spec.kind == "counter":
            child.inc(value)
        elif spec.kind == "gauge":
            child.set(value)
        else:
            child.observe(value)


class _RayMetrics:
    """The same metrics through Ray's per-node metrics agent.

    Created only inside a Serve replica: ray.serve.metrics adds the
    deployment/replica tags, which keep per-replica gauges apart (Ray would
    otherwise keep one of several replicas' values on a node).

    Ray's agent forgets a gauge series its worker has not reported for two
    report intervals (so a dead worker's gauges vanish), and a worker reports
    only what was set since its last report. A daemon thread therefore
    re-sets the current gauge values every half interval; otherwise the index
    info (set once) and idle shards' in-flight counts would disappear.
    """

    def __init__(self) -> None:
        from ray.serve import metrics as serve_metrics

        self.metrics: dict[str, object] = {}
        for spec in SPECS:
            if spec.kind == "counter":
                metric = serve_metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
            else:
                # Floats: OpenTelemetry, under Ray's exporter, expects float
                # bucket boundaries.
                boundaries = [float(b) for b in spec.buckets]
                metric = serve_metrics.Histogram(spec.name, spec.help, boundaries=boundaries, tag_keys=spec.labels)
            self.metrics[spec.name] = metric
        self._index_labels: dict[str, str] | None = None
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, dict[str, str]]] = {}
        self._gauges_lock = threading.Lock()
        threading.Thread(
            target=self._keep_gauges_alive, args=(_ray_report_interval_s() / 2,), name="shardqa-gauges", daemon=True
        ).start()

    def record(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        metric = self.metrics[spec.name]
        tags = labels or None
        if spec.kind == "counter":
            metric.inc(value, tags=tags)  # type: ignore[attr-defined]
        elif spec.kind == "gauge":
            with self._gauges_lock:
                self._gauges[(spec.name, tuple(sorted(labels.items())))] = (value, labels)
            metric.set(value, tags=tags)  # type: ignore[attr-defined]
        else:
            metric.observe(value, tags=tags)  # type: ignore[attr-defined]

    def set_index_info(self, labels: dict[str, str]) -> None:
        previous = self._index_labels
        self.record(INDEX_INFO, 1, labels)
        self._index_labels = labels
        if previous is not None and previous != labels:
            # Zero the old series now and stop refreshing it, so it ages out
            # of Ray's agent and `shardqa_index_info == 1` is the current index.
            self.metrics[INDEX_INFO.name].set(0, tags=previous)  # type: ignore[attr-defined]
            with self._gauges_lock:
                self._gauges.pop((INDEX_INFO.name, tuple(sorted(previous.items()))), None)

    def _keep_gauges_alive(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            with self._gauges_lock:
                current = list(self._gauges.items())
            for (name, _), (value, labels) in current:
                self.metrics[name].set(value, tags=labels or None)  # type: ignore[attr-defined]


def _ray_report_interval_s() -> float:
    """How often this worker reports metrics to its node's agent (Ray's floor is 1 s)."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    except Exception:  # an older or newer Ray without this config accessor
        return 10.0


def _in_serve_replica() -> bool:
    # Importing Ray costs seconds; a process that has not imported it is not
    # a Ray worker, so the check stays free for plain processes and tests.
    if "ray" not in sys.modules:
        return False
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # RayServeException outside a replica; any failure means "not in one"
        return False
    return True


_lock = threading.Lock()
_local: _LocalMetrics | None = None
_ray: _RayMetrics | None = None
_ray_checked = False
_inflight: dict[int, int] = {}
_endpoints: set[str] = set()
_error_codes: set[str] = set()


def _local_metrics() -> _LocalMetrics:
    global _local
    if _local is None:
        with _lock:
            if _local is None:
                _local = _LocalMetrics()
    return _local


def _ray_metrics() -> _RayMetrics | None:
    global _ray, _ray_checked
    if not _ray_checked:
        with _lock:
            if not _ray_checked:
                _ray = _RayMetrics() if _in_serve_replica() else None
                _ray_checked = True
    return _ray


def _record(spec: MetricSpec, value: float, **labels: str) -> None:
    _local_metrics().record(spec, value, labels)
    ray_metrics = _ray_metrics()
    if ray_metrics is not None:
        ray_metrics.record(spec, value, labels)


def _bounded(value: str, seen: set[str], cap: int) -> str:
    if value in seen:
        return value
    with _lock:
        if len(seen) < cap:
            seen.add(value)
            return value
    return OTHER


def _shard_label(shard: int) -> str:
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return str(shard)


def _seconds(seconds: float) -> float:
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"a duration must be >= 0 seconds, got {seconds!r}")
    return float(seconds)


# --- the API the services call (docs/contracts.md) ---------------------------------


def record_request(endpoint: str, status: int, seconds: float, cached: bool) -> None:
    """One answered HTTP request. `endpoint` is the route template, not the raw path."""
    endpoint = _bounded(endpoint, _endpoints, MAX_ENDPOINTS)
    cached_label = "true" if cached else "false"
    _record(REQUESTS, 1, endpoint=endpoint, status=str(int(status)), cached=cached_label)
    # Answered requests, and those whose client gave up waiting (499, timed
    # until it left: a service slower than its clients' patience shows in the
    # quantiles). Not 4xx or 5xx: a flood of instant refusals (or fast 503s)
    # would pull the quantiles, and their alerts, down.
    if 200 <= status < 300 or status == 499:
        _record(REQUEST_DURATION, _seconds(seconds), endpoint=endpoint, cached=cached_label)


def record_stage(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    _record(STAGE_DURATION, _seconds(seconds), stage=stage)


def record_shard_inference(shard: int, seconds: float, batch_size: int, under_load: bool = False) -> None:
    """One batched forward pass on a shard replica; ``under_load``: on the
    model's thread count for a busy service."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    label = _shard_label(shard)
    _record(SHARD_INFERENCE_DURATION, _seconds(seconds), shard=label)
    _record(SHARD_BATCH_SIZE, batch_size, shard=label)
    _record(SHARD_QUESTIONS, batch_size, shard=label)
    if under_load:
        _record(SHARD_BATCHES_UNDER_LOAD, 1, shard=label)


def record_cache(result: str) -> None:
    if result not in CACHE_RESULTS:
        raise ValueError(f"unknown cache result {result!r}; expected one of {sorted(CACHE_RESULTS)}")
    _record(CACHE_REQUESTS, 1, result=result)


def record_shards_touched(n: int) -> None:
    if n < 0:
        raise ValueError(f"shards touched must be >= 0, got {n!r}")
    _record(SHARDS_TOUCHED, n)
    _record(SHARD_CALLS, n)


@contextmanager
def shard_inflight(shard: int) -> Iterator[None]:
    """Count a request as in flight to `shard` for the duration of the block."""
    label = _shard_label(shard)
    # The count lives here rather than in the gauge because Ray gauges only
    # offer set(); one counter feeds both sinks the same number.
    with _lock:
        _inflight[shard] = _inflight.get(shard, 0) + 1
        current = _inflight[shard]
    _record(SHARD_INFLIGHT, current, shard=label)
    try:
        yield
    finally:
        with _lock:
            _inflight[shard] -= 1
            current = _inflight[shard]
        _record(SHARD_INFLIGHT, current, shard=label)


def record_error(code: str) -> None:
    """One failed request; `code` is a ShardQAError.code or a fixed internal code."""
    _record(ERRORS, 1, code=_bounded(code, _error_codes, MAX_ERROR_CODES))


def record_route_score(score: float) -> None:
    if score != score:  # NaN would poison _sum
        raise ValueError("route score is NaN")
    _record(ROUTE_SCORE, float(score))


def record_route(dense: bool) -> None:
    """One routed question; `dense` when the question encoder ran (the router
    skips it when the lexical ranking is confident)."""
    _record(ROUTES, 1, dense="true" if dense else "false")


def record_read_rounds(rounds: int) -> None:
    if rounds not in (1, 2):
        raise ValueError(f"read rounds must be 1 or 2, got {rounds!r}")
    _record(READ_ROUNDS, 1, rounds=str(rounds))


def set_index_info(version: str, model: str, shards: int) -> None:
    labels = {"index_version": str(version), "model": str(model), "shards": str(int(shards))}
    _local_metrics().index_info.info(labels)
    ray_metrics = _ray_metrics()
    if ray_metrics is not None:
        ray_metrics.set_index_info(labels)


def set_index_not_served(not_served: bool) -> None:
    _record(INDEX_NOT_SERVED, 1.0 if not_served else 0.0)


def metrics_response() -> tuple[bytes, str]:
    """(body, content type) of this process's metrics for GET /metrics."""
    # generate_latest writes the classic text format; say so explicitly, since
    # strict scrapers (Prometheus 3) refuse a body whose declared version they
    # do not recognise.
    return generate_latest(_local_metrics().registry), CONTENT_TYPE_PLAIN_0_0_4
