"""The shipped default model: intact, small, and answering easy SQuAD dev questions."""

import hashlib
import json
from pathlib import Path

import pytest

from shardqa.config import DEFAULT_MODEL_DIR

EASY = [
    (
        "Which NFL team represented the AFC at Super Bowl 50?",
        "Super Bowl 50 was an American football game to determine the champion of the National Football League (NFL) "
        "for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the National "
        "Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl title.",
        "Denver Broncos",
    ),
    (
        "In what country is Normandy located?",
        "The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who in the 10th and 11th "
        "centuries gave their name to Normandy, a region in France.",
        "France",
    ),
    (
        "What is the Latin name for Warsaw?",
        "Warsaw (Polish: Warszawa; see also other names) is the capital and largest city of Poland. Its Latin name is Varsovia.",
        "Varsovia",
    ),
    (
        "In what year was the University of Chicago founded?",
        "The University of Chicago was founded by the American Baptist Education Society and oil magnate John D. Rockefeller in 1890.",
        "1890",
    ),
]


def test_weights_match_the_recorded_checksum_and_fit_the_budget():
    meta = json.loads((DEFAULT_MODEL_DIR / "shardqa.json").read_text())
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["weights_sha256"]
    assert meta["weights_sha256"] in (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()) <= 50 * 1024 * 1024


def test_tokenizer_file_does_not_truncate_or_pad():
    spec = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())
    assert spec["truncation"] is None and spec["padding"] is None


@pytest.mark.parametrize("backend", ["torch", "onnx-int8"])
def test_answers_easy_dev_questions(backend):
    from shardqa.services.reader import Reader

    reader = Reader.load(DEFAULT_MODEL_DIR, backend)
    for question, context, expected in EASY:
        (best,) = reader.answer(question, [context])
        assert best.text.strip(" .") == expected, (question, best)
