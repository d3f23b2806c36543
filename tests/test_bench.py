"""The benchmark harness: statistics, question planning, load generation
against a small local service on loopback, target verdicts and the report
writers (JSON, Markdown, PNG), and the `shardqa bench --json` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shardqa.services import bench as B
from shardqa.training.squad import SquadExample, load_squad

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-bert-qa"

# --- a small SQuAD-format file -------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown"]
ANIMALS = ["fox", "owl", "cat", "dog", "eel", "yak", "ant", "bee", "cow", "elk", "emu", "hen"]


def squad_file(path: Path) -> Path:
    paragraphs = []
    for a, animal in enumerate(ANIMALS):
        sentences, qas = [], []
        for c, colour in enumerate(COLOURS):
            sentence = f"The {animal} number {c} painted its house {colour}."
            start = len(" ".join(sentences)) + (1 if sentences else 0)
            sentences.append(sentence)
            qas.append({
                "id": f"q-{animal}-{c}",
                "question": f"What colour did {animal} number {c} paint its house?",
                "answers": [{"text": colour, "answer_start": start + sentence.index(colour)}],
            })
        paragraphs.append({"context": " ".join(sentences), "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Animals", "paragraphs": paragraphs}]}))
    return path


@pytest.fixture(scope="module")
def questions_path(tmp_path_factory) -> Path:
    return squad_file(tmp_path_factory.mktemp("squad") / "tiny-squad.json")


@pytest.fixture(scope="module")
def examples(questions_path) -> list[SquadExample]:
    return load_squad(questions_path)


# --- a local stand-in for the service, on loopback ---------------------------------

class FakeService:
    """Answers from the gold file: right for even-numbered questions, wrong for
    odd ones, HTTP 503 for the ids in ``fail``; caches answers by question and
    reports ``cached`` as the real service does. Tracks in-flight requests."""

    def __init__(self, examples, delay_s: float = 0.0, fail: frozenset[str] = frozenset(), busy: bool = False):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        from shardqa.monitoring import metrics

        self.by_question = {ex.question: ex for ex in examples}
        self.cache: dict[str, str] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.requests = 0
        app = FastAPI()

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok"}

        @app.get("/readyz")
        async def readyz():
            return {"status": "ready"}

        @app.get("/v1/index")
        async def index():
            return {"version": "test-1", "model": "not-a-local-dir", "shards": 1}

        @app.get("/metrics")
        async def prometheus():
            # The real exposition of shardqa's metrics: what the benchmark
            # reads its stage table from.
            from fastapi import Response

            body, content_type = metrics.metrics_response()
            return Response(body, media_type=content_type)

        @app.post("/v1/answer")
        async def answer(body: dict):
            self.requests += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if delay_s and busy:  # on CPU, as a model would be: what an on-CPU profiler samples
                    t_end = time.perf_counter() + delay_s
                    while time.perf_counter() < t_end:
                        pass
                elif delay_s:
                    await asyncio.sleep(delay_s)
                ex = self.by_question[body["question"]]
                if ex.id in fail:
                    return JSONResponse({"error": {"code": "unavailable", "message": "down"}}, status_code=503)
                cached = body["question"] in self.cache
                if not cached:  # a real uncached answer: route 2 ms, fan-out 10 ms
                    metrics.record_stage("route", 0.002)
                    metrics.record_stage("shard_inference", 0.010)
                metrics.record_request("/v1/answer", 200, delay_s, cached)
                n = int(ex.id.rsplit("-", 1)[1])
                text = ex.answers[0] if n % 2 == 0 else "a wrong answer"
                self.cache[body["question"]] = text
                return {"answers": [{"text": text, "score": 0.9, "doc_id": "d", "passage_id": "p", "start": 0,
                                     "end": len(text), "shard": 0}], "cached": cached, "index_version": "test-1"}
            finally:
                self.inflight -= 1

        self.app = app


class ServerThread:
    """uvicorn on a socket bound to 127.0.0.1 with a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_fake_forever(questions_path: str, port: int, delay_s: float = 0.002) -> None:
    """The fake service in its own process (for tests that profile it)."""
    import uvicorn

    fake = FakeService(load_squad(questions_path), delay_s=delay_s, busy=True)
    uvicorn.run(fake.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


# --- statistics, planning ----------------------------------------------------------

def test_latency_stats_are_numpy_linear_percentiles_in_ms():
    lat = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = B.latency_stats(lat)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert B.latency_stats([]) == {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}


def test_plan_gives_disjoint_slices_of_distinct_questions(examples):
    dup = SquadExample("dup", "t", "what COLOUR did fox number 0 paint its house", "c", ("red",), (0,))
    plan = B.plan_questions([*examples, dup], levels=4, per_level=25, warmup=3, seed=1)
    assert len(plan.warmup) == 3 and [len(s) for s in plan.slices] == [25] * 4
    keys = [B.question_key(q.question) for q in plan.warmup + [q for s in plan.slices for q in s]]
    assert len(keys) == len(set(keys)) == 103  # the case/punctuation duplicate never appears twice
    again = B.plan_questions(examples, levels=4, per_level=25, warmup=3, seed=1)
    assert [q.id for q in again.slices[2]] == [q.id for q in plan.slices[2]]  # seeded
    other = B.plan_questions(examples, levels=4, per_level=25, warmup=3, seed=2)
    assert [q.id for q in other.slices[0]] != [q.id for q in plan.slices[0]]
    with pytest.raises(B.BenchError, match="distinct questions"):
        B.plan_questions(examples, levels=3, per_level=40, warmup=5, seed=0)


def test_summarize_scores_failures_as_empty_answers(examples):
    qs = examples[:4]
    samples = [
        B.Sample(qs[0].id, 0.010, 200, cached=False, text=qs[0].answers[0]),
        B.Sample(qs[1].id, 0.020, 200, cached=True, text="the " + qs[1].answers[0]),  # EM after normalisation
        B.Sample(qs[2].id, 0.030, 200, cached=False, text="nothing like it"),
        B.Sample(qs[3].id, 5.000, 0, error="ReadTimeout"),
    ]
    lv = B.summarize_level(samples, qs, wall_s=2.0, mode="closed", cache="cold", concurrency=2)
    assert lv["requests"] == 4 and lv["ok"] == 3 and lv["errors"] == 1
    assert lv["status_counts"] == {"200": 3, "ReadTimeout": 1}
    assert lv["p50_ms"] == pytest.approx(20.0) and lv["max_ms"] == pytest.approx(30.0)  # errors are not latencies
    assert lv["qps"] == pytest.approx(1.5)
    assert lv["cache_hit_ratio"] == pytest.approx(1 / 3, abs=1e-4)
    assert lv["exact_match"] == pytest.approx(50.0) and lv["f1"] == pytest.approx(50.0)


# --- load generation against a local service ------------------------------------

@pytest.mark.slow
def test_closed_and_open_loop_cold_and_warm(examples):
    fail = frozenset(ex.id for ex in examples if ex.id.startswith("q-owl-"))
    fake = FakeService(examples, delay_s=0.02, fail=fail)
    plan = B.LoadPlan(concurrency=(1, 4), rates=(200.0,), per_level=20, warmup=2, seed=3)
    with ServerThread(fake.app) as srv:
        levels, info, qplan, raw = asyncio.run(B.run_levels(srv.url, examples, plan, log=lambda m: None))
    assert [(lv["mode"], lv["concurrency"], lv["rate_qps"], lv["cache"]) for lv in levels] == [
        ("closed", 1, None, "cold"), ("closed", 1, None, "warm"),
        ("closed", 4, None, "cold"), ("closed", 4, None, "warm"),
        ("open", None, 200.0, "cold"), ("open", None, 200.0, "warm"),
    ]
    assert fake.requests == 2 + 6 * 20
    assert info["index"]["version"] == "test-1" and info["floor"]["n"] == 50
    for lv, (questions, samples) in zip(levels, raw):
        expected_fail = sum(q.id in fail for q in questions)
        assert lv["requests"] == 20 and lv["errors"] == expected_fail
        assert lv["status_counts"].get("503", 0) == expected_fail
        if expected_fail:  # the first refusal is kept, body and all
            assert lv["first_errors"]["503"] == 'HTTP 503: {"error":{"code":"unavailable","message":"down"}}'
        assert lv["cache_hit_ratio"] == (0.0 if lv["cache"] == "cold" else 1.0)
        right = sum(1 for q in questions if q.id not in fail and int(q.id.rsplit("-", 1)[1]) % 2 == 0)
        assert lv["exact_match"] == pytest.approx(100 * right / 20)
        assert lv["p50_ms"] >= 20.0  # the service sleeps 20 ms: the client cannot see less
        assert {s.qid for s in samples} == {q.id for q in questions}
    # The stage table: the ingress's own timings over each level, from its /metrics.
    cold1, warm1 = levels[0], levels[1]
    assert cold1["stages"]["route"] == {"mean_ms": 2.0, "count": 20 - sum(q.id in fail for q in raw[0][0])}
    assert cold1["stages"]["shard_inference"]["mean_ms"] == 10.0
    assert cold1["stages"]["request:cached=false"]["mean_ms"] == pytest.approx(20.0)
    assert "route" not in warm1["stages"] and warm1["stages"]["request:cached=true"]["count"] > 0
    table = B.stages_table(levels)
    assert "| concurrency 1, cold | – | – | – | 2.00 | 10.00 | – | 20.00 |" in table
    # The levels used disjoint questions, so every cold level really was cold.
    ids = [q.id for questions, _ in raw[::2] for q in questions]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_closed_loop_holds_concurrency_and_open_loop_does_not_wait(examples):
    fake = FakeService(examples, delay_s=0.03)
    with ServerThread(fake.app) as srv:
        async def go():
            async with B.make_client(64, 10) as client:
                qs = examples[:12]
                await B.run_closed(client, srv.url, qs, concurrency=1)
                one = fake.max_inflight
                fake.max_inflight = 0
                await B.run_closed(client, srv.url, examples[12:36], concurrency=3)
                three = fake.max_inflight
                fake.max_inflight = 0
                samples, wall = await B.run_open(client, srv.url, examples[36:56], rate=400.0)
                return one, three, fake.max_inflight, samples
        one, three, opened, samples = asyncio.run(go())
    assert one == 1 and three == 3
    # 20 requests 2.5 ms apart against a 30 ms service: an open loop piles them up.
    assert opened > 3
    assert all(s.ok for s in samples)


@pytest.mark.slow
def test_unreachable_service_is_a_clean_error(examples):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = B.LoadPlan(concurrency=(1,), rates=(), per_level=2, warmup=0)
    with pytest.raises(B.BenchError, match=r"not ready after 0 s \(/readyz -> ConnectError\) — nothing listens there: is `shardqa serve`"):
        asyncio.run(B.run_levels(f"http://127.0.0.1:{port}", examples, plan, ready_timeout_s=0.5, log=lambda m: None))


# --- targets and reports ---------------------------------------------------------------

def _level(mode, c, rate, cache, p50, p99, qps, hit, f1=80.0, errors=0, n=100):
    return {"mode": mode, "concurrency": c, "rate_qps": rate, "cache": cache, "requests": n, "ok": n - errors,
            "errors": errors, "status_counts": {"200": n - errors}, "p50_ms": p50, "p90_ms": p50 * 1.5, "p99_ms": p99,
            "max_ms": p99 * 1.2, "mean_ms": p50, "qps": qps, "wall_s": n / qps, "cache_hit_ratio": hit, "f1": f1,
            "exact_match": f1 - 10}


def _result():
    levels = [
        _level("closed", 1, None, "cold", 15.0, 45.0, 60.0, 0.0),
        _level("closed", 1, None, "warm", 2.0, 4.0, 400.0, 1.0),
        _level("closed", 16, None, "cold", 150.0, 300.0, 90.0, 0.0),
        _level("closed", 16, None, "warm", 9.0, 20.0, 900.0, 1.0),
        _level("open", None, 40.0, "cold", 30.0, 80.0, 40.0, 0.0),
        _level("open", None, 40.0, "warm", 2.5, 6.0, 40.0, 1.0),
    ]
    base = {"mode": "in-process", "n": 100, "p50_ms": 150.0, "p90_ms": 200.0, "p99_ms": 300.0, "max_ms": 320.0,
            "f1": 78.0, "exact_match": 68.0, "service_f1_same_questions": 80.0, "service_em_same_questions": 70.0}
    result = {"levels": levels, "baseline": base, **B.speedups(levels, base), "end_to_end_f1": B.end_to_end_f1(levels),
              "meta": {"command": "shardqa bench --limit 100", "started_at": "2025-01-01T00:00:00+00:00"},
              "floor": {"endpoint": "/healthz", "n": 50, "p50_ms": 0.8, "p99_ms": 1.5}}
    return result


def test_speedup_uses_uncached_concurrency_one():
    r = _result()
    assert r["speedup_p50"] == pytest.approx(10.0) and r["speedup_p99"] == pytest.approx(300 / 45, abs=1e-3)
    assert r["end_to_end_f1"] == pytest.approx(80.0)


def test_target_verdicts():
    r = _result()
    verdicts = {t["target"].split(" ")[0] + " " + t["target"].split(" ")[1]: t for t in B.evaluate_targets(r)}
    assert verdicts["uncached p50"]["met"] is True and verdicts["uncached p99"]["met"] is True
    assert verdicts["cached p50"]["met"] is True
    tp = verdicts["uncached throughput"]
    assert tp["met"] is True and "60.0 q/s" in tp["measured"]  # c=16 does 90 q/s but at p99 300 ms: not counted
    assert tp["note"] == "highest uncached throughput: 90.0 q/s (concurrency 16, p99 300.0 ms)"
    assert verdicts[">= 8x"]["met"] is True
    assert verdicts["end-to-end F1"]["met"] is None  # no gold-paragraph figure in this run

    r["levels"][0]["p50_ms"] = 25.0
    r["levels"][0]["cache_hit_ratio"] = 0.5
    r["baseline"]["service_f1_same_questions"] = 70.0  # faster but worse: not a win
    r["gold_paragraph"] = {"f1": 100.0, "n": 100}
    verdicts = {t["target"].split(" ")[0] + " " + t["target"].split(" ")[1]: t for t in B.evaluate_targets(r)}
    assert verdicts["uncached p50"]["met"] is False and "came from the cache" in verdicts["uncached p50"]["note"]
    assert verdicts[">= 8x"]["met"] is False
    assert verdicts["end-to-end F1"]["met"] is False and "80.0%" in verdicts["end-to-end F1"]["measured"]


def test_reports_json_markdown_png(tmp_path):
    r = _result()
    r["targets"] = B.evaluate_targets(r)
    paths = B.write_reports(r, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == r
    md = paths["markdown"].read_text()
    assert "| load | cache | requests | p50 ms |" in md
    assert "| concurrency 16 | cold | 100 | 150.0 | 225.0 | 300.0 | 360.0 | 90.0 | 0 | 0% | 70.0 | 80.0 |" in md
    assert "| open loop 40 req/s | warm |" in md
    assert "**10.00x at p50**" in md and "![latency vs load](bench.png)" in md
    assert "| uncached p50 <= 20 ms at concurrency 1 | 15.0 ms | met |" in md
    assert "Failed requests" not in md  # none failed
    r["levels"][2].update(errors=2, status_counts={"200": 98, "503": 2}, first_errors={"503": 'HTTP 503: <html>No server</html>'})
    md = B.render_markdown(r)
    assert "- concurrency 16, cold: 2 × 503: `HTTP 503: <html>No server</html>`" in md
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(paths["plot"])
    assert img.shape[0] > 300 and img.shape[1] > 900  # two panels: closed and open loop
    assert float(np.std(img)) > 0.01  # not a blank canvas


def test_plot_without_open_loop_or_baseline(tmp_path):
    r = _result()
    r["levels"] = [lv for lv in r["levels"] if lv["mode"] == "closed"]
    r["baseline"] = None
    out = B.plot_levels(r, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


# --- the command ----------------------------------------------------------------------

@pytest.mark.slow
def test_bench_command_prints_one_json_object(examples, questions_path, tmp_path):
    fake = FakeService(examples)
    with ServerThread(fake.app) as srv:
        proc = subprocess.run(
            [sys.executable, "-m", "shardqa.cli", "bench", "--url", srv.url, "--questions", str(questions_path),
             "--limit", "6", "--concurrency", "1,2", "--rates", "50", "--warmup", "1", "--baseline-limit", "4",
             "--model", str(TINY_MODEL), "--out", str(tmp_path / "res"), "--json"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert len(obj["levels"]) == 6
    for lv in obj["levels"]:
        assert {"concurrency", "cache", "p50_ms", "p90_ms", "p99_ms", "max_ms", "qps", "errors", "f1", "exact_match"} <= set(lv)
        assert lv["cache"] in ("cold", "warm")
    base = obj["baseline"]
    assert {"p50_ms", "p99_ms", "f1", "exact_match"} <= set(base) and base["n"] == 4 and base["mode"] == "in-process"
    assert base["model"] == "tests/fixtures/tiny-bert-qa"  # shown relative to the repository
    assert obj["speedup_p50"] == pytest.approx(base["p50_ms"] / obj["levels"][0]["p50_ms"], rel=1e-2)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / "res" / name).stat().st_size > 0
    assert json.loads((tmp_path / "res" / "bench.json").read_text()) == obj


def test_bench_command_rejects_bad_levels(questions_path):
    proc = subprocess.run([sys.executable, "-m", "shardqa.cli", "bench", "--questions", str(questions_path),
                           "--concurrency", "1,x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --concurrency") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_dead_service_process_stops_the_wait_at_once(examples):
    plan = B.LoadPlan(concurrency=(1,), rates=(), per_level=2, warmup=0)
    t0 = time.monotonic()
    with pytest.raises(B.BenchError, match="exited before"):
        asyncio.run(B.run_levels(f"http://127.0.0.1:{free_port()}", examples, plan, ready_timeout_s=120,
                                 log=lambda m: None, alive=lambda: False))
    assert time.monotonic() - t0 < 60  # not the 120 s ready timeout
    assert B.process_alive(os.getpid()) and not B.process_alive(2**22 + 12345)


def test_the_same_questions_in_one_process_sit_beside_the_reference_level():
    r = _result()
    assert "The model's share" not in B.render_markdown(r)  # not measured: no section
    r["one_process"] = {"questions": 100, "p50_ms": 9.5, "p90_ms": 30.0, "p99_ms": 41.0, "f1": 79.5, "passages_read": 1.68,
                        "questions_from": "concurrency 1", "backend": "onnx-int8", "threads": 2}
    md = B.render_markdown(r)
    assert "#### The model's share: the same questions in one process" in md
    assert "| in one process (`shardqa eval-answers`) | 9.5 | 30.0 | 41.0 | 79.5 | 1.68 |" in md
    # The service's row is the reference level (uncached, concurrency 1) of the same run.
    ref = B.reference_level(r["levels"])
    assert f"| through the service, concurrency 1, cold | {ref['p50_ms']:.1f} |" in md
    assert "100 questions of concurrency 1" in md and "onnx-int8, 2 threads" in md
    r["one_process"] = {"error": "IndexNotFound: no index in idx"}
    assert "In one process: not measured (IndexNotFound: no index in idx)." in B.render_markdown(r)
