"""Answering over HTTP in one process (no Ray): a real index of the sample
corpus, the real router and reader (tiny model), the in-process cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shardqa.services.api import create_api
from shardqa.services.qa_service import QAService
from shardqa.services.service_config import settings_with
from shardqa.services.shard_client import LocalShards
from shardqa.services.shard_worker import ShardWorker

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"
QUESTIONS = [
    "In what country is Normandy located?",
    "Who gave their name to Normandy in the 1000's and 1100's?",
    "What is the name of the first British satellite broadcaster?",
    "What is the Amazon rainforest also known as in English?",
    "How many people died of the Black Death?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.services.reader import Reader

    store_dir = tmp_path_factory.mktemp("index")
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    settings = settings_with({"model": str(TINY), "store": str(store_dir), "backend": "torch", "route_k": 3, "index_refresh_s": 0.2})
    reader = Reader.load(settings=settings, threads=1)
    store = open_store(str(store_dir))
    shards = LocalShards([ShardWorker(s, reader, store) for s in range(2)])
    service = QAService.create(settings, shards)
    with TestClient(create_api(service, settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.1)
        yield client, store, store_dir, shards


def check_answers(store, body: dict, top_k: int):
    answers = body["answers"]
    assert 1 <= len(answers) <= top_k
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    for a in answers:
        assert set(a) == {"text", "score", "doc_id", "passage_id", "start", "end", "shard"}
        # Offsets are into the document, whose text holds the answer there.
        document = store.document_text(a["doc_id"], body["index_version"])
        assert document[a["start"] : a["end"]] == a["text"] and a["text"]
        assert 0 <= a["shard"] < 2


def test_answers_point_into_their_documents(served):
    client, store, _, _ = served
    for q in QUESTIONS:
        r = client.post("/v1/answer", json={"question": q, "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index_version"] == store.current_version()
        check_answers(store, body, 3)


def test_second_ask_is_cached_and_equal(served):
    client, _, _, _ = served
    q = "Who was the duke in the battle of Hastings?"
    first = client.post("/v1/answer", json={"question": q}).json()
    again = client.post("/v1/answer", json={"question": "  who was the DUKE in the battle of   Hastings? "}).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["answers"] == first["answers"]
    assert client.post("/v1/answer", json={"question": q, "top_k": 2}).json()["cached"] is False  # top_k is in the key


def test_control_and_invisible_characters_do_not_make_another_question(served):
    """The canonical question is what the tokenizer, the router and the cache
    key all read: a stray control character separates words as a space does,
    so the variant is the same question, answered from the cache."""
    client, _, _, _ = served
    q = "What is the name of the region in France where the Normans settled?"
    first = client.post("/v1/answer", json={"question": q}).json()
    variant = q.replace(" ", "\x1f", 3).replace("Normans", "Nor\u200bmans")
    again = client.post("/v1/answer", json={"question": variant}).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["answers"] == first["answers"]


@pytest.mark.parametrize("question", ["\U0001f600", "\U0001f642 \U0001f643 \U0001f914", "?!", "\u0e3f\u0e3f?"])
def test_questions_without_a_known_word_are_refused(served, question):
    client, _, _, _ = served
    r = client.post("/v1/answer", json={"question": question})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_question"
    assert "no word the model knows" in r.json()["error"]["message"]
    r = client.post("/v1/answer:batch", json={"questions": [QUESTIONS[0], question]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("questions[1]: ")


def test_batch_answers_in_order(served):
    client, store, _, _ = served
    single = [client.post("/v1/answer", json={"question": q}).json() for q in QUESTIONS[:3]]
    r = client.post("/v1/answer:batch", json={"questions": QUESTIONS[:3] + QUESTIONS[:1]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    for one, batched in zip(single + single[:1], results):
        assert batched["answers"] == one["answers"]
        check_answers(store, batched, 1)


def test_a_batch_with_a_question_too_long_in_tokens_starts_no_inference(served, monkeypatch):
    client, _, _, shards = served
    calls = []
    original = shards.answer

    async def counting(shard, query):
        calls.append(shard)
        return await original(shard, query)

    monkeypatch.setattr(shards, "answer", counting)
    long_in_tokens = "Who " + "x " * 200 + "?"  # under the character limit, over the token limit
    fresh = "Which river flows through the capital, asked only here?"
    r = client.post("/v1/answer:batch", json={"questions": [fresh, long_in_tokens]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "question_too_long", r.text
    assert r.json()["error"]["message"].startswith("questions[1]: the question has")
    assert calls == []
    assert client.post("/v1/answer:batch", json={"questions": [fresh]}).status_code == 200 and calls


def test_index_info_and_readiness(served):
    client, store, _, _ = served
    info = client.get("/v1/index").json()
    m = store.manifest()
    assert info["version"] == m.version and info["shards"] == 2
    assert info["num_passages"] == m.num_passages == sum(info["passages_per_shard"])
    assert info["model"] == "tiny-bert-qa"
    ready = client.get("/readyz").json()
    assert ready["ready"] and [s["shard"] for s in ready["shards"]] == [0, 1]
    assert all(m.version in s["versions"] for s in ready["shards"])


def test_readiness_loads_the_version_into_a_replica_that_lacks_it(served):
    # A replica that replaced a dead one (or whose own refresh has not ticked
    # since the ingress switched) holds no version yet: /readyz has it load the
    # ingress's version instead of reporting the shard not ready.
    client, _, _, shards = served
    old = shards.workers[1]
    fresh = ShardWorker(1, old.reader, old.store)
    shards.workers[1] = fresh
    try:
        assert fresh.status().versions == ()
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert fresh.holds(ready.json()["index_version"])
    finally:
        shards.workers[1] = old


def test_a_new_index_version_is_picked_up_and_never_serves_old_answers(served):
    from shardqa.preprocessing.build import build_index

    client, store, store_dir, _ = served
    q = QUESTIONS[0]
    old = client.post("/v1/answer", json={"question": q}).json()
    old_version = old["index_version"]
    new_version = build_index(SAMPLE, str(store_dir), 2, str(TINY)).version
    assert new_version != old_version
    deadline = time.monotonic() + 30
    while client.get("/v1/index").json()["version"] != new_version:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    fresh = client.post("/v1/answer", json={"question": q}).json()
    assert fresh["index_version"] == new_version
    assert fresh["cached"] is False  # the old version's cache entry is not used
    check_answers(store, fresh, 1)


def test_an_index_with_another_shard_count_is_not_switched_to(served):
    """Shards are deployments: serving a 3-shard index needs a redeploy, so the
    2-shard service keeps answering from its current version."""
    from shardqa.preprocessing.build import build_index

    client, store, store_dir, _ = served
    serving = client.get("/v1/index").json()["version"]
    refused = build_index(SAMPLE, str(store_dir), 3, str(TINY)).version
    assert store.current_version() == refused
    time.sleep(1.0)  # several refresh periods
    assert client.get("/v1/index").json()["version"] == serving
    body = client.post("/v1/answer", json={"question": QUESTIONS[1]}).json()
    assert body["index_version"] == serving
    check_answers(store, body, 1)
    # Still ready (it answers), and it says why the newest version is not served.
    deadline = time.monotonic() + 30
    while (ready := client.get("/readyz")).json()["not_served"] is None:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.1)
    assert ready.status_code == 200 and ready.json()["index_version"] == serving
    assert ready.json()["not_served"] == (f"index version {refused} is not served: index version {refused} has 3 shards "
                                          "but the service was deployed with 2; redeploy to serve it")
    # And a metric for the alert (ShardQAIndexNotServed) says the same.
    assert "shardqa_index_not_served 1.0" in client.get("/metrics").text
    # The passages counted are the served version's, not the refused one's.
    per_shard = store.manifest(serving).passages_per_shard
    assert [s["passages"] for s in ready.json()["shards"]] == list(per_shard)
    # A version it can serve clears the note.
    fixed = build_index(SAMPLE, str(store_dir), 2, str(TINY)).version
    deadline = time.monotonic() + 30
    while client.get("/v1/index").json()["version"] != fixed:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.get("/readyz").json()["not_served"] is None
    deadline = time.monotonic() + 30
    while "shardqa_index_not_served 0.0" not in client.get("/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_replica_that_joins_under_traffic_answers_its_first_request(tmp_path):
    """Start-up waits for the first index load, so a replica Serve routes to
    as soon as it has started does not refuse requests while it loads."""
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.services.reader import Reader

    store_dir = tmp_path / "index"
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    # No second refresh tick within the test: only start-up's own attempt can
    # have loaded the index.
    settings = settings_with({"model": str(TINY), "store": str(store_dir), "backend": "torch", "route_k": 3, "index_refresh_s": 600})
    reader = Reader.load(settings=settings, threads=1)
    store = open_store(str(store_dir))
    service = QAService.create(settings, LocalShards([ShardWorker(s, reader, store) for s in range(2)]))
    with TestClient(create_api(service, settings)) as fresh:
        r = fresh.post("/v1/answer", json={"question": QUESTIONS[0]})
        assert r.status_code == 200, r.text
        assert r.json()["answers"] and fresh.get("/readyz").status_code == 200


def test_start_up_does_not_wait_for_an_index_that_is_not_there(tmp_path):
    import asyncio

    settings = settings_with({"model": str(TINY), "store": str(tmp_path), "startup_index_wait_s": 30})
    service = QAService.create(settings, LocalShards([]))

    async def start_and_stop():
        t0 = time.monotonic()
        loaded = await service.start(settings.startup_index_wait_s)
        waited = time.monotonic() - t0
        await service.stop()
        return loaded, waited

    loaded, waited = asyncio.run(start_and_stop())
    # The first attempt finds no index and start-up returns unready; the
    # 30 s bound is for an attempt that hangs, not for an empty store.
    assert loaded is False and waited < 10
    assert "index" in service.view_problem


class RecordingShards(LocalShards):
    """LocalShards that remember what each call asked for, and which passages
    each of the shards' forward passes read."""

    def __init__(self, workers):
        super().__init__(workers)
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        #: each call's ``query.under_load``, in the order of ``calls``
        self.sent_under_load: list[bool] = []
        self.reads: list[tuple[int, tuple[str, ...]]] = []
        #: each forward pass's ``under_load``, in the order of ``reads``
        self.loads: list[bool] = []
        for w in workers:
            read = w._read

            def recording(work, under_load, _read=read, _shard=w.shard):
                self.reads.append((_shard, tuple(p.passage_id for _, ps in work for p in ps)))
                self.loads.append(under_load)
                return _read(work, under_load)

            w._read = recording

    async def answer(self, shard, query):
        self.calls.append((shard, query.passage_ids))
        self.sent_under_load.append(query.under_load)
        return await super().answer(shard, query)


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory):
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.services.reader import Reader

    store_dir = tmp_path_factory.mktemp("index-rounds")
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    base = {"model": str(TINY), "store": str(store_dir), "backend": "torch", "route_k": 3}
    reader = Reader.load(settings=settings_with(base), threads=1)
    return base, reader, open_store(str(store_dir))


