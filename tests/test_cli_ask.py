"""`shardqa ask`: answers as JSON, and one-line errors (no traceback) for bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).parent / "fixtures" / "tiny-bert-qa"
CTX = "The Normans gave their name to Normandy, a region in France, in the 10th century."


def shardqa(*args, **kw):
    return subprocess.run([sys.executable, "-m", "shardqa.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def assert_user_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr


def test_json_answers_are_substrings_of_the_context():
    proc = shardqa("ask", "Who gave their name to Normandy?", "--context", CTX, "--model", str(TINY), "--backend", "torch", "--top-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    assert 1 <= len(answers) <= 3
    for a in answers:
        assert set(a) == {"text", "score", "start", "end"}
        assert CTX[a["start"] : a["end"]] == a["text"] and a["text"]
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


def test_context_file_is_read(tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CTX, encoding="utf-8")
    proc = shardqa("ask", "Where is Normandy?", "--context-file", str(f), "--model", str(TINY), "--backend", "torch", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["text"] in CTX


def test_context_from_standard_input():
    proc = shardqa("ask", "Where is Normandy?", "--context-file", "-", "--model", str(TINY), "--backend", "torch", "--json",
                   input=CTX)
    assert proc.returncode == 0, proc.stderr
    a = json.loads(proc.stdout)[0]
    assert CTX[a["start"]:a["end"]] == a["text"]
    bad = subprocess.run([sys.executable, "-m", "shardqa.cli", "ask", "What?", "-f", "-", "--model", str(TINY)],
                         input=b"\xff", capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"error: standard input is not valid UTF-8" in bad.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["   ", "--context", CTX], "question is empty"),
        (["why " * 300, "--context", CTX], "the limit is"),
        (["who " * 80, "--context", CTX], "tokens; this model allows"),
        (["Who?"], "exactly one of --context or --context-file"),
        (["Who?", "--context", "  "], "context is empty"),
    ],
)
def test_bad_input_is_one_line(args, fragment):
    assert_user_error(shardqa("ask", *args, "--model", str(TINY), "--backend", "torch"), fragment)


def test_missing_model_directory():
    assert_user_error(shardqa("ask", "Who?", "--context", CTX, "--model", "./no/such/model-dir"), "does not exist")


def test_model_without_qa_head(tmp_path):
    m = tmp_path / "encoder"
    shutil.copytree(TINY, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (m / "config.json").write_text(json.dumps(cfg))
    assert_user_error(shardqa("ask", "Who?", "--context", CTX, "--model", str(m)), "not a question-answering model")


def test_context_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert_user_error(shardqa("ask", "What?", "--context-file", str(f), "--model", str(TINY)), "not valid UTF-8")


def test_missing_context_file(tmp_path):
    assert_user_error(shardqa("ask", "What?", "--context-file", str(tmp_path / "nope.txt"), "--model", str(TINY)), "does not exist")


@pytest.mark.parametrize(
    "args",
    [
        ["train", "{run}", "--init-from", "/no/such/model-dir", "--data-dir", "{data}"],
        ["train", "{run}", "--base-model", "/no/such/model-dir", "--data-dir", "{data}"],
        ["index", "{corpus}", "--model", "/no/such/model-dir", "--store", "{data}"],
        ["ask", "Who?", "--context", CTX, "--model", "/no/such/model-dir"],
    ],
)
def test_every_command_names_a_missing_model_directory_alike(args, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "A", "text": CTX}) + "\n", encoding="utf-8")
    data = tmp_path / "data"
    proc = shardqa(*(a.format(run=tmp_path / "run", corpus=corpus, data=data) for a in args))
    assert_user_error(proc, "model directory /no/such/model-dir does not exist")
    # Checked before any work: no SQuAD download, no store written.
    assert not data.exists()


def test_index_takes_a_model_folder_under_the_home_directory(tmp_path):
    import os

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(TINY, home / "tiny-qa")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "A", "text": CTX}) + "\n", encoding="utf-8")
    proc = shardqa("index", str(corpus), "--store", str(tmp_path / "idx"), "--shards", "1", "--model", "~/tiny-qa", "--quiet",
                   env={**os.environ, "HOME": str(home), "SHARDQA_ROUTE_ENCODER": "none"})
    assert proc.returncode == 0, proc.stderr


def test_a_model_folder_without_config_is_refused_by_train(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = shardqa("train", str(tmp_path / "run"), "--base-model", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "data"))
    assert_user_error(proc, "has no config.json")
    assert not (tmp_path / "data").exists()


def test_onnx_providers_from_the_environment_comma_separated_or_json():
    import os

    from shardqa.config import Settings

    for value, expected in (("CPUExecutionProvider", ["CPUExecutionProvider"]),
                            ("CUDAExecutionProvider, CPUExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                            ('["CUDAExecutionProvider","CPUExecutionProvider"]', ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                            ("", [])):
        assert Settings(onnx_providers=value).onnx_providers == expected
    proc = shardqa("ask", "Who gave their name to Normandy?", "--context", CTX, "--model", str(TINY), "--backend", "torch",
                   "--json", env={**os.environ, "SHARDQA_ONNX_PROVIDERS": "CPUExecutionProvider"})
    assert proc.returncode == 0, proc.stderr
    proc = shardqa("ask", "Who?", "--context", CTX, "--model", str(TINY), env={**os.environ, "SHARDQA_ONNX_PROVIDERS": "[oops"})
    assert_user_error(proc, "invalid setting SHARDQA_ONNX_PROVIDERS='[oops': ")
