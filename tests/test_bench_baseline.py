"""The naive baseline: BM25 top-3 paragraphs, then AutoTokenizer +
AutoModelForQuestionAnswering per paragraph, argmax span, best paragraph wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardqa.services.baseline import NaiveBaseline, corpus_paragraphs, run_baseline
from shardqa.training.squad import SquadExample, squad_scores

TINY_MODEL = Path(__file__).resolve().parent / "fixtures" / "tiny-bert-qa"

PARAGRAPHS = [
    "The harbour of the old town is full of fishing boats and gulls.",
    "A zebra crossing lets people walk over the road; drivers must stop for them.",
    "Mountain goats climb steep cliffs in search of salt and fresh grass.",
    "The zebra is a striped animal of the African plains, related to horses.",
]


@pytest.fixture(scope="module")
def baseline() -> NaiveBaseline:
    return NaiveBaseline(str(TINY_MODEL), PARAGRAPHS)


def test_bm25_ranks_paragraphs_sharing_the_question_words(baseline):
    top = baseline.retrieve("Where do goats climb cliffs?")
    assert len(top) == 3 and top[0] == 2
    assert set(baseline.retrieve("zebra crossing road"))  >= {1, 3}
    assert baseline.retrieve("the of and") == [0, 1, 2]  # stop words only: nothing to rank by


class PeakModel:
    """Stands in for the network: start logit peaks on `start_word`, end logit
    on `end_word`, higher peaks in paragraphs containing `bonus_word`."""

    def __init__(self, tokenizer, start_word, end_word, bonus_word):
        self.start_id = tokenizer.convert_tokens_to_ids(start_word)
        self.end_id = tokenizer.convert_tokens_to_ids(end_word)
        self.bonus_id = tokenizer.convert_tokens_to_ids(bonus_word)
        self.seen_lengths = []

    def __call__(self, input_ids, **kw):
        ids = input_ids[0]
        self.seen_lengths.append(int(ids.shape[0]))
        bonus = 5.0 if bool((ids == self.bonus_id).any()) else 0.0
        start = torch.where(ids == self.start_id, 10.0 + bonus, 0.0).float()[None]
        end = torch.where(ids == self.end_id, 10.0 + bonus, 0.0).float()[None]
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_argmax_span_from_the_best_paragraph(baseline, monkeypatch):
    fake = PeakModel(baseline.tokenizer, "zebra", "road", "drivers")
    monkeypatch.setattr(baseline, "model", fake)
    ans = baseline.answer("What must drivers stop at on the zebra road?")
    # Paragraph 1 has zebra ... road and the bonus word; paragraph 3 has "zebra" but its end argmax cannot reach "road".
    assert ans.paragraph == 1
    assert ans.text == "zebra crossing lets people walk over the road"
    assert ans.score == pytest.approx(30.0)
    assert len(fake.seen_lengths) == 3  # one forward pass per retrieved paragraph, no batching


def test_question_tokens_never_become_the_answer(baseline, monkeypatch):
    # "goats" peaks in the question too; the span must come from the paragraph's tokens.
    fake = PeakModel(baseline.tokenizer, "goats", "cliffs", "salt")
    monkeypatch.setattr(baseline, "model", fake)
    ans = baseline.answer("goats cliffs salt")
    assert ans.text == "goats climb steep cliffs" and ans.paragraph == 2


def test_truncates_to_384_even_when_tokenizer_json_says_128(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["truncation"] = {"max_length": 128, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    tj["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                     "pad_type_id": 0, "pad_token": "[PAD]"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    long_paragraph = " ".join(f"word{i} is here." for i in range(300))
    b = NaiveBaseline(str(model_dir), [long_paragraph, "short text about nothing", "another short one"])
    fake = PeakModel(b.tokenizer, "is", "here", "word")
    b.model = fake
    b.answer("is word0 here?")
    assert max(fake.seen_lengths) == 384  # a long paragraph fills the 384 window, not 128
    assert min(fake.seen_lengths) < 20  # short ones are not padded


def test_run_baseline_scores_with_the_official_metric(baseline):
    examples = [
        SquadExample("a", "t", "Where do goats climb?", PARAGRAPHS[2], ("steep cliffs",), (0,)),
        SquadExample("b", "t", "What is striped?", PARAGRAPHS[3], ("The zebra",), (0,)),
        SquadExample("c", "t", "What do drivers do?", PARAGRAPHS[1], ("stop",), (0,)),
    ]
    out = run_baseline(baseline, examples, warmup=1)
    assert out["n"] == 3 and out["mode"] == "in-process"
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    expected = squad_scores(out["predictions"], examples)
    assert out["f1"] == pytest.approx(expected["f1"], abs=1e-3)
    assert out["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-3)
    for qid, text in out["predictions"].items():
        assert any(text in p for p in PARAGRAPHS)  # answers are spans of corpus paragraphs


def test_corpus_paragraphs_are_distinct_in_order():
    ex = [SquadExample(str(i), "t", "q", c, ("a",), (0,)) for i, c in enumerate(["p1", "p2", "p1", "p3", "p2"])]
    assert corpus_paragraphs(ex) == ["p1", "p2", "p3"]
