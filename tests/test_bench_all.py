"""`shardqa bench-all` and BENCHMARKS.md: profile parsing, the report
renderer, and the whole command against a local stand-in service that runs in
its own process (so py-spy can profile it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardqa.services import bench_profile as P
from shardqa.services.bench_report import render, write_benchmarks_md

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_bench import _result, free_port, squad_file  # noqa: E402

RAW = (
    'process 10:"python -m shardqa.cli serve --store ./idx; echo x";process 11:"ray::ServeReplica:shardqa:shard-1";'
    "run (/opt/x/shardqa/services/shard_worker.py:50);answer_batch (/opt/x/shardqa/services/reader.py:170);"
    "run (/venv/site-packages/onnxruntime/session.py:200) 60\n"
    'process 10:"python -m shardqa.cli serve --store ./idx; echo x";process 11:"ray::ServeReplica:shardqa:shard-1";'
    "run (/opt/x/shardqa/services/shard_worker.py:50);_decode_window (/opt/x/shardqa/services/reader.py:230) 15\n"
    'process 10:"python -m shardqa.cli serve --store ./idx; echo x";handle (/venv/site-packages/uvicorn/h11.py:9) 25\n'
)


def test_profile_summary_by_process_self_and_own_code():
    records = P.parse_collapsed(RAW)
    assert [n for _, n in records] == [60, 15, 25]
    assert records[0][0][0] == 'process 10:"python -m shardqa.cli serve --store ./idx; echo x"'  # ";" inside a command line
    s = P.summarize(records)
    assert s["samples"] == 100
    assert s["processes"][0] == {"frame": "11: ray::ServeReplica:shardqa:shard-1", "samples": 75, "share": 0.75}
    assert s["processes"][1]["frame"].startswith("10: python -m shardqa.cli serve")
    assert s["self"][0] == {"frame": "run (session.py)", "samples": 60, "share": 0.6}
    own = {r["frame"]: r["samples"] for r in s["own_inclusive"]}
    assert own == {"run (shard_worker.py)": 75, "answer_batch (reader.py)": 60, "_decode_window (reader.py)": 15}
    table = P.profile_table(s)
    assert "| 60.0% | 60 | `run (session.py)` |" in table and "100 busy samples" in table


def test_saved_profile_keeps_no_machine_details_from_command_lines():
    """The raw profile is published with the results: process frames keep the
    program's name, never its paths, addresses or session folders."""
    raw = ('process 7:"/srv/venv/bin/python -m shardqa.cli serve --store /srv/idx";'
           'process 8:"/srv/venv/lib/ray/raylet --node_ip_address=10.1.2.3 --session_dir=/tmp/ray/s_1";'
           "run (/srv/venv/site-packages/onnxruntime/session.py:200) 9\n" + RAW)
    clean = P.sanitize_collapsed(raw)
    assert clean.splitlines()[0] == 'process 7:"python -m shardqa.cli serve";process 8:"raylet";run (/srv/venv/site-packages/onnxruntime/session.py:200) 9'
    assert "10.1.2.3" not in clean and "/tmp/ray" not in clean and "--store" not in clean
    assert P.summarize(P.parse_collapsed(clean))["self"] == P.summarize(P.parse_collapsed(raw))["self"]


def test_command_line_shows_no_process_id(monkeypatch):
    from shardqa.services.bench_cli import command_line

    monkeypatch.setattr(sys, "argv", ["shardqa", "bench-all", "--profile-pid", "12345", "--limit", "5"])
    assert command_line() == "shardqa bench-all --profile-pid PID --limit 5"
    monkeypatch.setattr(sys, "argv", ["shardqa", "bench-all", "--profile-pid=12345"])
    assert command_line() == "shardqa bench-all --profile-pid=PID"