def ask(shared_index, overrides: dict, question: str, top_k: int = 1):
    import asyncio

    base, reader, store = shared_index
    # Every passage the router returns is read, so the rounds are visible.
    settings = settings_with(base | {"route_min_relative_score": 0.0, "index_refresh_s": 600} | overrides)
    shards = RecordingShards([ShardWorker(s, reader, store) for s in range(2)])
    service = QAService.create(settings, shards)

    async def run():
        await service.start(wait_s=30)
        try:
            return json.loads((await service.answer(question, top_k)).answers_json)
        finally:
            await service.stop()

    return asyncio.run(run()), shards, service.current_view().router.route(question, 3).passages


def read_rounds(outcome: str) -> float:
    from shardqa.monitoring.metrics import metrics_response

    body = metrics_response()[0].decode()
    line = next((ln for ln in body.splitlines() if ln.startswith(f'shardqa_read_rounds_total{{rounds="{outcome}"}}')), None)
    return float(line.split()[-1]) if line else 0.0


def on_shard(routed, shard: int) -> tuple[str, ...]:
    return tuple(p.passage_id for p in routed if p.shard == shard)


def routed_with_both_shards(shared_index) -> tuple[str, list]:
    """A sample question whose routed passages lie on both shards, with more
    than one on the best passage's shard, so every path of the rule shows."""
    for q in QUESTIONS:
        routed = ask(shared_index, {"read_first_stop_logit": -1e9}, q)[2]
        first = routed[0].shard
        if len(on_shard(routed, first)) > 1 and len(on_shard(routed, 1 - first)) > 0:
            return q, routed
    pytest.fail("no sample question routes to both shards with two passages on the first")


