"""`shardqa demo` and `shardqa query`: one-line errors for bad input, the demo
index reused across runs, and a whole demo run (embedded Ray Serve) queried
by the client and stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"


def shardqa(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "shardqa.cli", *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(proc, fragment: str):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert fragment in proc.stderr


def test_demo_with_a_missing_model_fails_in_one_line(tmp_path):
    proc = shardqa("demo", "--model", str(tmp_path / "nope"), "--workdir", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(proc, "does not exist")


def test_demo_on_a_busy_port_fails_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = shardqa("demo", "--model", str(TINY), "--workdir", str(tmp_path), "--port", str(port))
    assert_one_line_error(proc, "already in use")


def test_query_without_a_service_fails_in_one_line():
    proc = shardqa("query", "Who?", "--url", f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "cannot reach")


def test_demo_index_is_built_once_and_rebuilt_when_inputs_change(tmp_path):
    from shardqa.config import DEFAULT_SAMPLE_CORPUS
    from shardqa.services.demo import demo_index
    from shardqa.tokenization import TextTokenizer

    tok = TextTokenizer.from_pretrained(TINY)
    store = tmp_path / "index"
    v1, reused1 = demo_index(DEFAULT_SAMPLE_CORPUS, store, 2, str(TINY), tok)
    v2, reused2 = demo_index(DEFAULT_SAMPLE_CORPUS, store, 2, str(TINY), tok)
    v3, reused3 = demo_index(DEFAULT_SAMPLE_CORPUS, store, 3, str(TINY), tok)
    assert (reused1, reused2, reused3) == (False, True, False)
    assert v1 == v2 != v3


@pytest.mark.ray
@pytest.mark.slow
def test_demo_serves_answers_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardqa.cli", "demo", "--model", str(TINY), "--backend", "torch", "--shards", "2",
         "--workdir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 900
        while not any(l.startswith("serving; Ctrl-C stops.") for l in lines):
            assert proc.poll() is None, "".join(lines) + proc.stderr.read()
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
        out = "".join(lines)
        assert "ready in" in out and f"http://127.0.0.1:{port}/v1/answer" in out and "curl -s" in out
        assert out.count("  Q: ") == 4 and out.count("  A: ") == 4  # one sample question per article

        q = shardqa("query", "Who gave their name to Normandy?", "--url", f"http://127.0.0.1:{port}", "--json", "--top-k", "2")
        assert q.returncode == 0, q.stderr
        body = json.loads(q.stdout)
        assert set(body) == {"answers", "cached", "index_version"} and 1 <= len(body["answers"]) <= 2
        text = shardqa("query", "Who gave their name to Normandy?", "--url", f"http://127.0.0.1:{port}", "--top-k", "2")
        assert text.returncode == 0, text.stderr
        assert "· cached ·" in text.stdout  # the second ask is a cache hit
        assert body["answers"][0]["text"] in text.stdout

        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "stopping" in rest and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
