"""Model inputs built from PRE-TOKENISED text equal the Hugging Face tokenizer's.

The reader never tokenises a passage on the hot path: it concatenates the
question's and the passage's token ids (``TextTokenizer.tokenize``) with the
model's pair template and cuts doc-stride windows itself (``Reader.features``).
These tests prove, window by window, that the result is exactly what

    tokenizer(question, passage, truncation='only_second', max_length=L,
              stride=S, return_overflowing_tokens=True)

gives — ids, token types, attention masks and the character offsets — both
against the current (transformers 5) fast tokenizer, property-based over
arbitrary unicode, and against the transformers 4.57 tokenizer's windows
recorded in ``tests/golden/pipeline_answers.json``.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from shardqa.errors import QuestionTooLong
from shardqa.services.reader import Reader
from shardqa.tokenization import TextTokenizer

TESTS = Path(__file__).resolve().parent
FIXTURE = TESTS / "fixtures" / "tiny-bert-qa"
GOLDEN = TESTS / "golden" / "pipeline_answers.json"

#: (max_seq_len, doc_stride) pairs the properties draw from: the pipeline's
#: default and progressively smaller windows, so that moderate texts already
#: need many overlapping windows.
WINDOWS = [(384, 128), (128, 32), (64, 16), (32, 8), (24, 4), (48, 0), (64, 40), (128, 96)]


@functools.lru_cache(maxsize=None)
def reader(max_seq_len: int, doc_stride: int) -> Reader:
    r = Reader.load(FIXTURE, backend="torch", max_seq_len=max_seq_len, doc_stride=doc_stride, threads=1)
    assert (r.max_seq_len, r.doc_stride) == (max_seq_len, doc_stride)
    return r


@functools.lru_cache(maxsize=None)
def hf_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    assert tok.is_fast
    return tok


def hf_windows(question: str, passage: str, max_seq_len: int, doc_stride: int):
    return hf_tokenizer()(
        question,
        passage,
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        return_attention_mask=True,
    )


def assert_windows_equal(r: Reader, question: str, passage: str, max_seq_len: int, doc_stride: int) -> int:
    """Compare every window; returns the number of windows."""
    q = r.tokenizer.tokenize(question)
    p = r.tokenizer.tokenize(passage)
    ours = r.features(q, p)
    # Hugging Face treats an empty string pair as "no pair" (no second [SEP]);
    # a passage without tokens is encoded like any other zero-token passage.
    ref = hf_windows(question, passage if passage else " ", max_seq_len, doc_stride)
    assert len(ours) == len(ref["input_ids"]), "number of windows"
    for i, w in enumerate(ours):
        for name in ("input_ids", "token_type_ids", "attention_mask"):
            got = getattr(w, name)
            assert got.dtype == np.int64 and got.ndim == 1, name
            assert got.tolist() == list(ref[name][i]), f"window {i}: {name}"
        assert len(w.input_ids) <= max_seq_len
        # Offsets: the reader answers from the pre-tokenised offsets, so the
        # slices it uses must be the reference's offset mapping.
        seq = ref.sequence_ids(i)
        offsets = ref["offset_mapping"][i]
        q_pos = [j for j, s in enumerate(seq) if s == 0]
        p_pos = [j for j, s in enumerate(seq) if s == 1]
        assert [tuple(offsets[j]) for j in q_pos] == [tuple(o) for o in q.offsets.tolist()]
        assert p_pos == list(range(w.context_offset, w.context_offset + (w.passage_end - w.passage_start))), f"window {i}: passage positions"
        assert [tuple(offsets[j]) for j in p_pos] == [tuple(o) for o in p.offsets[w.passage_start : w.passage_end].tolist()]
        # Word ids drive the widening of answers to whole words.
        words = ref.word_ids(i)
        assert [words[j] for j in p_pos] == p.word_ids[w.passage_start : w.passage_end].tolist()
    # Windows cover the passage in order, each one starting no later than the
    # previous one ended (the stride overlap), the last one at its end.
    if len(p):
        assert ours[0].passage_start == 0 and ours[-1].passage_end == len(p)
        for a, b in zip(ours, ours[1:]):
            assert a.passage_start < b.passage_start <= a.passage_end
    return len(ours)


# --- strategies ---------------------------------------------------------------------------

#: Every general category but surrogates (not encodable as UTF-8): letters of
#: every script (accents, CJK, Hangul ...), combining marks, digits,
#: punctuation, symbols (emoji), separators (spaces, line/paragraph
#: separators), controls (tabs, newlines, NUL) and format characters
#: (zero-width joiners, BOM, bidi marks, soft hyphens).
ANY_CHAR = st.characters(codec="utf-8", exclude_categories=("Cs",))
TRICKY_STRINGS = [
    "é", "e\u0301", "n\u0303", "Å", "ß", "İ", "ı", "ﬁ", "ǅ", "Σ", "\u212a",
    "東京", "北京大学", "한국어", "ひらがな", "カタカナ", "汉字", "𠀀",
    "🎉", "👩\u200d💻", "🧔🏽", "🇫🇷", "❤️", "1\ufe0f\u20e3", "🏳️\u200d🌈",
    "\u00a0", "\u2003", "\u200b", "\u3000", "\t", "\n", "\r\n", "\u2028", "\u00ad", "\ufeff",
    "\u202e", "\x00", "\x07", "\x1f", "\ufffd", "...", "—", "«", "»", "'", "\"", "$3.50", "1,000",
    "don't", "U.S.A.", "e-mail", "unaffable", "antidisestablishmentarianism",
]
WORD_LIST = (
    "the of and to in a is was for on as with by he at from his an were are which this be "
    "river city music played bridge population university century government war"
).split()
SEPARATOR_LIST = [" ", " ", " ", "", "\n", "\t", "  ", "\u00a0", "\u200b"]
TRICKY = st.sampled_from(TRICKY_STRINGS)
WORDS = st.sampled_from(WORD_LIST)
SEPARATORS = st.sampled_from(SEPARATOR_LIST)


def random_char(rng) -> str:
    """Any code point but surrogates, biased towards the BMP."""
    while True:
        cp = rng.randrange(0x30000) if rng.random() < 0.2 else rng.randrange(0x10000)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


@st.composite
def texts(draw, max_pieces: int, min_pieces: int = 0):
    if max_pieces <= 100:
        pieces = draw(st.lists(st.one_of(WORDS, TRICKY, st.text(ANY_CHAR, max_size=6)), min_size=min_pieces, max_size=max_pieces))
        seps = draw(st.lists(SEPARATORS, min_size=len(pieces), max_size=len(pieces)))
        return "".join(p + s for p, s in zip(pieces, seps))
    # Long texts: drawing hundreds of list elements one by one is slow, so a
    # drawn seed builds them from the same pools (words, tricky strings, raw
    # code points of every category) and separators.
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = rng.randint(min_pieces, max_pieces)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(WORD_LIST))
        elif r < 0.8:
            out.append(rng.choice(TRICKY_STRINGS))
        else:
            out.append("".join(random_char(rng) for _ in range(rng.randint(1, 6))))
        out.append(rng.choice(SEPARATOR_LIST))
    return "".join(out)


questions = texts(max_pieces=12)
passages = st.one_of(
    texts(max_pieces=40),  # short
    texts(min_pieces=60, max_pieces=400),  # long: several windows at most sizes
    texts(min_pieces=400, max_pieces=900),  # longer: several windows at the default size too
    st.text(ANY_CHAR, min_size=20, max_size=400),  # raw unicode soup
    st.sampled_from(["", " ", "\u200b", "\x00", "\n\t \u00a0", "\ufeff", "a", "🎉"]),  # empty-ish
)
window_sizes = st.sampled_from(WINDOWS)


# --- properties -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=st.one_of(texts(max_pieces=60), st.text(ANY_CHAR, max_size=200)))
def test_pretokenised_text_matches_tokenizer(text):
    """``TextTokenizer.tokenize`` (ids, offsets, word ids) equals the HF tokenizer on the same text."""
    tok = reader(384, 128).tokenizer
    ours = tok.tokenize(text)
    ref = hf_tokenizer()(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ours.ids.tolist() == list(ref["input_ids"])
    assert [tuple(o) for o in ours.offsets.tolist()] == [tuple(o) for o in ref["offset_mapping"]]
    assert ours.word_ids.tolist() == [-1 if w is None else w for w in ref.word_ids()]
    # Offsets point into the text, in order.
    for a, b in ours.offsets.tolist():
        assert 0 <= a <= b <= len(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(question=questions, passage=passages, sizes=window_sizes)
def test_windows_match_tokenizer(question, passage, sizes):
    """Every window built from pre-tokenised question and passage equals the
    tokenizer's overflowing ``only_second`` truncation of the raw pair."""
    max_seq_len, doc_stride = sizes
    r = reader(max_seq_len, doc_stride)
    q_len = len(r.tokenizer.tokenize(question))
    assume(q_len > 0)
    # The tokenizer itself refuses (panics) when the question leaves no more
    # room than the stride; the reader's refusal is tested separately.
    assume(max_seq_len - q_len - r.tokenizer.template.num_special > doc_stride)
    n = assert_windows_equal(r, question, passage, max_seq_len, doc_stride)
    event("windows: 1" if n == 1 else "windows: 2-4" if n <= 4 else "windows: 5+")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    question=st.lists(st.one_of(WORDS, TRICKY), min_size=16, max_size=30).map(" ".join),
    passage=st.lists(st.one_of(WORDS, TRICKY), min_size=30, max_size=120).map(" ".join),
)
def test_question_too_long_for_windows_is_refused(question, passage):
    """Where the question leaves no more than the stride per window and the
    passage overflows, the tokenizer cannot cut windows; the reader refuses
    with a typed error instead of building wrong ones."""
    max_seq_len, doc_stride = 24, 8
    r = reader(max_seq_len, doc_stride)
    q = r.tokenizer.tokenize(question)
    p = r.tokenizer.tokenize(passage)
    avail = max_seq_len - len(q) - r.tokenizer.template.num_special
    assume(len(q) > 0 and avail <= doc_stride and len(p) > max(avail, 0))
    with pytest.raises(QuestionTooLong):
        r.features(q, p)