def test_a_confident_best_passage_is_read_alone(shared_index):
    q, routed = routed_with_both_shards(shared_index)
    first = routed[0].shard
    before = read_rounds("1")
    answers, shards, _ = ask(shared_index, {"read_first_stop_logit": -1e9}, q)
    # One call, to the best passage's shard, naming its read-set passages;
    # the shard's one forward pass reads the best passage alone.
    assert shards.calls == [(first, on_shard(routed, first))]
    assert shards.reads == [(first, (routed[0].passage_id,))]
    assert answers and answers[0]["passage_id"] == routed[0].passage_id
    assert read_rounds("1") == before + 1


def test_an_unsure_best_passage_makes_the_rest_read_too_with_the_same_answer_as_reading_all_at_once(shared_index):
    q, routed = routed_with_both_shards(shared_index)
    first = routed[0].shard
    before = read_rounds("2")
    two_rounds, shards, _ = ask(shared_index, {"read_first_stop_logit": 1e9}, q)
    # The best passage's shard reads it, then (same call, no second hop) its
    # other passages; only the other shard's passages take a second call.
    assert shards.calls == [(first, on_shard(routed, first)), (1 - first, on_shard(routed, 1 - first))]
    assert shards.reads == [
        (first, (routed[0].passage_id,)),
        (first, on_shard(routed, first)[1:]),
        (1 - first, on_shard(routed, 1 - first)),
    ]
    assert read_rounds("2") == before + 1
    at_once, shards_at_once, _ = ask(shared_index, {"read_first_stop_logit": float("inf")}, q)
    assert len(shards_at_once.calls) == len(shards_at_once.reads) == 2  # one call and one forward pass per shard
    assert two_rounds == at_once


