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
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"


def shardqa(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "shardqa.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


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


def test_demo_workdir_that_cannot_be_a_folder_fails_in_one_line(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    proc = shardqa("demo", "--model", str(TINY), "--workdir", str(plain), "--port", str(free_port()))
    assert_one_line_error(proc, f"--workdir {plain}: exists and is not a folder")
    proc = shardqa("demo", "--model", str(TINY), "--workdir", str(plain / "sub"), "--port", str(free_port()))
    assert_one_line_error(proc, f"--workdir {plain / 'sub'}: cannot create it")


def test_demo_on_a_busy_port_fails_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = shardqa("demo", "--model", str(TINY), "--workdir", str(tmp_path), "--port", str(port))
    assert_one_line_error(proc, "already in use")


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from shardqa.config import DEFAULT_SAMPLE_CORPUS
    from shardqa.preprocessing.build import build_index

    store = tmp_path_factory.mktemp("serve-index")
    build_index(DEFAULT_SAMPLE_CORPUS, str(store), 2, str(TINY), encoder="none")
    return str(store)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# Each of these would fail only after Ray had started (or hang in ray.init)
# without the checks that run first; the timeouts stop a regression early.
def test_serve_on_a_busy_port_fails_before_ray_starts(tiny_index, busy_port):
    proc = shardqa("serve", "--store", tiny_index, "--model", str(TINY), "--port", str(busy_port), timeout=60,
                   env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, f"127.0.0.1:{busy_port} is already in use")
    assert "starting" not in proc.stderr


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("host, reason", [
    ("999.1.1.1", "not an IP address or a known host name"),
    ("nosuchhost.invalid", "not an IP address or a known host name"),
    ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never assigned to a host
])
def test_a_host_that_cannot_be_bound_is_named_as_such(tiny_index, tmp_path, command, host, reason):
    args = ["--store", tiny_index] if command == "serve" else ["--workdir", str(tmp_path)]
    proc = shardqa(command, *args, "--model", str(TINY), "--host", host, "--port", str(free_port()), timeout=60,
                   env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, f"cannot serve on {host}: ")
    assert reason in proc.stderr and "already in use" not in proc.stderr


def test_check_bind_tells_the_reasons_apart(busy_port):
    from shardqa.services.runtime import StartupError, check_bind

    check_bind("127.0.0.1", free_port())
    with pytest.raises(StartupError, match="already in use"):
        check_bind("127.0.0.1", busy_port)
    with pytest.raises(StartupError, match="not an address of this machine"):
        check_bind("192.0.2.1", free_port())
    with pytest.raises(StartupError, match="not an IP address"):
        check_bind("999.1.1.1", free_port())
    with pytest.raises(StartupError, match="empty host"):
        check_bind(" ", free_port())


@pytest.mark.parametrize("env, args", [({}, ["--ray-address", "127.0.0.1:{port}"]), ({"RAY_ADDRESS": "127.0.0.1:{port}"}, [])])
def test_serve_with_no_ray_cluster_at_the_address_fails_at_once(tiny_index, env, args):
    port = str(free_port())
    t0 = time.monotonic()
    proc = shardqa("serve", "--store", tiny_index, "--model", str(TINY), *(a.format(port=port) for a in args), timeout=60,
                   env={k: v.format(port=port) for k, v in env.items()})
    assert_one_line_error(proc, f"no Ray cluster at 127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30


def test_addresses_ray_resolves_by_itself_are_not_probed(monkeypatch):
    from shardqa.services.runtime import check_reachable, ray_address

    for address in (None, "", "auto", "local", "ray://head:10001"):
        check_reachable(address)  # no error, no connection attempt
    # Ray's "local" is the embedded Ray, which serve sizes, checks and stops itself.
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_address(None) is None and ray_address("local") is None
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"


def test_the_demo_caches_in_process_whatever_the_environment_says(monkeypatch, tmp_path):
    from shardqa.config import Settings
    from shardqa.services.demo import demo_settings

    monkeypatch.setenv("SHARDQA_CACHE_URL", "redis://127.0.0.1:1/0")
    base = Settings()
    assert base.cache_url == "redis://127.0.0.1:1/0"
    settings = demo_settings(base, tmp_path / "index", "127.0.0.1", 8123)
    assert settings.cache_url is None and settings.store == str(tmp_path / "index") and settings.port == 8123


def test_serve_with_an_unreachable_answer_cache_fails_at_once(tiny_index):
    proc = shardqa("serve", "--store", tiny_index, "--model", str(TINY), "--port", str(free_port()),
                   "--cache-url", f"redis://127.0.0.1:{free_port()}/0", timeout=60, env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, "the answer cache: cannot reach Redis at redis://127.0.0.1:")
    # A Redis Cluster URL with no node answering (redis-py raises a non-Redis error for it).
    proc = shardqa("serve", "--store", tiny_index, "--model", str(TINY), "--port", str(free_port()),
                   "--cache-url", f"redis+cluster://127.0.0.1:{free_port()}", timeout=60, env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, "the answer cache: cannot reach Redis at redis+cluster://127.0.0.1:")
    proc = shardqa("serve", "--store", tiny_index, "--model", str(TINY), "--port", str(free_port()),
                   timeout=60, env={"RAY_ADDRESS": "", "SHARDQA_CACHE_URL": "http://127.0.0.1:1"})
    # Refused where settings are read, before anything starts.
    assert_one_line_error(proc, "SHARDQA_CACHE_URL='http://127.0.0.1:1': not a Redis URL")


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("port", ["0", "70000"])
def test_ports_out_of_range_are_refused_by_the_option(tmp_path, command, port):
    proc = shardqa(command, "--model", str(TINY), "--workdir" if command == "demo" else "--store", str(tmp_path), "--port", port)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Invalid value for '--port'" in proc.stderr and "validation error" not in proc.stderr


def test_demo_takes_host_and_port_from_the_settings(tmp_path, busy_port):
    proc = shardqa("demo", "--model", str(TINY), "--workdir", str(tmp_path), env={"SHARDQA_PORT": str(busy_port)})
    assert_one_line_error(proc, f"127.0.0.1:{busy_port} is already in use")
    proc = shardqa("demo", "--model", str(TINY), "--workdir", str(tmp_path), env={"SHARDQA_HOST": "999.1.1.1"})
    assert_one_line_error(proc, "cannot serve on 999.1.1.1")
    proc = shardqa("demo", "--model", str(TINY), "--workdir", str(tmp_path), env={"SHARDQA_PORT": "0"})
    assert_one_line_error(proc, "invalid setting SHARDQA_PORT='0': Input should be greater than or equal to 1")


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_query_refuses_a_timeout_that_is_not_a_positive_number(timeout):
    proc = shardqa("query", "Who?", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", timeout)
    assert_one_line_error(proc, "--timeout must be a positive number of seconds")


def test_the_client_accepts_a_base_url_with_a_trailing_slash():
    import httpx

    from shardqa.services.client import ask

    paths = []

    def answer(request):
        paths.append(request.url.path)
        return httpx.Response(200, json={"answers": [], "cached": False, "index_version": "v"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        for url in ("http://127.0.0.1:8000/", "http://127.0.0.1:8000//", "http://127.0.0.1:8000"):
            assert ask(url, "Who?", client=client)["index_version"] == "v"
    assert paths == ["/v1/answer"] * 3


def test_query_without_a_service_fails_in_one_line():
    proc = shardqa("query", "Who?", "--url", f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "cannot reach")


def test_the_demo_judges_its_sample_answers_against_the_gold_ones():
    from shardqa.config import DEFAULT_SAMPLE_CORPUS
    from shardqa.services.demo import judge, sample_questions

    samples = sample_questions(DEFAULT_SAMPLE_CORPUS)
    assert len(samples) == 4 and all(q.endswith("?") and gold for q, gold, _ in samples)
    assert samples[0] == ("In what country is Normandy located?", ("France",) * 4, "Normans#0")
    assert judge("the France", ("France",)) == "matches the gold answer"
    assert (judge("Normandy", ("France",), "Normans#39", "Normans#0")
            == "gold answer 'France', missed: the answer is from Normans#39, the gold answer from Normans#0")
    assert judge("France", ("France",), "Normans#39", "Normans#0") == "matches the gold answer"
    assert judge("northern France", ("France", "France.")) == "gold answer 'France' (F1 0.67)"
    assert judge("Rollo", ("France",)) == "gold answer 'France', missed"
    assert judge("", ("France",)) == "gold answer 'France', missed"
    assert judge("anything", ()) == ""


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


def test_demo_index_is_rebuilt_when_the_encoder_is_switched_on_or_off(tmp_path, monkeypatch):
    from shardqa.config import DEFAULT_SAMPLE_CORPUS, get_settings
    from shardqa.preprocessing.store import open_store
    from shardqa.services.demo import demo_index
    from shardqa.tokenization import TextTokenizer

    tok = TextTokenizer.from_pretrained(TINY)
    store = tmp_path / "index"
    monkeypatch.setenv("SHARDQA_CACHE_DIR", str(tmp_path / "cache"))

    def build(encoder_setting):
        monkeypatch.setenv("SHARDQA_ROUTE_ENCODER", encoder_setting)
        get_settings.cache_clear()
        try:
            version, reused = demo_index(DEFAULT_SAMPLE_CORPUS, store, 2, str(TINY), tok)
        finally:
            get_settings.cache_clear()
        return reused, open_store(str(store)).manifest(version).params.get("encoder")

    # The tiny model's BERT body stands in for an encoder.
    assert build("none") == (False, None)
    assert build("none") == (True, None)
    reused, enc = build(str(TINY))
    assert not reused and enc is not None
    assert build(str(TINY)) == (True, enc)
    assert build("none") == (False, None)


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
        # Each is judged against its SQuAD gold answer.
        assert out.count("matches the gold answer") + out.count("gold answer '") == 4

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


def test_a_failed_serve_start_stops_the_embedded_ray_and_says_what_failed(monkeypatch):
    """Serve's HAProxy manager can fail to start on a saturated machine: the
    user gets one line saying so (not Ray's remote traceback), and nothing of
    the failed start is left running."""
    import ray
    from ray import serve

    from shardqa.services import runtime
    from shardqa.services.runtime import StartupError

    stopped = []
    monkeypatch.setattr(runtime, "fast_ingress_env", lambda on: {})
    monkeypatch.setattr(runtime, "start_ray", lambda *a, **k: True)
    monkeypatch.setattr(runtime, "stop_haproxy", lambda before: stopped.append("haproxy"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: stopped.append("ray"))

    def failing_start(**kwargs):
        raise RuntimeError("ray::HAProxyManager.ready() (pid=1) ... Traceback (most recent call last): ...")

    monkeypatch.setattr(serve, "start", failing_start)
    config = SimpleNamespace(settings=SimpleNamespace(fast_ingress=True))
    with pytest.raises(StartupError, match="HAProxy ingress did not start.*SHARDQA_FAST_INGRESS=false"):
        runtime.deploy(config, "127.0.0.1", free_port())
    assert stopped == ["ray", "haproxy"]

    def other_failure(**kwargs):
        raise ValueError("something else")

    monkeypatch.setattr(serve, "start", other_failure)
    with pytest.raises(ValueError, match="something else"):
        runtime.deploy(config, "127.0.0.1", free_port())


def test_the_printed_command_runs_from_where_the_demo_was_started(monkeypatch, tmp_path):
    import os
    import shutil
    import sys

    from shardqa.services.demo import cli_command

    monkeypatch.setattr(shutil, "which", lambda name: None)
    script = tmp_path / ".venv" / "bin" / "shardqa"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    assert cli_command() == os.path.join(".venv", "bin", "shardqa")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not below here: the absolute path, not ../.venv/...
    assert cli_command() == str(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["-m"])  # python -m shardqa.cli demo
    assert cli_command().endswith(" -m shardqa.cli")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/bin/shardqa")
    assert cli_command() == "shardqa"
