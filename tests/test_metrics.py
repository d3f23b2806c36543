"""The metrics API records what it is told, with Prometheus names and bounded labels.

The registry is process-global (like the server's), so each test reads the
exposition before and after and asserts on the difference.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardqa.config import get_settings
from shardqa.monitoring import metrics


def scrape() -> dict[tuple[str, frozenset], float]:
    """Every sample of the /metrics body, keyed by (sample name, labels)."""
    body, content_type = metrics.metrics_response()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def families() -> dict[str, str]:
    body, _ = metrics.metrics_response()
    return {family.name: family.type for family in text_string_to_metric_families(body.decode())}


def delta(before, after, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_names_follow_prometheus_conventions():
    metrics.set_index_info("v0", "minilm-squad", 1)  # the info series exists once set
    types = families()
    for spec in metrics.SPECS:
        # The classic text parser names counter families without _total.
        family = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
        assert family in types, spec.name
        assert spec.name.startswith("shardqa_")
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if "duration" in spec.name:
            assert spec.name.endswith("_seconds") and spec.kind == "histogram"
    assert types["shardqa_requests"] == "counter"
    assert types["shardqa_request_duration_seconds"] == "histogram"
    assert types["shardqa_shard_inflight_requests"] == "gauge"
    assert types["shardqa_index_info"] == "gauge"


def test_latency_buckets_resolve_millisecond_targets():
    buckets = metrics.LATENCY_BUCKETS
    assert buckets == tuple(sorted(buckets))
    # The top bucket reaches the default answer deadline, so an overload shows its real p99.
    assert buckets[0] == 0.0005 and buckets[-1] == type(get_settings()).model_fields["answer_timeout_s"].default == 30.0
    settings = get_settings()
    for target_ms in (settings.target_p50_ms, settings.target_p99_ms, settings.target_cached_p50_ms):
        assert target_ms / 1000 in buckets, f"target {target_ms} ms is not a bucket boundary"
    # Below the p99 target no bucket is wider than 5 ms, so an estimated
    # quantile is never more than 5 ms from the truth there.
    below = [b for b in buckets if b <= settings.target_p99_ms / 1000]
    assert max(b - a for a, b in zip(below, below[1:])) <= 0.005 + 1e-12


def test_record_request_counts_and_observes_latency():
    before = scrape()
    metrics.record_request("/v1/answer", 200, 0.0042, cached=False)
    metrics.record_request("/v1/answer", 200, 0.0008, cached=True)
    metrics.record_request("/v1/answer", 422, 0.0001, cached=False)
    after = scrape()
    assert delta(before, after, "shardqa_requests_total", endpoint="/v1/answer", status="200", cached="false") == 1
    assert delta(before, after, "shardqa_requests_total", endpoint="/v1/answer", status="200", cached="true") == 1
    assert delta(before, after, "shardqa_requests_total", endpoint="/v1/answer", status="422", cached="false") == 1
    uncached = {"endpoint": "/v1/answer", "cached": "false"}
    # Only answered (2xx) requests are timed: an instant 422 would pull the quantiles down.
    assert delta(before, after, "shardqa_request_duration_seconds_count", **uncached) == 1
    assert delta(before, after, "shardqa_request_duration_seconds_sum", **uncached) == pytest.approx(0.0042)
    # 4.2 ms falls in (4 ms, 5 ms].
    assert delta(before, after, "shardqa_request_duration_seconds_bucket", le="0.004", **uncached) == 0
    assert delta(before, after, "shardqa_request_duration_seconds_bucket", le="0.005", **uncached) == 1
    assert delta(before, after, "shardqa_request_duration_seconds_bucket", le="+Inf", **uncached) == 1
    cached = {"endpoint": "/v1/answer", "cached": "true"}
    assert delta(before, after, "shardqa_request_duration_seconds_bucket", le="0.0005", **cached) == 0
    assert delta(before, after, "shardqa_request_duration_seconds_bucket", le="0.001", **cached) == 1


@pytest.mark.parametrize("stage", sorted(metrics.STAGES))
def test_record_stage(stage):
    before = scrape()
    metrics.record_stage(stage, 0.0125)
    after = scrape()
    assert delta(before, after, "shardqa_stage_duration_seconds_count", stage=stage) == 1
    assert delta(before, after, "shardqa_stage_duration_seconds_bucket", stage=stage, le="0.01") == 0
    assert delta(before, after, "shardqa_stage_duration_seconds_bucket", stage=stage, le="0.0125") == 1


def test_unknown_stage_and_cache_result_are_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        metrics.record_stage("tokenise_typo", 0.001)
    with pytest.raises(ValueError, match="unknown cache result"):
        metrics.record_cache("maybe")
    with pytest.raises(ValueError):
        metrics.record_stage("route", -1.0)
    with pytest.raises(ValueError):
        metrics.record_stage("route", math.nan)
    with pytest.raises(ValueError):
        metrics.record_shard_inference(-1, 0.01, 1)
    with pytest.raises(ValueError):
        metrics.record_shard_inference(0, 0.01, 0)
    with pytest.raises(ValueError):
        metrics.record_route_score(math.nan)


def test_shard_inference_records_latency_and_batch_size():
    before = scrape()
    metrics.record_shard_inference(3, 0.009, batch_size=5)
    metrics.record_shard_inference(3, 0.011, batch_size=16, under_load=True)
    after = scrape()
    assert delta(before, after, "shardqa_shard_batches_under_load_total", shard="3") == 1
    assert delta(before, after, "shardqa_shard_inference_duration_seconds_count", shard="3") == 2
    assert delta(before, after, "shardqa_shard_inference_duration_seconds_sum", shard="3") == pytest.approx(0.02)
    assert delta(before, after, "shardqa_shard_batch_size_count", shard="3") == 2
    assert delta(before, after, "shardqa_shard_batch_size_sum", shard="3") == 21
    assert delta(before, after, "shardqa_shard_questions_total", shard="3") == 21
    assert delta(before, after, "shardqa_shard_batch_size_bucket", shard="3", le="4.0") == 0
    assert delta(before, after, "shardqa_shard_batch_size_bucket", shard="3", le="6.0") == 1
    assert delta(before, after, "shardqa_shard_batch_size_bucket", shard="3", le="16.0") == 2


def test_cache_results_count_separately():
    before = scrape()
    for result in ("hit", "hit", "miss", "error"):
        metrics.record_cache(result)
    after = scrape()
    assert delta(before, after, "shardqa_cache_requests_total", result="hit") == 2
    assert delta(before, after, "shardqa_cache_requests_total", result="miss") == 1
    assert delta(before, after, "shardqa_cache_requests_total", result="error") == 1


def test_shards_touched_and_route_score():
    before = scrape()
    metrics.record_shards_touched(3)
    metrics.record_route_score(2.1)
    after = scrape()
    assert delta(before, after, "shardqa_shards_touched_count") == 1
    assert delta(before, after, "shardqa_shard_calls_total") == 3
    assert delta(before, after, "shardqa_shards_touched_bucket", le="2.0") == 0
    assert delta(before, after, "shardqa_shards_touched_bucket", le="3.0") == 1
    assert delta(before, after, "shardqa_route_score_sum") == pytest.approx(2.1)
    # Quarter steps up to the sum of the router's default weights.
    assert delta(before, after, "shardqa_route_score_bucket", le="2.0") == 0
    assert delta(before, after, "shardqa_route_score_bucket", le="2.25") == 1


def test_routes_count_whether_the_encoder_ran():
    before = scrape()
    metrics.record_route(True)
    metrics.record_route(False)
    metrics.record_route(False)
    after = scrape()
    assert delta(before, after, "shardqa_routes_total", dense="true") == 1
    assert delta(before, after, "shardqa_routes_total", dense="false") == 2


def test_shard_inflight_tracks_nesting_and_exceptions():
    def inflight(shard: int) -> float:
        return scrape().get(("shardqa_shard_inflight_requests", frozenset({("shard", str(shard))})), 0.0)

    with metrics.shard_inflight(7):
        assert inflight(7) == 1
        with metrics.shard_inflight(7):
            assert inflight(7) == 2
        assert inflight(7) == 1
    assert inflight(7) == 0
    with pytest.raises(RuntimeError):
        with metrics.shard_inflight(7):
            assert inflight(7) == 1
            raise RuntimeError("shard failed")
    assert inflight(7) == 0


def test_errors_by_code_and_label_cap():
    before = scrape()
    metrics.record_error("invalid_question")
    after = scrape()
    assert delta(before, after, "shardqa_errors_total", code="invalid_question") == 1

    # A flood of distinct codes (a bug passing messages as codes) collapses
    # into "other" instead of creating unbounded series.
    for i in range(metrics.MAX_ERROR_CODES + 10):
        metrics.record_error(f"bogus_{i}")
    codes = {dict(labels)["code"] for name, labels in scrape() if name == "shardqa_errors_total"}
    assert len(codes) <= metrics.MAX_ERROR_CODES + 1
    assert metrics.OTHER in codes


def test_endpoint_label_is_capped():
    for i in range(metrics.MAX_ENDPOINTS + 5):
        metrics.record_request(f"/generated/{i}", 404, 0.001, cached=False)
    endpoints = {dict(labels)["endpoint"] for name, labels in scrape() if name == "shardqa_requests_total"}
    assert len(endpoints) <= metrics.MAX_ENDPOINTS + 1
    assert metrics.OTHER in endpoints


def test_index_info_shows_only_the_current_index():
    metrics.set_index_info("v1", "minilm-squad", 4)
    metrics.set_index_info("v2", "minilm-squad", 8)
    info = {labels: value for (name, labels), value in scrape().items() if name == "shardqa_index_info"}
    assert info == {frozenset({("index_version", "v2"), ("model", "minilm-squad"), ("shards", "8")}): 1.0}


def test_a_plain_process_does_not_use_ray():
    metrics.record_cache("miss")
    assert metrics._ray_metrics() is None


def test_a_client_that_hangs_up_is_counted_as_499_not_as_a_5xx():
    import asyncio

    from shardqa.services.api import RequestGate

    async def never_answers(scope, receive, send):
        await asyncio.sleep(10)

    async def gone():
        return {"type": "http.disconnect"}

    async def whole_body():
        return {"type": "http.request", "body": b"{}"}

    async def sent(message):
        raise AssertionError("nothing is sent to a client that left")

    def scope(path):
        return {"type": "http", "method": "POST", "path": path, "root_path": "",
                "headers": [(b"content-type", b"application/json")]}

    async def scenario():
        gate = RequestGate(never_answers, max_body_bytes=1000)
        await gate(scope("/v1/answer"), gone, sent)  # hung up while its body was read
        task = asyncio.create_task(gate(scope("/v1/answer"), whole_body, sent))
        await asyncio.sleep(0.05)
        task.cancel()  # what Serve does when the client goes away mid-answer
        with pytest.raises(asyncio.CancelledError):
            await task

    before = scrape()
    asyncio.run(scenario())
    after = scrape()
    assert delta(before, after, "shardqa_requests_total", endpoint="/v1/answer", status="499", cached="false") == 2
    assert delta(before, after, "shardqa_requests_total", endpoint="/v1/answer", status="500", cached="false") == 0
    # Timed until the client left: a service slower than its clients shows in the quantiles.
    assert delta(before, after, "shardqa_request_duration_seconds_count", endpoint="/v1/answer", cached="false") == 2
