"""The service on a real embedded Ray Serve, over real HTTP, with a real
redis-server as the answer cache: answers, a shard replica killed during a
request stream, Redis stopped during a stream, and a re-index while serving.

One Ray and one deployment serve the whole module (starting Ray costs many
seconds on a small machine): 2 shards x 2 replicas, the tiny model.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from test_cache_redis import RedisServer

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"
SHARDS = 2


def sample_questions() -> list[str]:
    data = json.loads(SAMPLE.read_text())
    return [qa["question"] for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]


QUESTIONS = sample_questions()


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    from shardqa.preprocessing.build import build_index

    d = tmp_path_factory.mktemp("index")
    build_index(SAMPLE, str(d), SHARDS, str(TINY))
    return d


@pytest.fixture(scope="module")
def service(store_dir, redis_server):
    from shardqa.services.app import service_config_from_args
    from shardqa.services.runtime import deploy, wait_ready
    from test_cache_redis import free_port

    config = service_config_from_args(
        {
            "store": str(store_dir),
            "model": str(TINY),
            "backend": "torch",
            "replicas_per_shard": 2,
            "num_cpus_per_replica": 0.5,
            "cache_url": redis_server.url,
            # A stopped Redis refuses at once; the deadline is for a slow one,
            # and a shared CI machine under Ray start-up can be slow enough to
            # miss 0.2 s and turn the cache off for a second mid-test.
            "cache_timeout_s": 1.0,
            "index_refresh_s": 0.5,
        }
    )
    running = deploy(config, "127.0.0.1", free_port(), quiet=True)
    try:
        wait_ready(running.url, timeout_s=600)
        yield running.url
    finally:
        running.shutdown()


@pytest.fixture(scope="module")
def store(store_dir):
    from shardqa.preprocessing.store import open_store

    return open_store(str(store_dir))


def ask(client: httpx.Client, url: str, question: str, top_k: int = 1) -> dict:
    r = client.post(f"{url}/v1/answer", json={"question": question, "top_k": top_k}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


_passage_ids: dict[tuple[int, str], set[str]] = {}


def check_answers_belong_to_version(store, body: dict):
    """Every answer comes from the index version the response names: its
    document is in that version (document_text raises otherwise), holds the
    answer at its offsets, and its passage is in that version's shard."""
    version = body["index_version"]
    for a in body["answers"]:
        document = store.document_text(a["doc_id"], version)
        assert document[a["start"] : a["end"]] == a["text"], (a, version)
        key = (a["shard"], version)
        if key not in _passage_ids:
            _passage_ids[key] = {p.passage_id for p in store.load_shard(a["shard"], version)}
        assert a["passage_id"] in _passage_ids[key]


def test_answers_cache_and_status_over_http(service, store):
    with httpx.Client() as c:
        first = ask(c, service, QUESTIONS[0], top_k=3)
        assert first["cached"] is False and first["index_version"] == store.current_version()
        assert 1 <= len(first["answers"]) <= 3
        check_answers_belong_to_version(store, first)
        again = ask(c, service, QUESTIONS[0], top_k=3)
        assert again["cached"] is True and again["answers"] == first["answers"]

        batch = c.post(f"{service}/v1/answer:batch", json={"questions": QUESTIONS[1:4]}, timeout=60)
        assert batch.status_code == 200 and len(batch.json()["results"]) == 3

        bad = c.post(f"{service}/v1/answer", json={"question": "", "top_k": 1})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_question"

        info = c.get(f"{service}/v1/index").json()
        assert info["shards"] == SHARDS and info["version"] == store.current_version()
        ready = c.get(f"{service}/readyz")
        assert ready.status_code == 200 and all(s["ready"] for s in ready.json()["shards"])
        assert "shardqa_requests_total" in c.get(f"{service}/metrics").text
        assert "/v1/answer" in c.get(f"{service}/openapi.json").json()["paths"]


def replica_actors(deployment: str) -> list[tuple[str, str]]:
    import ray

    return [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]


