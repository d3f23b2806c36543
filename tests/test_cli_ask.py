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