# --- examples worth naming --------------------------------------------------------------------

@pytest.mark.parametrize(
    "question, passage",
    [
        ("Who?", "Pride and Prejudice is an 1813 novel of manners written by Jane Austen."),
        ("Where?", "東京は日本の首都です。Tokyo is the capital of Japan. 서울은 한국의 수도입니다."),
        ("What did Alice bring?", "Alice 👩\u200d💻 brought the cake 🎂 while Bob 🧔🏽 played 🎸."),
        ("Which?", "e\u0301te\u0301 n\u0303 Z\u0351\u0357a\u0352l\u0308g\u0300o"),
        ("What?", "tab\there\nnew line\u00a0nbsp\u2003em\u200bzw\r\ncrlf\u3000ideo"),
        ("Who?", "\ufeffThe letter\u00ad was signed\x07 by Dr.\u202eevil\u202c Smith\x1f \ufffd"),
        ("Where is İstanbul?", "İstanbul ß ﬁ ǅ ΣΊΣΥΦΟΣ \u212a"),
        ("empty", ""),
        ("empty-ish", " \t\n\u200b\u00a0"),
        ("long", " ".join(f"word{i} is a token of the passage number {i}." for i in range(400))),
    ],
)
@pytest.mark.parametrize("sizes", WINDOWS)
def test_named_examples(question, passage, sizes):
    n = assert_windows_equal(reader(*sizes), question, passage, *sizes)
    if passage.startswith("word0") and sizes != (384, 128):
        assert n > 5  # really exercises the stride