def test_several_answers_read_every_routed_passage_in_one_round(shared_index):
    q = QUESTIONS[1]
    answers, shards, routed = ask(shared_index, {"read_first_stop_logit": -1e9}, q, top_k=3)
    assert sorted(p for _, pids in shards.reads for p in pids) == sorted(p.passage_id for p in routed)
    assert len(shards.calls) == len(shards.reads) == len({p.shard for p in routed})


def test_the_shards_are_told_the_service_is_busy_only_while_other_questions_are_inferred(shared_index):
    import asyncio

    base, reader, store = shared_index
    _, alone, _ = ask(shared_index, {}, QUESTIONS[0])
    assert alone.sent_under_load and not any(alone.sent_under_load)
    assert not any(alone.loads)  # one question in flight: the reader's full thread count
    # One question read on two shards at once: they share the cores too.
    q, _ = routed_with_both_shards(shared_index)
    _, both, _ = ask(shared_index, {"read_first_stop_logit": float("inf")}, q)
    assert len(both.calls) == 2 and all(both.sent_under_load) and all(both.loads)

    settings = settings_with(base | {"index_refresh_s": 600})
    shards = RecordingShards([ShardWorker(s, reader, store) for s in range(2)])
    service = QAService.create(settings, shards)

    async def run():
        await service.start(wait_s=30)
        try:
            return await service.answer_many(QUESTIONS[:2])
        finally:
            await service.stop()

    asyncio.run(run())
    # Both questions were being inferred when the first went to its shard.
    assert shards.sent_under_load[0] and any(shards.loads)
    assert service._inferring == 0


