"""The reader: a question plus pre-tokenised passages in, answers out.

Model inputs are assembled from token ids produced ahead of time (no text is
tokenised on the hot path but the question), and spans are decoded exactly as
the transformers 4.57 `question-answering` pipeline does: per-window softmax,
joint start/end scoring with start <= end and a maximum length, top-k,
optional null answer, and widening to whole words. Tests prove both against
the reference tokenizer and pipeline.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from shardqa.config import Settings, get_settings
from shardqa.errors import InvalidContext, InvalidQuestion, ModelNotFound, NotAQAModel, QuestionTooLong
from shardqa.services.questions import QuestionChecker, max_question_tokens, window_stride
from shardqa.tokenization import TextTokenizer
from shardqa.types import Answer, Passage, TokenizedText

log = logging.getLogger(__name__)

#: Masked logits take this value before the softmax, as in the reference.
_MASKED = -10000.0


@dataclass(frozen=True)
class Window:
    """One (question, passage slice) model input, unpadded."""

    input_ids: np.ndarray  # int64 [L]
    token_type_ids: np.ndarray  # int64 [L]
    attention_mask: np.ndarray  # int64 [L]
    passage_start: int  # first passage token in this window
    passage_end: int  # one past the last
    context_offset: int  # sequence position of the first passage token


@dataclass(frozen=True)
class ReadRequest:
    question: TokenizedText
    passages: Sequence[Passage]
    top_k: int = 1
    #: Which ``top_k`` candidates to keep: the reference pipeline's, by
    #: ``score`` (a probability within one window), or by ``logit`` (the
    #: span's margin over its window's null position), which the ingress
    #: ranks answers from several passages by. The two agree within one
    #: window; over a passage cut into several, only the logit compares.
    rank_by: str = "score"


#: A window joins a padded batch only if it is at least this share of the
#: batch's longest: on the 2-core machine (INT8, 2 threads) one batch of two
#: windows took 0.91x the time of two single passes at equal length, 0.97x at
#: 128 and 100 tokens, and 1.24x at 140 and 60 (padding is computed too), while
#: four equal windows in one batch took 0.8x.
MIN_BATCH_FILL = 0.8


def length_groups(lengths: Sequence[int], max_batch: int, min_fill: float = MIN_BATCH_FILL) -> list[list[int]]:
    """Indices of ``lengths`` in batches for padded forward passes: longest
    first, each batch at most ``max_batch`` long and holding only windows at
    least ``min_fill`` of its first (longest) one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and len(g) < max_batch and lengths[i] >= min_fill * lengths[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def passage_from_text(tokenizer: TextTokenizer, text: str, passage_id: str = "context", doc_id: str = "", shard: int = -1, doc_start: int = 0) -> Passage:
    return Passage(passage_id, doc_id, shard, text, doc_start, tokenizer.tokenize(text))


class Reader:
    def __init__(self, tokenizer: TextTokenizer, backend, model_id: str, *, max_seq_len: int, doc_stride: int, max_answer_len: int, max_question_len: int, max_question_chars: int, handle_impossible_answer: bool, max_batch_windows: int = 64):
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_id = model_id
        self.max_seq_len = max_seq_len
        self.doc_stride = doc_stride
        self.max_answer_len = max_answer_len
        self.questions = QuestionChecker(tokenizer, max_question_chars, max_question_len)
        self.handle_impossible_answer = handle_impossible_answer
        self.max_batch_windows = max_batch_windows

    # --- construction ------------------------------------------------------------

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str | None = None, *, settings: Settings | None = None, max_seq_len: int | None = None, doc_stride: int | None = None, max_answer_len: int | None = None, handle_impossible_answer: bool | None = None, threads: int | None = None, providers: list[str] | None = None, device: str | None = None, threads_under_load: int = 0) -> "Reader":
        """``threads_under_load``: also ready the model to run with that many
        threads for ``answer_batch(..., under_load=True)`` (a service's
        shards; 0: always ``threads``)."""
        from shardqa.services.backends import load_backend, resolve_device

        s = settings or get_settings()
        model_dir = resolve_model_dir(str(model or s.model), s.cache_dir)
        check_qa_model(model_dir)
        tokenizer = TextTokenizer.from_pretrained(model_dir)
        seq = max_seq_len or s.max_seq_len
        seq = min(seq, tokenizer.model_max_length)
        stride = window_stride(doc_stride if doc_stride is not None else s.doc_stride, seq)
        max_question = max_question_tokens(s, tokenizer, seq, stride)
        kind = backend or s.backend
        be = load_backend(
            kind,
            model_dir,
            device=resolve_device(device or s.device),
            threads=s.threads if threads is None else threads,
            cache_dir=s.cache_dir,
            providers=providers if providers is not None else s.onnx_providers,
            spin_wait=s.onnx_spin_wait,
            threads_under_load=threads_under_load,
        )
        return cls(
            tokenizer,
            be,
            model_id=_model_id(model_dir),
            max_seq_len=seq,
            doc_stride=stride,
            max_answer_len=max_answer_len or s.max_answer_len,
            max_question_len=max_question,
            max_question_chars=s.max_question_chars,
            handle_impossible_answer=s.handle_impossible_answer if handle_impossible_answer is None else handle_impossible_answer,
        )

    @property
    def adapts_threads(self) -> bool:
        """Whether ``under_load`` passes run on fewer threads than the others
        (not when threads_under_load >= threads, nor on a GPU)."""
        return self.backend.threads_under_load is not None

    # --- inputs --------------------------------------------------------------------

    def check_question(self, question: str) -> TokenizedText:
        """Validate and tokenise a question (the ingress applies the same checks)."""
        self.questions.check_text(question)
        return self.questions.tokenize(question)

    def features(self, question: TokenizedText, passage: TokenizedText) -> list[Window]:
        """Windows over the passage, as the tokenizer's overflowing truncation
        (`truncation='only_second'`, `stride`) would cut them."""
        tpl = self.tokenizer.template
        q = question.ids.astype(np.int64)
        avail = self.max_seq_len - len(q) - tpl.num_special
        n = len(passage)
        if avail <= self.doc_stride and n > max(avail, 0):
            raise QuestionTooLong(f"the question leaves {avail} tokens per window; it must leave more than the stride ({self.doc_stride})")
        if n <= avail:
            spans = [(0, n)]
        else:
            step = avail - self.doc_stride
            spans = []
            for start in range(0, n, step):
                stop = min(start + avail, n)
                spans.append((start, stop))
                if stop == n:
                    break
        head = np.concatenate([tpl.prefix, q, tpl.middle])
        head_types = np.concatenate([tpl.type_prefix, np.full(len(q), tpl.type_question), tpl.type_middle])
        p_ids = passage.ids.astype(np.int64)
        out = []
        for s, e in spans:
            ids = np.concatenate([head, p_ids[s:e], tpl.suffix])
            types = np.concatenate([head_types, np.full(e - s, tpl.type_passage), tpl.type_suffix])
            out.append(Window(ids, types.astype(np.int64), np.ones(len(ids), dtype=np.int64), s, e, len(head)))
        return out

    # --- answering -------------------------------------------------------------------

    def answer(self, question: str, passages: Sequence[Passage | str], top_k: int = 1) -> list[Answer]:
        q = self.check_question(question)
        ps = []
        for i, p in enumerate(passages):
            if isinstance(p, str):
                p = passage_from_text(self.tokenizer, p, passage_id=f"context-{i}" if len(passages) > 1 else "context")
            ps.append(p)
        return self.answer_batch([ReadRequest(q, ps, top_k)])[0]

    def answer_batch(self, requests: Sequence[ReadRequest], under_load: bool = False) -> list[list[Answer]]:
        """Answer many (question, passages) requests in few forward passes:
        the windows of every request, in padded batches of similar length
        (``length_groups``, at most ``max_batch_windows`` each); with
        ``under_load``, on the backend's thread count for a busy service."""
        items: list[tuple[int, Passage, Window]] = []
        for r, req in enumerate(requests):
            if req.top_k < 1:
                raise InvalidQuestion("top_k must be at least 1")
            for p in req.passages:
                for w in self.features(req.question, p.tokens):
                    items.append((r, p, w))
        starts: list[np.ndarray] = [np.empty(0, np.float32)] * len(items)
        ends: list[np.ndarray] = [np.empty(0, np.float32)] * len(items)
        for group in length_groups([len(w.input_ids) for _, _, w in items], self.max_batch_windows):
            chunk = [items[i][2] for i in group]
            s, e = self._forward(chunk, under_load)
            for row, (i, w) in enumerate(zip(group, chunk)):
                starts[i] = s[row, : len(w.input_ids)]
                ends[i] = e[row, : len(w.input_ids)]

        per_request: list[list[dict]] = [[] for _ in requests]
        null_scores = [1_000_000.0] * len(requests)
        # As the reference does per context: each window offers top_k * 2 + 10
        # candidates, and a candidate whose text (case-folded) was already
        # offered from the same passage adds its score to that earlier one.
        merged: dict[tuple[int, int, str], dict] = {}
        for (r, p, w), s, e in zip(items, starts, ends):
            cands, null = self._decode_window(w, p, s, e, requests[r].top_k * 2 + 10)
            for c in cands:
                key = (r, id(p), c["text"].lower())
                if key in merged:
                    merged[key]["score"] += c["score"]
                    merged[key]["logit"] = max(merged[key]["logit"], c["logit"])
                else:
                    merged[key] = c
                    per_request[r].append(c)
            null_scores[r] = min(null_scores[r], null)
        results = []
        for r, req in enumerate(requests):
            cands = per_request[r]
            if self.handle_impossible_answer:
                cands.append({"score": null_scores[r], "start": 0, "end": 0, "text": "", "passage": None, "logit": 0.0})
            if req.rank_by == "logit":
                # The reference pads a short window's list with spans of
                # probability 0 and no text; their margin of about 0 would
                # outrank every real span with a negative one.
                cands = [c for c in cands if c["passage"] is None or (c["score"] > 0 and c["text"].strip())]
            # Stable sort: ties keep window order, as the reference does.
            cands = sorted(cands, key=lambda c: c[req.rank_by], reverse=True)[: req.top_k]
            results.append([self._to_answer(c) for c in cands])
        return results

    def _forward(self, windows: list[Window], under_load: bool = False) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(w.input_ids) for w in windows)
        ids = np.full((len(windows), width), self.tokenizer.pad_id, dtype=np.int64)
        types = np.zeros((len(windows), width), dtype=np.int64)
        mask = np.zeros((len(windows), width), dtype=np.int64)
        for i, w in enumerate(windows):
            n = len(w.input_ids)
            ids[i, :n] = w.input_ids
            types[i, :n] = w.token_type_ids
            mask[i, :n] = 1
        start, end = self.backend.run(ids, types, mask, under_load=under_load)
        return np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)

    def _decode_window(self, w: Window, p: Passage, start: np.ndarray, end: np.ndarray, top_k: int) -> tuple[list[dict], float]:
        """Candidate spans of one window, following the reference step by step
        (the same numpy operations on arrays of the same shape, so even ties
        break the same way)."""
        n = len(w.input_ids)
        allowed = np.zeros(n, dtype=bool)
        allowed[w.context_offset : w.context_offset + (w.passage_end - w.passage_start)] = True
        # The reference keeps [CLS] selectable (SQuAD-2 null answers), then
        # zeroes its probability; other special tokens stay masked.
        if self.tokenizer.cls_id is not None:
            allowed |= w.input_ids == self.tokenizer.cls_id
        raw_start, raw_end = start, end
        start = np.where(~allowed, _MASKED, start)[None, :]
        end = np.where(~allowed, _MASKED, end)[None, :]
        start = np.exp(start - start.max(axis=-1, keepdims=True))
        start = start / start.sum()
        end = np.exp(end - end.max(axis=-1, keepdims=True))
        end = end / end.sum()
        null = float((start[0, 0] * end[0, 0]).item())
        start[0, 0] = end[0, 0] = 0.0

        outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
        candidates = np.tril(np.triu(outer), self.max_answer_len - 1)
        flat = candidates.flatten()
        if top_k == 1:
            order = [np.argmax(flat)]
        elif len(flat) < top_k:
            order = np.argsort(-flat)
        else:
            idx = np.argpartition(-flat, top_k)[0:top_k]
            order = idx[np.argsort(-flat[idx])]
        s_idx, e_idx = np.unravel_index(order, candidates.shape)[1:]
        # The reference tests membership against `nonzero()` of a [1, L] mask,
        # which also lists the row index 0: position 0 therefore always passes.
        ok_positions = np.concatenate([np.zeros(1, dtype=np.int64), np.flatnonzero(allowed)])
        keep = np.isin(s_idx, ok_positions) & np.isin(e_idx, ok_positions)
        s_idx, e_idx = s_idx[keep], e_idx[keep]
        scores = candidates[0, s_idx, e_idx]

        # The span's margin over the window's null position ([CLS]): training
        # labels windows without the answer there, so the margin says how sure
        # the model is that this passage holds the answer at all, and compares
        # across passages (705 SQuAD dev questions end to end: F1 70.65 with
        # the raw span logit, 71.27 with the margin).
        null_logit = float(raw_start[0] + raw_end[0])
        out = []
        for s, e, score in zip(s_idx, e_idx, scores):
            a, b = self._char_span(w, p.tokens, int(s), int(e))
            out.append({"score": float(score.item()), "start": a, "end": b, "text": p.text[a:b], "passage": p,
                        "logit": float(raw_start[s] + raw_end[e]) - null_logit})
        return out, null

    @staticmethod
    def _char_span(w: Window, tokens: TokenizedText, s: int, e: int) -> tuple[int, int]:
        """Character span of tokens s..e, widened to whole words within the
        window; positions outside the passage map to (0, 0) offsets like the
        reference's special tokens."""
        lo, hi = w.context_offset, w.context_offset + (w.passage_end - w.passage_start)

        def passage_index(i: int) -> int | None:
            return w.passage_start + (i - w.context_offset) if lo <= i < hi else None

        ps, pe = passage_index(s), passage_index(e)
        if ps is None or pe is None:
            start = int(tokens.offsets[ps][0]) if ps is not None else 0
            end = int(tokens.offsets[pe][1]) if pe is not None else 0
            return start, end
        words = tokens.word_ids[w.passage_start : w.passage_end]
        offs = tokens.offsets[w.passage_start : w.passage_end]
        sw, ew = tokens.word_ids[ps], tokens.word_ids[pe]
        if sw < 0 or ew < 0:
            return int(tokens.offsets[ps][0]), int(tokens.offsets[pe][1])
        s_tokens = np.flatnonzero(words == sw)
        e_tokens = np.flatnonzero(words == ew)
        return int(offs[s_tokens[0]][0]), int(offs[e_tokens[-1]][1])

    @staticmethod
    def _to_answer(c: dict) -> Answer:
        p: Passage | None = c["passage"]
        if p is None:
            return Answer(text="", score=c["score"], start=0, end=0, logit=c["logit"])
        return Answer(
            text=c["text"],
            score=c["score"],
            start=p.doc_start + c["start"],
            end=p.doc_start + c["end"],
            passage_id=p.passage_id,
            doc_id=p.doc_id,
            shard=p.shard,
            logit=c["logit"],
        )


