"""`shardqa eval-route`: recall of the router against gold SQuAD answers.

A question counts as recalled at k when one of its gold answer spans lies
wholly inside one of the first k routed passages (same document, character
span inside the passage's span). The same passages are also ranked by a plain
BM25 retriever (bm25s with its English stop words and a Snowball stemmer over
the passage texts) in the same run, as the baseline; when the router uses dense
vectors, the same router without them (lexical blend only) is measured too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shardqa.errors import CorpusError, ShardQAError

KS = (1, 3, 5, 8)


@dataclass
class RouteEval:
    questions: int
    recall: dict[int, float]
    mean_shards: float
    mean_shards_at: dict[int, float]
    mean_passage_tokens: float
    p50_ms: float
    p99_ms: float
    baseline_recall: dict[int, float]
    missing_documents: int
    index_mean_passage_tokens: float
    #: the encoder id when the router blends dense scores, else None
    dense: str | None = None
    #: recall of the same router without the dense scores (only when ``dense``)
    lexical_recall: dict[int, float] | None = None
    lexical_mean_shards: float | None = None
    #: share of questions for which the dense encoder ran (the rest were lexically confident)
    dense_share: float | None = None
    mean_ms: float = 0.0
    #: questions the service would refuse (empty, too long, not text, no known word); left out of every figure
    refused: int = 0

    def to_json(self) -> dict:
        r = lambda d: {str(k): round(v, 4) for k, v in d.items()}  # noqa: E731
        return {
            "recall": r(self.recall),
            "mean_shards": round(self.mean_shards, 3),
            "mean_passage_tokens": round(self.mean_passage_tokens, 2),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "questions": self.questions,
            "refused": self.refused,
            "dense_share": None if self.dense_share is None else round(self.dense_share, 4),
            "baseline": {"recall": r(self.baseline_recall)},
            "dense": self.dense,
            **({"lexical": {"recall": r(self.lexical_recall), "mean_shards": round(self.lexical_mean_shards, 3)}}
               if self.lexical_recall is not None else {}),
        }


def _hits(router, gold_doc: int, spans, idx: np.ndarray) -> np.ndarray:
    ok = np.zeros(len(idx), dtype=bool)
    for j, i in enumerate(idx.tolist()):
        if router.p_doc[i] != gold_doc:
            continue
        a, b = int(router.p_span[i, 0]), int(router.p_span[i, 1])
        ok[j] = any(a <= s and e <= b for s, e in spans)
    return ok


def check_built_from(index_doc_ids, question_doc_ids, squad_path, version: str, store_url: str) -> int:
    """How many of the questions ask about a context the index lacks; an
    error when all of them do (the index was built from another corpus, and
    every figure measured on it would be noise)."""
    known = index_doc_ids if isinstance(index_doc_ids, (set, dict)) else set(index_doc_ids)
    missing = sum(d not in known for d in question_doc_ids)
    if missing == len(question_doc_ids):
        raise CorpusError(
            f"the index (version {version}) was not built from {squad_path}'s contexts: "
            f"build it first with: shardqa index {squad_path} --store {store_url}"
        )
    return missing


def service_questions(questions, max_chars: int | None, checker=None):
    """The questions as the service routes them (canonical text), and how many
    it would refuse before routing; a router measured on questions the
    service never routes would report figures no user sees. ``checker``
    (the service's QuestionChecker) adds its token checks."""
    from dataclasses import replace

    from shardqa.services.questions import check_question_text

    kept = []
    for q in questions:
        try:
            if checker is not None:
                text = checker.check_text(q.question)
                checker.tokenize(text)
            else:
                text = check_question_text(q.question, max_chars)
            kept.append(replace(q, question=text))
        except ShardQAError:
            pass
    if not kept:
        raise CorpusError(f"the service would refuse all {len(questions)} questions (empty, too long, not text or "
                          "without a word the model knows)")
    return kept, len(questions) - len(kept)


def evaluate_routing(router, store, squad_path, limit: int | None = None, baseline: bool = True,
                     max_chars: int | None = None, questions=None, checker=None) -> RouteEval:
    """``max_chars``: the service's question length limit (None: no limit);
    ``checker``: the service's QuestionChecker, whose checks replace it;
    ``questions``: ``squad_path``'s, when the caller has read them already."""
    from shardqa.preprocessing.corpus import read_squad_questions

    questions = read_squad_questions(squad_path) if questions is None else questions
    if limit:
        questions = questions[:limit]
    questions, refused = service_questions(questions, max_chars, checker)
    doc_index = {d: i for i, d in enumerate(router.doc_ids)}
    missing = check_built_from(doc_index, [q.doc_id for q in questions], squad_path, router.version, store.url)
    kmax = max(KS)
    hits = {k: 0 for k in KS}
    shards_at = {k: 0.0 for k in KS}
    tokens = 0.0
    lat: list[float] = []
    dense_used = 0
    # warm-up (first-call allocations) is not a routing latency
    for q in questions[:5]:
        _route(router, q, kmax)
    for q in questions:
        t = time.perf_counter()
        result = _route(router, q, kmax)
        lat.append((time.perf_counter() - t) * 1000.0)
        dense_used += result.dense
        idx = np.asarray([router_index(router, p.passage_id) for p in result.passages], dtype=np.int64)
        gold = doc_index.get(q.doc_id, -1)
        ok = _hits(router, gold, q.answers, idx)
        for k in KS:
            hits[k] += bool(ok[:k].any())
            shards_at[k] += len({p.shard for p in result.passages[:k]})
        tokens += float(router.p_tokens[idx].mean()) if len(idx) else 0.0
    n = len(questions)
    base = _baseline(router, store, questions, doc_index) if baseline else {k: float("nan") for k in KS}
    lexical, lexical_shards = None, None
    if getattr(router, "uses_dense", False):
        lexical, lexical_shards = _recall_of(router.with_params(w_dense=0.0, w_dense_doc=0.0), questions, doc_index)
    return RouteEval(
        questions=n,
        recall={k: hits[k] / n for k in KS},
        mean_shards=shards_at[kmax] / n,
        mean_shards_at={k: v / n for k, v in shards_at.items()},
        mean_passage_tokens=tokens / n,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_ms=float(np.mean(lat)),
        baseline_recall=base,
        missing_documents=missing,
        index_mean_passage_tokens=float(np.mean(router.p_tokens)) if len(router.p_tokens) else 0.0,
        dense=router.encoder.encoder_id if getattr(router, "uses_dense", False) else None,
        lexical_recall=lexical,
        lexical_mean_shards=lexical_shards,
        dense_share=dense_used / n if getattr(router, "uses_dense", False) else None,
        refused=refused,
    )


def _recall_of(router, questions, doc_index) -> tuple[dict[int, float], float]:
    """Recall at each k (and shards touched at the largest) of a router variant, untimed."""
    kmax = max(KS)
    hits = {k: 0 for k in KS}
    shards = 0
    for q in questions:
        try:
            idx, _ = router.top(q.question, kmax)
        except ShardQAError as exc:
            raise type(exc)(f"question {q.qid!r}: {exc}") from None
        ok = _hits(router, doc_index.get(q.doc_id, -1), q.answers, idx)
        for k in KS:
            hits[k] += bool(ok[:k].any())
        shards += len(set(router.p_shard[idx].tolist()))
    return {k: hits[k] / len(questions) for k in KS}, shards / len(questions)


def router_index(router, passage_id: str) -> int:
    table = getattr(router, "_pid_index", None)
    if table is None:
        table = router._pid_index = {p: i for i, p in enumerate(router.passage_ids)}
    return table[passage_id]


def _baseline(router, store, questions, doc_index) -> dict[int, float]:
    """Plain BM25 (bm25s) over the same passages' texts."""
    import bm25s
    import Stemmer

    texts = [""] * router.n_passages
    for s in range(router.manifest.shards):
        for p in store.load_shard(s, router.version):
            texts[router_index(router, p.passage_id)] = p.text
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    kmax = max(KS)
    q_tokens = bm25s.tokenize([q.question for q in questions], stopwords="en", stemmer=stemmer, show_progress=False)
    docs, _ = retriever.retrieve(q_tokens, k=min(kmax, len(texts)), show_progress=False, n_threads=1)
    hits = {k: 0 for k in KS}
    for q, row in zip(questions, docs):
        ok = _hits(router, doc_index.get(q.doc_id, -1), q.answers, np.asarray(row, dtype=np.int64))
        for k in KS:
            hits[k] += bool(ok[:k].any())
    return {k: hits[k] / len(questions) for k in KS}


def _route(router, q, k: int):
    """Route one SQuAD question; a refusal names the question to mend."""
    try:
        return router.route(q.question, k)
    except ShardQAError as exc:
        raise type(exc)(f"question {q.qid!r}: {exc}") from None

