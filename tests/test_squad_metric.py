"""The official SQuAD v1.1 metric, on hand-checked cases."""

import json

import pytest

from shardqa.training.squad import (
    SquadError,
    exact_match_score,
    f1_score,
    load_squad,
    normalize_answer,
    squad_scores,
    SquadExample,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a  cat, an apple and THE dog. ", "cat apple and dog"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("1,000 B.C.", "1000 bc"),
        ("", ""),
    ],
)
def test_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match_score("the Normans", "Normans.") == 1.0
    assert exact_match_score("Normans", "Norman") == 0.0


def test_f1_token_overlap():
    # pred tokens: [denver, broncos]; gold: [broncos] -> p=1/2, r=1 -> f1=2/3
    assert f1_score("Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    # repeated tokens count as a multiset
    assert f1_score("the the cat cat", "cat") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert f1_score("", "cat") == 0.0


def test_scores_take_the_best_gold_answer_and_count_missing_as_zero():
    ex = [
        SquadExample("q1", "t", "?", "c", ("Denver Broncos", "Broncos", "the Broncos"), (0, 7, 0)),
        SquadExample("q2", "t", "?", "c", ("1066",), (0,)),
        SquadExample("q3", "t", "?", "c", ("Rollo",), (0,)),
    ]
    s = squad_scores({"q1": "Broncos", "q2": "in 1066"}, ex)
    assert s["n"] == 3
    assert s["exact_match"] == pytest.approx(100 / 3)
    # q1: 1.0; q2: pred [in, 1066] vs [1066] -> 2/3; q3 missing -> 0
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_load_squad_reads_and_rejects(tmp_path):
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "Rollo led the Normans.", "qas": [
        {"id": "a", "question": "Who led?", "answers": [{"text": "Rollo", "answer_start": 0}]}]}]}]}))
    (ex,) = load_squad(good)
    assert ex.context[ex.answer_starts[0]:].startswith(ex.answers[0])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SquadError, match="not a valid SQuAD JSON"):
        load_squad(bad)
    with pytest.raises(SquadError, match="no such file"):
        load_squad(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[1, 2]")
    with pytest.raises(SquadError, match="no top-level 'data'"):
        load_squad(wrong)