def test_a_question_that_fails_on_its_shard_leaves_the_busy_count(shared_index):
    import asyncio

    from shardqa.errors import ServiceUnavailable

    base, reader, store = shared_index

    class FailingShards(LocalShards):
        async def answer(self, shard, query):
            raise ServiceUnavailable("no replica")

    service = QAService.create(settings_with(base | {"index_refresh_s": 600}), FailingShards([ShardWorker(s, reader, store) for s in range(2)]))

    async def run():
        await service.start(wait_s=30)
        try:
            with pytest.raises(ServiceUnavailable):
                await service.answer(QUESTIONS[0])
            return service._inferring
        finally:
            await service.stop()

    assert asyncio.run(run()) == 0


def recording_worker(shared_index):
    """Shard 0's worker, its index version, three of its passage ids, the
    first question's tokens, and the list its forward passes are recorded in:
    per pass, each (query's stop_logit, passages read), then ``under_load``."""
    _, reader, store = shared_index
    worker = ShardWorker(0, reader, store)
    version = store.current_version()
    ids = tuple(sorted(worker.passages(version)))[:3]
    reads = []
    read = worker._read
    worker._read = lambda work, under_load: reads.append([(q.stop_logit, tuple(p.passage_id for p in ps)) for q, ps in work]
                                                         + [under_load]) or read(work, under_load)
    return worker, version, ids, reader.check_question(QUESTIONS[0]), reads


def test_one_query_is_read_on_the_threads_its_ingress_asked_for(shared_index):
    from shardqa.services.shard_worker import ShardQuery

    worker, version, ids, question, reads = recording_worker(shared_index)
    worker.answer_batch([ShardQuery(version, question, ids[:1], 1)])
    worker.answer_batch([ShardQuery(version, question, ids[:1], 1, under_load=True)])
    assert [r[-1] for r in reads] == [False, True]


def test_a_shard_batches_the_second_round_of_every_unsure_query(shared_index):
    """Two questions in one shard batch: the first forward pass reads each
    one's first passage, the second only the unsure one's others."""
    from shardqa.services.shard_worker import ShardQuery

    worker, version, ids, question, reads = recording_worker(shared_index)
    sure = ShardQuery(version, question, ids, 1, stop_logit=-1e9)
    unsure = ShardQuery(version, question, ids[::-1], 1, stop_logit=1e9)
    plain = ShardQuery(version, question, ids[:2], 1)
    out = worker.answer_batch([sure, unsure, plain])
    # A batch of several queries means the service is busy: both passes run
    # on the reader's threads for a busy service.
    assert reads == [
        [(-1e9, ids[:1]), (1e9, ids[-1:]), (None, ids[:2]), True],
        [(1e9, ids[::-1][1:]), True],
    ]
    assert {a.passage_id for a in out[0]} == set(ids[:1])
    assert {a.passage_id for a in out[1]} == set(ids)
    assert {a.passage_id for a in out[2]} == set(ids[:2])
    assert sure.first_is_confident(out[0]) and not unsure.first_is_confident(out[1])
    assert not plain.first_is_confident(out[2])  # no rule, nothing to stop