# --- against the 4.57 reference tokenizer's recorded windows ----------------------------------

GOLDEN_CASES = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
def test_windows_match_reference_features(case):
    """The windows the reader builds for each golden case are the ones the
    transformers 4.57 tokenizer built for the reference pipeline."""
    res = case["resolved"]
    r = reader(res["max_seq_len"], res["doc_stride"])
    q = r.tokenizer.tokenize(case["question"])
    p = r.tokenizer.tokenize(case["context"])
    ours = r.features(q, p)
    ref = case["features"]
    assert len(ours) == len(ref)
    for i, (w, f) in enumerate(zip(ours, ref)):
        assert w.input_ids.tolist() == f["input_ids"], f"window {i}"
        assert w.token_type_ids.tolist() == f["token_type_ids"], f"window {i}"
        assert w.attention_mask.tolist() == f["attention_mask"], f"window {i}"
        n = w.passage_end - w.passage_start
        ctx = f["offset_mapping"][w.context_offset : w.context_offset + n]
        assert ctx == p.offsets[w.passage_start : w.passage_end].tolist(), f"window {i}: offsets"
        # And the tokens before the passage are the template and the question.
        first_type_one = f["token_type_ids"].index(1)
        assert first_type_one == w.context_offset


def test_template_is_the_tokenizers_own():
    """The pair template read off the post-processor is BERT's [CLS] q [SEP] p [SEP]."""
    tok: TextTokenizer = reader(384, 128).tokenizer
    t = tok.template
    hf = hf_tokenizer()
    assert t.prefix.tolist() == [hf.cls_token_id]
    assert t.middle.tolist() == [hf.sep_token_id]
    assert t.suffix.tolist() == [hf.sep_token_id]
    assert (t.type_question, t.type_passage) == (0, 1)
    assert t.type_middle.tolist() == [0] and t.type_suffix.tolist() == [1]


def test_a_tokenizer_that_puts_the_passage_first_is_refused(tmp_path):
    import shutil

    from shardqa.errors import ModelNotFound

    folder = tmp_path / "left"
    shutil.copytree(FIXTURE, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    with pytest.raises(ModelNotFound, match="pads on the left"):
        TextTokenizer.from_pretrained(folder)