def _results_dir(tmp_path, with_profile=True):
    from shardqa.services import bench as B

    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    bench = _result()
    bench["levels"][1]["p50_ms"] = 4.0  # cached p50 misses its 3 ms target
    bench["machine"] = {"cpu": "Test CPU", "usable_cpus": 2, "logical_cpus": 2, "memory_gb": 8.0, "os": "Linux",
                        "python": "3.11", "versions": {"torch": "2"}, "loadavg_at_start": [1, 1, 1],
                        "loadavg_at_end": [2, 2, 2], "gpu": None}
    bench["gold_paragraph"] = {"backend": "onnx-int8", "n": 300, "f1": 85.0, "exact_match": 75.0}
    bench["targets"] = B.evaluate_targets(bench)
    (res / "bench.json").write_text(json.dumps(bench))
    B.plot_levels(bench, res / "bench.png")
    reader = {"model": "m", "backends": ["torch", "onnx"], "lengths": [32], "runs": 50, "threads": 0, "max_seq_len": 384,
              "doc_stride": 128, "rows": [
                  {"backend": "torch", "passage_tokens": 32, "windows": 1, "sequence_tokens": 46, "n": 50, "p50_ms": 5.0, "p99_ms": 9.0},
                  {"backend": "onnx", "passage_tokens": 32, "windows": 1, "sequence_tokens": 46, "n": 50, "p50_ms": 2.0, "p99_ms": 3.0}],
              "gold_paragraph": {"torch": {"n": 300, "f1": 85.5, "exact_match": 76.0}}}
    (res / "reader.json").write_text(json.dumps(reader))
    (res / "route.json").write_text(json.dumps({"command": "shardqa eval-route dev.json --store ./idx --json", "result": {
        "recall": {"1": 0.7, "3": 0.9, "5": 0.93, "8": 0.96}, "mean_shards": 1.6, "mean_passage_tokens": 90.5,
        "p50_ms": 1.2, "p99_ms": 3.4, "baseline": {"recall": {"1": 0.6, "3": 0.8, "5": 0.85, "8": 0.9}}}}))
    if with_profile:
        (res / "profile.txt").write_text(RAW)
        (res / "profile.json").write_text(json.dumps({"rate": 100, "seconds": 20, "raw": "profile.txt", "requests": 400,
                                                      "p50_ms": 30.0, "summary": P.summarize(P.parse_collapsed(RAW))}))
    return res


def test_benchmarks_md_from_result_files(tmp_path):
    res = _results_dir(tmp_path)
    md_path = write_benchmarks_md(res, tmp_path / "BENCHMARKS.md", {"commands": ["benchmarks/run_all.sh", "shardqa bench-all"]})
    md = md_path.read_text()
    assert md.startswith("# Benchmarks\n") and "never edited by hand" in md
    assert "```\nbenchmarks/run_all.sh\nshardqa bench-all\n```" in md
    assert "**1 of 6 measured targets missed.**" in md
    assert "| cached p50 <= 3 ms | 4.0 ms (hit ratio 1.0) | **MISSED** |" in md
    assert "| CPU | Test CPU — 2 usable of 2 logical CPUs |" in md
    assert "| concurrency 16 | cold | 100 | 150.0 |" in md
    assert "![latency vs load](benchmarks/results/bench.png)" in md
    assert "naive baseline (in-process)" in md and "**10.00x at p50**" in md
    assert "| 32 | 1 x 46 | 5.00 | 9.00 | 2.00 | 3.00 |" in md
    assert "| shardqa router | 0.700 | 0.900 | 0.930 | 0.960 |" in md
    assert "| BM25 baseline, same passages | 0.600 | 0.800 | 0.850 | 0.900 |" in md
    assert "| mean_shards | 1.600 |" in md
    assert "Missed: cached p50 <= 3 ms." in md and "`run (session.py)`" in md
    assert "[`benchmarks/results/profile.txt`](benchmarks/results/profile.txt)" in md
    assert "end-to-end F1 >= 90% of the gold-paragraph F1 | 80.0 / 85.0 = 94.1%" in md


def test_benchmarks_md_says_when_no_profile_was_taken(tmp_path):
    res = _results_dir(tmp_path, with_profile=False)
    md = render({"bench": json.loads((res / "bench.json").read_text())}, tmp_path, res)
    assert "**No profile was taken in the last run**" in md
    assert "## Reader only, per backend\n\n_Not run._" in md


HOP = {"calls": 200, "shard": 0, "backend": "onnx-int8", "answers_differing": 0, "index_version": "v1", "rows": [
    {"call": "Ray actor call, no Serve (an empty method)", "p50_ms": 1.31, "p90_ms": 2.0, "n": 200},
    {"call": "Serve handle call to a deployment that does nothing", "p50_ms": 3.62, "p90_ms": 5.5, "n": 200},
    {"call": "Serve handle call to shard 0, one passage read", "p50_ms": 19.57, "p90_ms": 26.3, "n": 200},
    {"call": "the same read in this process (`ShardWorker.answer_batch`)", "p50_ms": 12.08, "p90_ms": 18.57, "n": 200}]}