# --- model folder checks ------------------------------------------------------------

def is_hub_id(model: str) -> bool:
    """Whether `model`, not being a local folder, reads as a model hub id (name or owner/name)."""
    return not Path(model).expanduser().exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", model) is not None


def resolve_model_dir(model: str, cache_dir: Path) -> Path:
    """A local folder, or a hub id downloaded where a network exists."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFound(f"model {model} is a file, not a model directory")
    if is_hub_id(model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, cache_dir=str(cache_dir / "hub")))
        except Exception as exc:  # offline, unknown id, auth...
            raise ModelNotFound(f"model {model!r} is not a local folder and could not be fetched: {str(exc).splitlines()[0]}") from None
    raise ModelNotFound(f"model directory {model} does not exist")


def answer_fingerprint(settings: Settings) -> str:
    """What the shards' readers built from `settings` answer with: the
    weights (a retrained model may keep its name), the backend and the window
    settings. The ingress computes it from the same settings the shards get,
    so it never depends on which replica it asked during a rollout."""
    from shardqa.services.backends import model_hash

    model_dir = resolve_model_dir(str(settings.model), settings.cache_dir)
    s = settings
    return (f"{_model_id(model_dir)}@{model_hash(model_dir)}/{s.backend}/{s.max_seq_len}/{window_stride(s.doc_stride, s.max_seq_len)}/"
            f"{s.max_answer_len}/{int(s.handle_impossible_answer)}")


def check_model_folder(model_dir: Path) -> dict:
    """The folder's config.json, or a one-line error when it has none."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise ModelNotFound(f"{model_dir} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFound(f"{cfg_path} is not valid JSON ({exc})") from None


def check_qa_model(model_dir: Path) -> None:
    cfg = check_model_folder(model_dir)
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForQuestionAnswering") for a in archs):
        kind = ", ".join(archs) or cfg.get("model_type")
        raise NotAQAModel(
            f"{model_dir} is {f'a {kind} model' if kind else 'a model of unknown kind'}, not a question-answering "
            "model (its config names no *ForQuestionAnswering architecture)"
        )


def _model_id(model_dir: Path) -> str:
    card = model_dir / "shardqa.json"
    if card.exists():
        try:
            return json.loads(card.read_text()).get("model_id", model_dir.name)
        except json.JSONDecodeError:
            pass
    return model_dir.name


def read_context_file(path: str | Path) -> str:
    """A context file's text (``-``: standard input); invalid UTF-8 is a user
    error, not a crash."""
    import sys

    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
        return raw.decode("utf-8")
    except FileNotFoundError:
        raise InvalidContext(f"context file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidContext(f"context file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        where = "standard input" if str(path) == "-" else f"context file {path}"
        raise InvalidContext(f"{where} is not valid UTF-8 (byte {exc.start})") from None
