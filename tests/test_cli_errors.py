"""Bad input to any `shardqa` command is one line and a non-zero exit: usage
mistakes, malformed files, and (a safety net) failures no check names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny-bert-qa"


def shardqa(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "shardqa.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **(env or {})})


def one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("route", "x", "-k", "0"), "Invalid value for '-k' / '--k'"),
        (("route",), "Missing argument 'question'"),
        (("nosuch",), "No such command 'nosuch'"),
        (("route", "x", "--nope"), "No such option: --nope"),
    ],
)
def test_usage_mistakes_are_one_line_naming_the_help(args, expected):
    line = one_line(shardqa(*args))
    assert expected in line and "--help`)" in line


def test_an_unexpected_failure_is_still_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from shardqa import cli

    def broken(**_):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("SHARDQA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: RuntimeError: boom second line (unexpected; SHARDQA_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("SHARDQA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main()


@pytest.mark.parametrize("url, message", [
    ("http://[::1", "not a valid URL"),
    ("http://", "not a service URL: 'http://'"),
    ("ftp://x", "not a service URL"),
])
def test_query_names_a_bad_url(url, message):
    assert message in one_line(shardqa("query", "Who?", "--url", url))


@pytest.mark.parametrize("question, message", [
    ("  ", "the question is empty"),
    ("x" * 1001, "the limit is 1000"),
    ("???", "the question has no word the model knows"),
])
def test_route_checks_the_question_as_the_service_does(question, message, tmp_path):
    # before loading any index: the store named here does not even exist
    assert message in one_line(shardqa("route", question, "--store", str(tmp_path / "none")))


@pytest.mark.parametrize("command", ["bench", "bench-all"])
def test_benchmarks_refuse_a_bad_url_before_waiting_for_it(command, tmp_path):
    import time

    t0 = time.monotonic()
    proc = shardqa(command, "--url", "localhost:1", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "not a service URL" in one_line(proc)
    assert time.monotonic() - t0 < 30  # the ready wait is 60 s by default


def test_query_refuses_text_that_is_not_unicode():
    assert "not valid Unicode" in one_line(shardqa("query", "Who \udcff?", "--url", "http://127.0.0.1:1"))


@pytest.mark.slow  # a loopback HTTP server
@pytest.mark.parametrize("status, body, ctype, message", [
    (200, b"[1, 2]", "application/json", "not a shardqa answer"),
    (200, b'{"answers": [{"text": "x"}]}', "application/json", "not a shardqa answer"),
    (200, b"<html>hi</html>", "text/html", "not a shardqa answer"),
    (404, b"<html>\n<body>not found</body>\n</html>", "text/html", "HTTP 404 from"),
])
def test_query_against_something_that_is_not_shardqa(status, body, ctype, message):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        line = one_line(shardqa("query", "Who?", "--url", f"http://127.0.0.1:{server.server_address[1]}"))
        assert message in line and "<html>" not in line
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "data, where",
    [
        ({"data": ["x"]}, "data[0]: not in SQuAD v1.1 shape"),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, "data[0].paragraphs[0]: not in SQuAD v1.1 shape (missing 'context')"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q1", "question": "Who?", "answers": [{"text": "c"}]}]}]}]},
         "question 'q1': not in SQuAD v1.1 shape (missing 'answer_start')"),
        ({"data": [{"paragraphs": [{"context": 42, "qas": [{"id": "q1", "question": "Who?", "answers": []}]}]}]},
         "must be strings"),
    ],
)
def test_squad_files_of_the_wrong_shape_are_named(tmp_path, data, where):
    from shardqa.training.squad import SquadError, load_squad

    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SquadError, match="s.json") as info:
        load_squad(path)
    assert where in str(info.value)
    with pytest.raises(SquadError, match="is a folder"):
        load_squad(tmp_path)


def test_squad_questions_for_routing_name_the_wrong_shape(tmp_path):
    from shardqa.preprocessing.corpus import CorpusError, read_squad_questions

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "q", "question": "Who?", "answers": [{"text": "c"}]}]}]}]}))
    with pytest.raises(CorpusError, match=r"data\[0\].paragraphs\[0\]: not in SQuAD v1.1 shape \(missing 'answer_start'\)"):
        read_squad_questions(path)


@pytest.mark.parametrize("entry, message", [
    ({"replicas": 2.7}, "replicas must be a whole number, got 2.7"),
    ({"replicas": True}, "replicas must be a whole number"),
    ({"replicas": 10**9}, "needs 1 <= replicas <= 1000"),
    ({"num_cpus": float("nan")}, "finite, non-negative num_cpus"),
    ({"num_cpus": float("inf")}, "finite, non-negative num_cpus"),
])
def test_shards_config_refuses_fractional_absurd_and_non_finite_values(tmp_path, entry, message):
    import re

    from shardqa.config import Settings
    from shardqa.services.service_config import ServiceConfigError, make_service_config

    with pytest.raises(ServiceConfigError, match=re.escape(message)):
        make_service_config(Settings(), 2, {"default": entry})


def test_non_finite_settings_and_an_empty_store_are_refused():
    from pydantic import ValidationError

    from shardqa.config import Settings

    for field, value in (("num_cpus_per_replica", "inf"), ("num_cpus_per_replica", "nan"), ("store", "")):
        with pytest.raises(ValidationError):
            Settings(**{field: value})


@pytest.mark.parametrize("rates", ["nan", "inf", "0", "-1"])
def test_bench_rates_must_be_positive_and_finite(rates):
    from shardqa.services.bench import BenchError
    from shardqa.services.bench_cli import _floats

    with pytest.raises(BenchError, match="positive and finite"):
        _floats(rates, "--rates")


def test_bench_all_keeps_the_last_results_when_its_arguments_are_wrong(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("profile.json", "route.json", "hop.json"):
        (out / name).write_text("{}")
    proc = shardqa("bench-all", "--url", "http://127.0.0.1:1", "--out", str(out), "--markdown", str(tmp_path / "B.md"),
                   "--concurrency", "x")
    assert "--concurrency" in one_line(proc)
    assert sorted(p.name for p in out.iterdir()) == ["hop.json", "profile.json", "route.json"]


def test_bench_report_refuses_results_without_a_run(tmp_path):
    (tmp_path / "bench.json").write_text("{}")
    report = tmp_path / "B.md"
    assert "holds no load levels" in one_line(shardqa("bench-report", "--out", str(tmp_path), "--markdown", str(report)))
    (tmp_path / "bench.json").write_text("{bad")
    assert "not a results file" in one_line(shardqa("bench-report", "--out", str(tmp_path), "--markdown", str(report)))
    assert not report.exists()
    # Reader figures alone still make a report (its end-to-end part says "not run").
    (tmp_path / "bench.json").unlink()
    reader = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "reader.json"
    (tmp_path / "reader.json").write_text(reader.read_text())
    proc = shardqa("bench-report", "--out", str(tmp_path), "--markdown", str(report))
    assert proc.returncode == 0, proc.stderr
    assert report.exists()


def test_settings_refuse_nan_absurd_thread_counts_and_an_empty_cache_dir():
    for var, value, message in (
        ("SHARDQA_READ_FIRST_STOP_LOGIT", "nan", "NaN is not a number this setting can take"),
        ("SHARDQA_THREADS", "100000", "less than or equal to 256"),
        ("SHARDQA_CACHE_DIR", "", "must name a folder"),
        ("SHARDQA_TARGET_P50_MS", "-5", "greater than 0"),
        ("SHARDQA_ANSWER_TIMEOUT_S", "inf", "finite number"),
        ("SHARDQA_MERGE_ROUTE_WEIGHT", "inf", "finite number"),  # every score would be NaN
        ("SHARDQA_INDEX_REFRESH_S", "inf", "finite number"),
        ("SHARDQA_STARTUP_INDEX_WAIT_S", "inf", "finite number"),
    ):
        assert message in one_line(shardqa("config", env={var: value})), var
    # inf still means "always" where it is documented to.
    assert shardqa("config", env={"SHARDQA_READ_FIRST_STOP_LOGIT": "inf"}).returncode == 0


def test_a_misspelled_setting_is_named_not_silently_ignored():
    proc = shardqa("config", "--json", env={"SHARDQA_SHARD": "3"})
    assert proc.returncode == 0
    assert proc.stderr.strip() == ("warning: SHARDQA_SHARD is not a shardqa setting and is ignored "
                                   "(did you mean SHARDQA_SHARDS?); `shardqa config` lists them")


def test_a_misspelled_setting_in_dot_env_is_named_too(tmp_path):
    (tmp_path / ".env").write_text("SHARDQA_PORTT=9000\n")
    proc = shardqa("config", "--json", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stderr.strip() == ("warning: SHARDQA_PORTT (in .env) is not a shardqa setting and is ignored "
                                   "(did you mean SHARDQA_PORT?); `shardqa config` lists them")


def test_version():
    from shardqa import __version__

    proc = shardqa("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"shardqa {__version__}"


def test_help_texts_keep_their_defaults():
    out = shardqa("index", "--help").stdout
    assert "[default: SHARDQA_STORE, else ./shardqa-index]" in " ".join(out.split())
    out = " ".join(shardqa("serve", "--help").stdout.split())
    assert "[default: SHARDQA_PORT, else 8000]" in out and "[default: SHARDQA_BACKEND, else onnx-int8]" in out


def test_benchmarks_check_their_output_folder_before_running(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for command in (("bench-reader", "--runs", "1"), ("bench", "--url", "http://127.0.0.1:1")):
        assert "cannot write there" in one_line(shardqa(*command, "--out", str(blocker / "out")))


def test_an_unreachable_or_unreadable_kubeconfig_is_one_line(tmp_path):
    unreachable = tmp_path / "unreachable"
    unreachable.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster: {server: 'https://127.0.0.1:1'}\n  name: c\n"
        "contexts:\n- context: {cluster: c, user: u, namespace: ns}\n  name: x\ncurrent-context: x\n"
        "users:\n- name: u\n  user: {token: abc}\n"
    )
    assert "cannot reach the Kubernetes API server" in one_line(shardqa("cluster", "status", env={"KUBECONFIG": str(unreachable)}))
    broken = tmp_path / "broken"
    broken.write_text("a: [b\n")
    assert "cannot read the kubeconfig" in one_line(shardqa("cluster", "status", env={"KUBECONFIG": str(broken)}))


def test_index_warns_when_shards_outnumber_document_groups(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"Document {i} is about river{i}."}) for i in range(2)))
    proc = shardqa("index", str(corpus), "--store", str(tmp_path / "idx"), "--shards", "5",
                   "--model", str(TINY), "--encoder", "none", "--quiet")
    assert proc.returncode == 0, proc.stderr
    warning = [l for l in proc.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warning) == 1 and "3 of 5 shards hold no passage (shards 2, 3, 4)" in warning[0]  # one line
    assert (tmp_path / "idx" / "CURRENT").exists()


def test_shardqa_alone_prints_its_help():
    proc = shardqa()
    assert proc.returncode == 2 and "error:" not in proc.stderr
    assert proc.stdout.startswith("Usage:") and "Commands:" in proc.stdout and len(proc.stdout.splitlines()) > 10
    group = shardqa("cluster")
    assert "Usage:" in group.stdout and "status" in group.stdout and "error:" not in group.stderr


@pytest.mark.parametrize("args, message", [
    (("index", "corpus.jsonl", "--shards", "100000"), "less than or equal to 1024"),
    (("index", "corpus.jsonl", "--store", ""), "the index store is empty"),
    (("bench", "--url", "http://127.0.0.1:1", "--ready-timeout", "inf"), "must be a finite number"),
    (("bench-reader", "--threads", "100000"), "less than or equal to 256"),
    (("train", "run", "--lr", "-1"), "must be above 0"),
    (("train", "corpus.jsonl"), "is a file, not a folder"),
    (("cluster", "reindex", "--job-timeout", "inf"), "must be a finite number"),
    (("query", "\x01\x02", "--url", "http://127.0.0.1:1"), "only control or invisible characters"),
    (("query", "Who?", "--url", "http://127.0.0.1:99999"), "not a valid port"),
    (("route", "\u200b\u200e", "--store", "none"), "only control or invisible characters"),
    (("ask", "Who?", "-c", "\x01\x02\x03"), "the context is empty"),
])
def test_values_no_command_can_use_are_refused_at_once(args, message, tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "d", "text": "Bob went home."}\n')
    proc = shardqa(*args, cwd=tmp_path)
    assert message in one_line(proc)
    assert not (tmp_path / "CURRENT").exists()  # nothing written into the working directory


def test_empty_variables_mean_the_defaults():
    from shardqa.config import Settings

    s = Settings(_env_file=None, cache_url="", doc_stride=" ")
    assert (s.cache_url, s.doc_stride) == (None, None)


def test_a_password_in_a_service_url_is_not_shown():
    line = one_line(shardqa("query", "Who?", "--url", "http://user:s3cret@127.0.0.1:1"))
    assert "s3cret" not in line and "user:***@" in line


@pytest.mark.parametrize("variable, value, message", [
    ("SHARDQA_CACHE_URL", "http://x", "not a Redis URL"),
    ("SHARDQA_CACHE_URL", "redis://:s3cret@h:70000", "bad port"),
    ("SHARDQA_MODEL", "", "must name a model folder"),
    ("SHARDQA_DOC_STRIDE", "384", "SHARDQA_DOC_STRIDE='384': must be smaller than max_seq_len (384)"),
    ("SHARDQA_STORE", "ftp://x", "SHARDQA_STORE='ftp://x': unknown store URL scheme 'ftp'"),
    ("SHARDQA_HOST", "", "SHARDQA_HOST='': must name an address"),
])
def test_settings_that_can_never_work_are_refused_where_settings_are_read(variable, value, message):
    line = one_line(shardqa("config", env={variable: value}))
    assert message in line and "s3cret" not in line


def test_bench_without_load_levels_says_only_that(tmp_path):
    assert "no load levels" in one_line(shardqa("bench", "--url", "http://127.0.0.1:1", "--concurrency", ""))


def test_a_kubeconfig_without_a_server_address_is_named(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": ""}}], "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
    }))
    line = one_line(shardqa("cluster", "status", env={"KUBECONFIG": str(kubeconfig)}))
    assert "server address '' is not a URL" in line


def test_a_service_url_is_its_base_even_when_copied_with_the_endpoint():
    from shardqa.services.client import service_url

    for given in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/answer",
                  "http://127.0.0.1:8000/v1/answer/", "http://127.0.0.1:8000/v1/answer:batch"):
        assert service_url(given) == "http://127.0.0.1:8000", given
    assert service_url("http://h:8000/qa/v1/answer") == "http://h:8000/qa"  # a route prefix stays


def test_ctrl_c_while_a_command_waits_says_interrupted():
    """Ctrl-C: one line, `interrupted`, and exit 130 (not a quiet exit, not
    a traceback). The command waits on a server that never answers."""
    import os
    import signal
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(60)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardqa.cli", "query", "Who ruled Normandy?", "--url", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
            # A shell without job control starts background jobs with SIGINT
            # ignored, and a process that starts so never sees Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            conn, _ = server.accept()  # the request is on its way: the command is waiting
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "interrupted" and out == ""