def test_benchmarks_md_shows_the_hop_or_why_it_is_missing(tmp_path):
    res = _results_dir(tmp_path)
    md = render({"bench": json.loads((res / "bench.json").read_text())}, tmp_path, res)
    assert "One shard call's hop was not measured" in md and "--ray-address" in md

    (res / "hop.json").write_text(json.dumps(HOP))
    md = write_benchmarks_md(res, tmp_path / "BENCHMARKS.md").read_text()
    section = md.split("## Where the time goes")[1]
    assert "| Ray actor call, no Serve (an empty method) | 1.31 | 2.00 |" in section
    assert "| Serve handle call to shard 0, one passage read | 19.57 | 26.30 |" in section
    assert "200 timed calls per row" in section and "differed for 0 of them" in section
    assert section.index("| Ray actor call") < section.index("Missed: cached p50")  # the hop before the profile

    (res / "hop.json").write_text(json.dumps({"error": "ConnectionError: no Ray cluster at auto"}))
    md = write_benchmarks_md(res, tmp_path / "BENCHMARKS.md").read_text()
    assert "**The hop measurement failed:** `ConnectionError: no Ray cluster at auto`" in md


def test_the_hop_fails_at_once_when_nothing_listens_at_the_ray_address():
    from shardqa.services.bench_cli import run_hop

    port = free_port()  # bound and released: nothing listens there
    t0 = time.perf_counter()
    hop = run_hop(f"127.0.0.1:{port}", "no-index", "no-model", "onnx-int8", 3)
    assert hop["error"].startswith(f"ConnectionError: no Ray cluster at 127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 30


def _py_spy_can_attach() -> str | None:
    exe = P.py_spy()
    if exe is None:
        return "py-spy is not installed"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        proc = subprocess.run([exe, "dump", "--pid", str(sleeper.pid)], capture_output=True, text=True, timeout=30)
        return None if proc.returncode == 0 else f"py-spy cannot attach here: {proc.stderr.strip()[:200]}"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_bench_all_writes_every_result_and_benchmarks_md(tmp_path):
    reason = _py_spy_can_attach()
    if reason:
        # CI runs as root, where py-spy attaches: a skip there would hide the only run of bench-all.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    qfile = squad_file(tmp_path / "q.json")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_bench; "
                               f"test_bench.serve_fake_forever({str(qfile)!r}, {port}, 0.004)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out, md_path = tmp_path / "results", tmp_path / "BENCHMARKS.md"
        proc = subprocess.run(
            [sys.executable, "-m", "shardqa.cli", "bench-all", "--url", f"http://127.0.0.1:{port}", "--questions", str(qfile),
             "--limit", "4", "--concurrency", "1", "--rates", "40", "--model", str(REPO / "tests/fixtures/tiny-bert-qa"),
             "--backend", "torch", "--reader-backends", "torch", "--reader-runs", "3", "--reader-lengths", "32",
             "--store", str(tmp_path / "no-index"), "--profile-pid", str(server.pid), "--profile-seconds", "5",  # the load starts 2 s into the recording
             "--out", str(out), "--markdown", str(md_path), "--json"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # The stand-in answers odd-numbered questions wrongly: F1 is far below the reader's, a missed target.
    assert any(t["met"] is False for t in result["targets"])
    assert result["gold_paragraph"]["backend"] == "torch" and result["gold_paragraph"]["n"] == 8
    for name in ("bench.json", "bench.md", "bench.png", "reader.json", "reader.md", "reader.png", "route.json",
                 "profile.json", "profile.txt", "run.json"):
        assert (out / name).stat().st_size > 0, name
    profile = json.loads((out / "profile.json").read_text())
    assert "error" not in profile, profile.get("error")
    assert profile["requests"] > 0 and profile["summary"]["samples"] > 0
    assert any(f"{server.pid}:" in r["frame"] for r in profile["summary"]["processes"])
    route = json.loads((out / "route.json").read_text())
    # The store given holds no index: no figures, and the reason named.
    assert "result" not in route and route["command"].startswith("shardqa eval-route")
    assert "no-index" in route["error"], route
    md = md_path.read_text()
    for heading in ("## Commands", "## Targets", "## Machine", "## End to end, over HTTP", "## Reader only, per backend",
                    "## Routing (`shardqa eval-route`)", "## Where the time goes"):
        assert heading in md
    assert "**MISSED**" in md and "busy samples" in md
    assert "#### Where the time goes (the ingress's stage metrics)" in md and "| concurrency 1, cold |" in md
    # No index at --store: the one-process comparison says why it is missing, and the run goes on.
    assert "no index" in result["one_process"]["error"]
    assert "#### The model's share: the same questions in one process" in md and "not measured" in md
    assert str(REPO) not in md  # no machine paths for the repository


def test_in_process_runs_can_take_the_service_replicas_thread_count():
    from shardqa.config import get_settings
    from shardqa.services.bench_cli import _reference_settings

    assert _reference_settings("idx", "model", "onnx-int8", 2).threads == 2
    assert _reference_settings("idx", "model", "onnx-int8").threads == get_settings().threads  # SHARDQA_THREADS, else 0
