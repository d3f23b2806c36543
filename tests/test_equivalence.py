"""The reader answers exactly as the reference does.

The reference is the transformers 4.57 ``question-answering`` pipeline on the
tiny fixture model, recorded in ``tests/golden/pipeline_answers.json`` by
``tests/golden/make_golden.py`` (in its own environment: transformers 5 has no
such pipeline). For every recorded case — short passages, long passages cut
into doc-stride windows, unicode-heavy text, top-k, maximum answer lengths,
small windows, null answers and 150 random SQuAD dev questions — the reader's
answers must match in text, start and end exactly, in the same order, with
scores within 1e-4.

Then the ONNX backends: fp32 must give the same spans as torch with logits
within a small tolerance; dynamic INT8 must agree on the best span for the
large majority of cases (the rate is printed).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from shardqa.config import Settings
from shardqa.services.reader import ReadRequest, Reader, length_groups, passage_from_text

TESTS = Path(__file__).resolve().parent
FIXTURE = TESTS / "fixtures" / "tiny-bert-qa"
GOLDEN = json.loads((TESTS / "golden" / "pipeline_answers.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]
IDS = [c["name"] for c in CASES]

SCORE_ABS = 1e-4
#: The tiny model's scores are small (1e-4 .. 0.4), so an absolute tolerance
#: alone would let a lost score contribution through; float noise between
#: library versions is ~1e-6 relative.
SCORE_REL = 1e-3
#: fp32 ONNX Runtime vs torch logits (the tiny model's logits are O(1..10)).
ONNX_LOGIT_ATOL = 1e-3
#: Measured at 0.97-0.98 on this fixture (see the printed rate); the
#: threshold leaves a little room for other onnxruntime versions' kernels,
#: not for a regression of several points.
INT8_MIN_AGREEMENT = 0.95
#: Cases for the fp32 ONNX comparison: every hand-written case (long,
#: unicode, top-k, small windows, null answers) and every third SQuAD case.
ONNX_CASES = [c for i, c in enumerate(CASES) if not c["name"].startswith("squad-") or i % 3 == 0]


def config_of(case: dict) -> tuple:
    r = case["resolved"]
    return (r["max_seq_len"], r["doc_stride"], r["max_answer_len"], r["handle_impossible_answer"])


@functools.lru_cache(maxsize=None)
def onnx_cache() -> Path:
    # A private export cache: the tests neither depend on nor litter the
    # user's ~/.cache/shardqa.
    path = Path(tempfile.mkdtemp(prefix="shardqa-test-onnx-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def reader(backend: str, max_seq_len: int, doc_stride: int, max_answer_len: int, handle_impossible_answer: bool) -> Reader:
    return Reader.load(
        FIXTURE,
        backend=backend,
        settings=Settings(cache_dir=onnx_cache(), device="cpu"),
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
        max_answer_len=max_answer_len,
        handle_impossible_answer=handle_impossible_answer,
        threads=1,
    )


def spans(answers) -> list[tuple[str, int, int]]:
    return [(a.text, a.start, a.end) for a in answers]


def golden_spans(case: dict) -> list[tuple[str, int, int]]:
    return [(a["answer"], a["start"], a["end"]) for a in case["answers"]]


def assert_scores_close(got: list[float], want: list[float]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= SCORE_ABS, f"answer {i}: score {g!r} vs reference {w!r}"
        assert abs(g - w) <= SCORE_REL * abs(w), f"answer {i}: score {g!r} vs reference {w!r} (relative)"


def test_golden_file_is_for_this_fixture():
    """The golden answers belong to these exact model and tokenizer files."""
    recorded = GOLDEN["meta"]["fixture_sha256"]
    actual = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(FIXTURE.iterdir()) if p.is_file()}
    assert actual == recorded, "the fixture changed: regenerate tests/golden/pipeline_answers.json (see tests/golden/README.md)"
    assert GOLDEN["meta"]["transformers"].startswith("4.57.")


def test_golden_cases_cover_the_promised_ground():
    """Guard against a regenerated golden file silently losing coverage."""
    names = set(IDS)
    assert sum(n.startswith("squad-") for n in names) >= 150
    assert any(len(c["features"]) >= 5 for c in CASES), "long passages with several windows"
    assert {c["resolved"]["top_k"] for c in CASES} >= {1, 3, 10}
    assert {c["resolved"]["max_answer_len"] for c in CASES} >= {5, 15, 30}
    assert {(c["resolved"]["max_seq_len"], c["resolved"]["doc_stride"]) for c in CASES} >= {(384, 128), (128, 32), (64, 16)}
    assert any(a["answer"] == "" for c in CASES if c["resolved"]["handle_impossible_answer"] for a in c["answers"])
    assert any(c["answers"][0]["answer"] == "" for c in CASES), "a case where the null answer wins"
    assert any(len(c["features"]) > 1 and any(a["answer"] == "" for a in c["answers"]) for c in CASES), "null answer over several windows"
    assert sum(n.startswith("unicode-") for n in names) >= 9


def test_default_settings_are_the_pipeline_defaults():
    s = Settings(_env_file=None)
    assert (s.max_seq_len, s.doc_stride, s.max_answer_len, s.handle_impossible_answer) == (384, None, 15, False)


#: Cases that leave the window settings to the pipeline's defaults.
DEFAULT_WINDOW_CASES = [c for c in CASES if not {"doc_stride", "max_answer_len", "handle_impossible_answer"} & set(c["kwargs"])]


@pytest.mark.parametrize("case", DEFAULT_WINDOW_CASES, ids=[c["name"] for c in DEFAULT_WINDOW_CASES])
def test_the_readers_defaults_answer_as_the_pipelines(case):
    """The same answers when the reader picks its own stride, answer length
    and null-answer rule, as the pipeline picks its own."""
    r = Reader.load(FIXTURE, backend="torch", settings=Settings(_env_file=None, cache_dir=onnx_cache(), device="cpu"),
                    max_seq_len=case["kwargs"].get("max_seq_len"), threads=1)
    assert (r.max_seq_len, r.doc_stride) == (case["resolved"]["max_seq_len"], case["resolved"]["doc_stride"])
    got = r.answer(case["question"], [case["context"]], top_k=case["resolved"]["top_k"])
    assert spans(got) == golden_spans(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_answers_equal_reference(case):
    r = reader("torch", *config_of(case))
    got = r.answer(case["question"], [case["context"]], top_k=case["resolved"]["top_k"])
    assert spans(got) == golden_spans(case)
    assert_scores_close([a.score for a in got], [a["score"] for a in case["answers"]])
    for a in got:
        # Answers are the passage's own text, never rebuilt from tokens.
        assert a.text == case["context"][a.start : a.end]


@pytest.mark.parametrize("config", sorted({config_of(c) for c in CASES}), ids=str)
def test_batched_answers_equal_reference(config):
    """All cases of one configuration in ONE ``answer_batch`` call (windows of
    different lengths padded together), with passages placed at an offset in
    their document: the same answers, shifted into document coordinates."""
    cases = [c for c in CASES if config_of(c) == config]
    r = reader("torch", *config)
    requests = []
    for i, c in enumerate(cases):
        passage = passage_from_text(r.tokenizer, c["context"], passage_id=f"p{i}", doc_id=f"d{i}", shard=i % 3, doc_start=1000 * i)
        requests.append(ReadRequest(r.check_question(c["question"]), [passage], c["resolved"]["top_k"]))
    results = r.answer_batch(requests)
    assert len(results) == len(cases)
    for i, (c, got) in enumerate(zip(cases, results)):
        want = golden_spans(c)
        shifted = [(t, s + 1000 * i, e + 1000 * i) if (t, s, e) != ("", 0, 0) else (t, s, e) for t, s, e in want]
        assert spans(got) == shifted, c["name"]
        assert_scores_close([a.score for a in got], [a["score"] for a in c["answers"]])
        for a in got:
            if a.text:
                assert (a.passage_id, a.doc_id, a.shard) == (f"p{i}", f"d{i}", i % 3)


def test_windows_are_batched_with_windows_of_similar_length():
    """Padding is computed too: a window shares a forward pass only with
    windows it nearly fills, longest first, at most max_batch per pass."""
    lengths = [70, 140, 100, 128, 120, 60, 142]
    groups = length_groups(lengths, max_batch=64)
    assert groups == [[6, 1, 3, 4], [2], [0, 5]]
    assert [lengths[i] for i in groups[0]] == [142, 140, 128, 120]  # every one >= 0.8 x 142
    assert length_groups(lengths, max_batch=2) == [[6, 1], [3, 4], [2], [0, 5]]
    assert sorted(i for g in length_groups(lengths, 3) for i in g) == list(range(len(lengths)))
    assert length_groups([], 4) == []
    assert length_groups([50, 50, 50], 64, min_fill=1.0) == [[0, 1, 2]]


def test_several_passages_in_one_call():
    """Answers over two passages come back best first, each the text of the
    passage it names, and the best one is at least as good as either
    passage's own best answer."""
    short = [c for c in CASES if c["name"].startswith("short-") and c["resolved"]["top_k"] == 1]
    a, b = short[0], short[1]
    r = reader("torch", *config_of(a))
    passages = {
        "a": passage_from_text(r.tokenizer, a["context"], passage_id="a"),
        "b": passage_from_text(r.tokenizer, b["context"], passage_id="b", doc_start=500),
    }
    got = r.answer(a["question"], list(passages.values()), top_k=5)
    assert len(got) == 5
    assert [x.score for x in got] == sorted((x.score for x in got), reverse=True)
    for x in got:
        p = passages[x.passage_id]
        assert x.text == p.text[x.start - p.doc_start : x.end - p.doc_start]
    # Scores are per window (as the pipeline's), so one call over both
    # passages is the answers of each alone, merged by score.
    alone = sorted((x for p in passages.values() for x in r.answer(a["question"], [p], top_k=5)), key=lambda x: -x.score)[:5]
    assert [(x.passage_id, x.text, x.start, x.end) for x in got] == [(x.passage_id, x.text, x.start, x.end) for x in alone]
    assert_scores_close([x.score for x in got], [x.score for x in alone])