def test_a_query_a_shard_cannot_answer_fails_alone(shared_index):
    """A passage or index version a replica does not hold fails that query
    only: the others of its batch are answered, and the model thread never
    loads a version (the replica loads it before batching)."""
    import pytest

    from shardqa.errors import IndexNotFound
    from shardqa.services.shard_worker import ShardQuery, answers_or_raise

    base, reader, store = shared_index
    worker = ShardWorker(0, reader, store)
    version = store.current_version()
    ids = tuple(sorted(worker.passages(version)))[:1]
    question = reader.check_question(QUESTIONS[0])
    good = ShardQuery(version, question, ids, 1)
    unknown_passage = ShardQuery(version, question, ("no-such-passage",), 1)
    unknown_version = ShardQuery("v-not-loaded", question, ids, 1)
    out = worker.answer_batch([unknown_passage, good, unknown_version])
    assert {a.passage_id for a in answers_or_raise(out[1])} == set(ids)
    with pytest.raises(IndexNotFound, match="no passage 'no-such-passage'"):
        answers_or_raise(out[0])
    with pytest.raises(IndexNotFound, match="does not hold index version v-not-loaded"):
        answers_or_raise(out[2])
    assert not worker.holds("v-not-loaded")

    # In process, as in a replica, a version not loaded yet is loaded before the batch.
    import asyncio

    from shardqa.services.shard_client import LocalShards

    fresh = ShardWorker(0, reader, store)
    answers = asyncio.run(LocalShards([fresh]).answer(0, good))
    assert fresh.holds(version) and {a.passage_id for a in answers} == set(ids)


def test_a_version_that_fails_to_load_is_retried_with_a_growing_wait(tmp_path, monkeypatch):
    """Each attempt loads the router on the cores that answer requests, so a
    version that fails is not rebuilt every tick; it is tried again later
    (the failure may pass), and a shard load that hangs is given up on."""
    import asyncio

    from shardqa.errors import ServiceUnavailable, StoreError
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.services import qa_service as Q
    from shardqa.services.reader import Reader

    store_dir = tmp_path / "index"
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    settings = settings_with({"model": str(TINY), "store": str(store_dir), "backend": "torch", "index_refresh_s": 1.0})
    store = open_store(str(store_dir))
    reader = Reader.load(settings=settings, threads=1)
    service = QAService.create(settings, LocalShards([ShardWorker(s, reader, store) for s in range(2)]))
    builds = []

    def broken(version):
        builds.append(version)
        raise StoreError("the store was briefly unreachable")

    now = [1000.0]
    monkeypatch.setattr(Q, "_clock", lambda: now[0])
    real_build = service._build_view
    monkeypatch.setattr(service, "_build_view", broken)

    async def attempts():
        for _ in range(3):  # ticks: one attempt, then waits
            with pytest.raises(StoreError if not builds else (StoreError, ServiceUnavailable), match="briefly unreachable"):
                await service.refresh()
        assert len(builds) == 1
        now[0] += 2.5  # past the first wait (2 x index_refresh_s)
        with pytest.raises(StoreError):
            await service.refresh()
        assert len(builds) == 2
        now[0] += 2.5  # the second wait is 4 s
        with pytest.raises(ServiceUnavailable):
            await service.refresh()
        assert len(builds) == 2
        # the store recovers: the next attempt after the wait switches
        monkeypatch.setattr(service, "_build_view", real_build)
        now[0] += 2.0
        assert await service.refresh() is True and service._failed is None

        # a shard load that hangs is given up on, and the current view kept
        serving = service.view.version
        new_version = build_index(SAMPLE, str(store_dir), 2, str(TINY)).version

        async def hang(shard, version):
            await asyncio.sleep(3600)

        real_prepare = service.shards.prepare
        monkeypatch.setattr(service.shards, "prepare", hang)
        monkeypatch.setattr(Q, "PREPARE_TIMEOUT_S", 0.2)
        built = []
        monkeypatch.setattr(service, "_build_view", lambda v: built.append(v) or real_build(v))
        for _ in range(2):  # tried again every tick, without rebuilding the router
            with pytest.raises(ServiceUnavailable, match=f"did not load index version {new_version} within"):
                await asyncio.wait_for(service.refresh(), 30)
        assert service.view.version == serving and built == [new_version]
        monkeypatch.setattr(service.shards, "prepare", real_prepare)
        assert await service.refresh() is True and service.view.version == new_version and built == [new_version]

    asyncio.run(attempts())