def test_the_hop_probe_times_each_layer_of_a_shard_call(service, store_dir):
    from ray import serve

    from shardqa.services.bench_hop import PROBE_APP, measure_hops
    from shardqa.services.service_config import settings_with

    settings = settings_with({"store": str(store_dir), "model": str(TINY), "backend": "torch"})
    hop = measure_hops(settings, calls=6, warmup=1)  # this process is already the cluster's driver
    calls = [r["call"] for r in hop["rows"]]
    assert calls[0].startswith("Ray actor call")
    assert calls[1].endswith("does nothing (actor transport)") and calls[2].endswith("does nothing (grpc transport)")
    # The shard rows call over the transport the ingress uses.
    assert hop["transport"] == settings.shard_transport == "grpc"
    assert calls[3].endswith("no passage to read (grpc transport)") and calls[4].endswith("one passage read (grpc transport)")
    assert "in this process" in calls[5]
    assert all(r["n"] == 6 and 0 < r["p50_ms"] <= r["p90_ms"] for r in hop["rows"])
    # The handle reached a replica holding the same passages and model as the in-process read.
    assert hop["answers_differing"] == 0 and hop["passages_cycled"] == 7 and hop["backend"] == "torch"
    assert PROBE_APP not in serve.status().applications  # the throw-away deployment is gone


def test_a_shard_replica_killed_during_a_stream_loses_no_request(service):
    import ray

    victims = replica_actors("shard-0")
    assert len(victims) == 2, victims
    questions = [f"{q} ({i})" for i, q in enumerate(QUESTIONS[10:70])]  # distinct: no cache hits
    done = threading.Event()
    statuses: list[int] = []

    def stream(part: list[str]):
        with httpx.Client() as c:
            for q in part:
                r = c.post(f"{service}/v1/answer", json={"question": q}, timeout=60)
                statuses.append(r.status_code)
                assert r.status_code == 200, r.text

    def killer():
        while len(statuses) < 8 and not done.is_set():
            time.sleep(0.01)
        name, namespace = victims[0]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)

    k = threading.Thread(target=killer)
    k.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(stream, [questions[i::3] for i in range(3)]))
    finally:
        done.set()
        k.join()
    assert statuses == [200] * len(questions)
    assert victims[0] not in replica_actors("shard-0")  # it really died
    # Serve replaces the replica; the service becomes fully ready again.
    deadline = time.monotonic() + 300
    while len(replica_actors("shard-0")) < 2 or httpx.get(f"{service}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)


def test_redis_stopped_during_a_stream_answers_keep_coming_uncached(service, redis_server):
    warm = QUESTIONS[100:105]
    with httpx.Client() as c:
        for q in warm:
            ask(c, service, q)
        assert all(ask(c, service, q)["cached"] for q in warm)

        redis_server.stop()
        try:
            during = [ask(c, service, q) for q in warm * 2]
            assert all(not b["cached"] for b in during)  # still answered, now uncached
            metrics = c.get(f"{service}/metrics").text
            errors = [l for l in metrics.splitlines() if l.startswith('shardqa_cache_requests_total{result="error"}')]
            assert errors and float(errors[0].split()[-1]) >= 1
        finally:
            redis_server.start()
        # Once the back-off has passed the cache is used again.
        deadline = time.monotonic() + 30
        while True:
            ask(c, service, warm[0])
            if ask(c, service, warm[0])["cached"]:
                break
            assert time.monotonic() < deadline, "the cache was not used again after Redis came back"
            time.sleep(0.5)


def test_reindex_while_serving_never_mixes_versions(service, store, store_dir, tmp_path):
    from shardqa.preprocessing.build import build_index

    old_version = store.current_version()
    # The new version indexes only two of the four articles, so its answers
    # differ visibly from the old version's.
    data = json.loads(SAMPLE.read_text())
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"version": data["version"], "data": data["data"][:2]}))

    bodies: list[dict] = []
    stop = threading.Event()

    def stream():
        with httpx.Client() as c:
            i = 0
            while not stop.is_set():
                q = QUESTIONS[200 + i % 150]
                bodies.append(ask(c, service, f"{q} [{i}]"))
                i += 1

    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(1.0)
        new_version = build_index(subset, str(store_dir), SHARDS, str(TINY)).version
        deadline = time.monotonic() + 120
        while httpx.get(f"{service}/v1/index").json()["version"] != new_version:
            assert time.monotonic() < deadline, "the new index version was not picked up"
            time.sleep(0.2)
        time.sleep(1.5)
    finally:
        stop.set()
        t.join()

    versions = [b["index_version"] for b in bodies]
    assert set(versions) == {old_version, new_version}
    first_new = versions.index(new_version)
    assert all(v == old_version for v in versions[:first_new])
    assert all(v == new_version for v in versions[first_new:])  # one switch, never back
    for body in bodies:
        check_answers_belong_to_version(store, body)