def test_answer_logit_is_the_span_margin_over_the_null_position():
    """What the ingress ranks answers from different passages by: start + end
    logit of the span minus those of the window's [CLS] (position 0)."""
    case = next(c for c in ONNX_CASES if len(window_logits(reader("torch", *config_of(c)), c)[0]) == 1)
    r = reader("torch", *config_of(case))
    start, end, _ = window_logits(r, case)
    q = r.tokenizer.tokenize(case["question"])
    p = r.tokenizer.tokenize(case["context"])
    (w,) = r.features(q, p)
    answers = r.answer(case["question"], [case["context"]], top_k=3)
    assert answers
    for a in answers:
        # the tokens whose characters the answer covers, exactly
        spans = {i: p.offsets[w.passage_start + i - w.context_offset] for i in range(w.context_offset, len(w.input_ids) - 1)}
        toks = [i for i, (b, e) in spans.items() if a.start <= b and e <= a.end and e > b]
        s, e = toks[0], toks[-1]
        expected = float(start[0, s] + end[0, e] - start[0, 0] - end[0, 0])
        assert a.logit == pytest.approx(expected, abs=1e-5)


# --- ONNX Runtime backends ------------------------------------------------------------------------

def window_logits(r: Reader, case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start/end logits of every window of the case (padded batch) and the mask."""
    q = r.tokenizer.tokenize(case["question"])
    p = r.tokenizer.tokenize(case["context"])
    windows = r.features(q, p)
    width = max(len(w.input_ids) for w in windows)
    ids = np.full((len(windows), width), r.tokenizer.pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        ids[i, :n], types[i, :n], mask[i, :n] = w.input_ids, w.token_type_ids, w.attention_mask
    start, end = r.backend.run(ids, types, mask)
    return np.asarray(start), np.asarray(end), mask.astype(bool)


@pytest.mark.parametrize("case", ONNX_CASES, ids=[c["name"] for c in ONNX_CASES])
def test_onnx_fp32_equals_torch(case):
    cfg = config_of(case)
    rt, ro = reader("torch", *cfg), reader("onnx", *cfg)
    assert ro.backend.name == "onnx"
    ts, te, mask = window_logits(rt, case)
    os_, oe, _ = window_logits(ro, case)
    np.testing.assert_allclose(os_[mask], ts[mask], atol=ONNX_LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(oe[mask], te[mask], atol=ONNX_LOGIT_ATOL, rtol=0)
    k = case["resolved"]["top_k"]
    got_t = rt.answer(case["question"], [case["context"]], top_k=k)
    got_o = ro.answer(case["question"], [case["context"]], top_k=k)
    assert spans(got_o) == spans(got_t)
    assert_scores_close([a.score for a in got_o], [a.score for a in got_t])


def test_onnx_int8_agrees_on_the_span_for_the_large_majority(capsys):
    agree = 0
    disagreements = []
    for case in CASES:
        cfg = config_of(case)
        best_t = reader("torch", *cfg).answer(case["question"], [case["context"]], top_k=1)
        best_q = reader("onnx-int8", *cfg).answer(case["question"], [case["context"]], top_k=1)
        assert len(best_q) == len(best_t) == 1
        if spans(best_q) == spans(best_t):
            agree += 1
        else:
            disagreements.append(case["name"])
    rate = agree / len(CASES)
    assert reader("onnx-int8", *config_of(CASES[0])).backend.name == "onnx-int8"
    with capsys.disabled():
        print(f"\nINT8 vs torch: same best span in {agree}/{len(CASES)} cases ({rate:.1%}); differing: {disagreements[:10]}")
    assert rate >= INT8_MIN_AGREEMENT, f"INT8 agreed on {rate:.1%} of best spans; expected at least {INT8_MIN_AGREEMENT:.0%}"


def test_a_stride_is_refused_when_it_leaves_no_room_for_a_question():
    from shardqa.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="doc_stride 60 leaves no room for a question in a window of 64 tokens"):
        Reader.load(FIXTURE, backend="torch", max_seq_len=64, doc_stride=60, threads=1)
    with pytest.raises(ValueError, match="must be smaller than max_seq_len"):
        Settings(_env_file=None, max_seq_len=64, doc_stride=64)


@pytest.mark.parametrize("case", [c for c in CASES if len(c["features"]) >= 3][:6], ids=lambda c: c["name"])
def test_ranking_by_logit_keeps_the_best_margins_over_every_window(case):
    """What a shard keeps of a passage cut into several windows: the top_k
    candidates by logit margin over all its windows (what the ingress merges
    on), not by the per-window probability the reference ranks by."""
    from shardqa.services.reader import ReadRequest

    r = reader("torch", *config_of(case))
    passage = passage_from_text(r.tokenizer, case["context"], passage_id="p")
    question = r.check_question(case["question"])
    everything = r.answer_batch([ReadRequest(question, [passage], 500)])[0]
    real = [a for a in everything if a.score > 0 and a.text.strip()]
    best = sorted(real, key=lambda a: a.logit, reverse=True)[:3]
    got = r.answer_batch([ReadRequest(question, [passage], 3, rank_by="logit")])[0]
    assert [(a.text, a.start, a.logit) for a in got] == [(a.text, a.start, a.logit) for a in best]
