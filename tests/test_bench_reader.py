"""Reader-only benchmark: passages of exact token lengths, per-backend rows,
gold-paragraph scores, table and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardqa.services import bench_reader as R
from shardqa.training.squad import SquadExample, squad_scores

TINY_MODEL = Path(__file__).resolve().parent / "fixtures" / "tiny-bert-qa"

TEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
        "their leader Rollo, agreed to swear fealty to King Charles III of West Francia. ") * 8


@pytest.fixture(scope="module")
def reader():
    from shardqa.services.reader import Reader

    return Reader.load(str(TINY_MODEL), "torch")


def _examples(n=4):
    return [SquadExample(f"q{i}", "t", f"Who gave their name to Normandy {i}?", TEXT + f" Paragraph {i}.", ("The Normans",), (0,))
            for i in range(n)]


@pytest.mark.parametrize("n_tokens", [1, 32, 200])
def test_cut_passage_has_exactly_n_tokens(reader, n_tokens):
    p = R.cut_passage(reader.tokenizer, TEXT, n_tokens, "p0")
    assert len(p.tokens) == n_tokens
    assert TEXT.startswith(p.text)
    assert len(reader.tokenizer.tokenize(p.text)) == n_tokens  # the text is the span of those tokens
    assert R.cut_passage(reader.tokenizer, "too short", 50, "p1") is None


def test_make_cases_uses_distinct_paragraphs_and_refuses_impossible_lengths(reader):
    ex = _examples(3) + _examples(1)  # a repeated paragraph is used once
    cases = R.make_cases(reader.tokenizer, ex, 64, 10)
    assert len(cases) == 3 and all(len(c.passage.tokens) == 64 for c in cases)
    with pytest.raises(R.BenchError, match="has 100000 tokens"):
        R.make_cases(reader.tokenizer, ex, 100000, 10)


def test_rows_per_backend_and_length(reader):
    readers = {"torch": reader, "torch-again": reader}
    rows = R.bench_lengths(readers, _examples(), [32, 384], runs=7, block=3, warmup=1, pairs=2)
    assert [(r["backend"], r["passage_tokens"]) for r in rows] == [
        ("torch", 32), ("torch-again", 32), ("torch", 384), ("torch-again", 384)]
    for r in rows:
        assert r["n"] == 7 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    by_len = {r["passage_tokens"]: r for r in rows}
    assert by_len[32]["windows"] == 1 and by_len[32]["sequence_tokens"] < 64
    # 384 passage tokens plus the question do not fit a 384-token window: read in two, as the service would.
    assert by_len[384]["windows"] == 2 and by_len[384]["sequence_tokens"] == reader.max_seq_len


def test_gold_paragraph_scores_match_the_official_metric(reader):
    ex = _examples(3)
    g = R.gold_paragraph_scores(reader, ex)
    assert g["n"] == 3
    expected = squad_scores(g["predictions"], ex)
    assert g["f1"] == pytest.approx(expected["f1"], abs=1e-3)
    assert all(text in TEXT + " Paragraph 0." or text == "" for text in g["predictions"].values())


@pytest.mark.slow
def test_bench_reader_command(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "N", "paragraphs": [
        {"context": TEXT + f" Part {i}.", "qas": [{"id": f"q{i}", "question": f"Who gave their name to Normandy, part {i}?",
                                                 "answers": [{"text": "The Normans", "answer_start": 0}]}]}
        for i in range(3)]}]}
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(squad))
    proc = subprocess.run(
        [sys.executable, "-m", "shardqa.cli", "bench-reader", "--model", str(TINY_MODEL), "--backends", "torch,onnx-int8",
         "--lengths", "32,64", "--runs", "4", "--questions", str(qfile), "--f1-questions", "2", "--out", str(tmp_path / "o"),
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert {(r["backend"], r["passage_tokens"]) for r in obj["rows"]} == {
        ("torch", 32), ("torch", 64), ("onnx-int8", 32), ("onnx-int8", 64)}
    assert set(obj["gold_paragraph"]) == {"torch", "onnx-int8"} and obj["gold_paragraph"]["torch"]["n"] == 2
    md = (tmp_path / "o" / "reader.md").read_text()
    assert "| passage tokens | windows x tokens | torch p50 ms | torch p99 ms | onnx-int8 p50 ms |" in md
    assert (tmp_path / "o" / "reader.png").read_bytes()[:4] == b"\x89PNG"
