"""The naive baseline shardqa is measured against.

What a user would write today without shardqa: BM25 (bm25s) over the whole
paragraphs of the corpus, the top 3 paragraphs, and for each of them the
Hugging Face tokenizer and ``AutoModelForQuestionAnswering`` called directly in
torch, the way the transformers 5 documentation shows it now that the
question-answering pipeline is gone. No pre-tokenisation, no batching, no ONNX,
no cache: one forward pass per paragraph, the argmax of the start logits over
the paragraph's tokens, the argmax of the end logits over the paragraph's
tokens from there on, and the paragraph whose span has the highest
start+end logit wins.

The benchmark calls it in-process (no HTTP in front of it), one question at a
time, so its latency carries no web-stack cost: the comparison is
conservative in the baseline's favour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from shardqa.errors import ModelNotFound

#: Sequence length the baseline truncates (question, paragraph) pairs to. The
#: model's tokenizer.json may carry a shorter truncation; it is passed explicitly.
MAX_LENGTH = 384
TOP_PARAGRAPHS = 3


@dataclass(frozen=True)
class BaselineAnswer:
    text: str
    score: float
    paragraph: int  # index into the corpus paragraphs
    seconds: float


def corpus_paragraphs(examples) -> list[str]:
    """Distinct paragraphs of a SQuAD file, in file order."""
    seen: dict[str, None] = {}
    for ex in examples:
        seen.setdefault(ex.context, None)
    return list(seen)


class NaiveBaseline:
    def __init__(self, model: str, paragraphs: Sequence[str], *, k: int = TOP_PARAGRAPHS, max_length: int = MAX_LENGTH):
        import bm25s
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from shardqa.services.backends import quiet_weight_loading

        if not paragraphs:
            raise ValueError("the baseline needs a non-empty corpus")
        self.model_id = str(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            quiet_weight_loading()
            self.model = AutoModelForQuestionAnswering.from_pretrained(model)
        except OSError as exc:
            raise ModelNotFound(f"cannot load model {model!r} for the baseline: {exc}") from None
        self.model.eval()
        self.paragraphs = list(paragraphs)
        self.k = min(k, len(self.paragraphs))
        self.max_length = max_length
        self._torch = torch
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(self.paragraphs, stopwords="en", show_progress=False), show_progress=False)

    @property
    def threads(self) -> int:
        return int(self._torch.get_num_threads())

    def retrieve(self, question: str) -> list[int]:
        tokens = self._bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.ids or not tokens.ids[0]:
            return list(range(self.k))  # nothing to match on: the first paragraphs, as bm25s would rank ties
        docs, _scores = self.retriever.retrieve(tokens, k=self.k, show_progress=False)
        return [int(i) for i in docs[0]]

    def read(self, question: str, paragraph: str) -> tuple[str, float]:
        torch = self._torch
        enc = self.tokenizer(
            question,
            paragraph,
            truncation="only_second",
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")[0].tolist()
        context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
        if not context:
            return "", float("-inf")
        with torch.inference_mode():
            out = self.model(**enc)
        start_logits = out.start_logits[0]
        end_logits = out.end_logits[0]
        ctx = torch.tensor(context)
        s = int(ctx[int(torch.argmax(start_logits[ctx]))])
        after = ctx[ctx >= s]
        e = int(after[int(torch.argmax(end_logits[after]))])
        score = float(start_logits[s] + end_logits[e])
        return paragraph[offsets[s][0] : offsets[e][1]], score

    def answer(self, question: str) -> BaselineAnswer:
        t0 = time.perf_counter()
        best = ("", float("-inf"), -1)
        for idx in self.retrieve(question):
            text, score = self.read(question, self.paragraphs[idx])
            if score > best[1]:
                best = (text, score, idx)
        return BaselineAnswer(best[0], best[1], best[2], time.perf_counter() - t0)


def run_baseline(baseline: NaiveBaseline, questions, warmup: int = 3) -> dict:
    """Answer ``questions`` one at a time; latency and SQuAD EM/F1 against gold."""
    from shardqa.services.bench import latency_stats
    from shardqa.training.squad import squad_scores

    for q in list(questions)[:warmup]:  # first calls pay one-off allocation costs; not measured
        baseline.answer(q.question)
    preds, lat = {}, []
    for q in questions:
        ans = baseline.answer(q.question)
        preds[q.id] = ans.text
        lat.append(ans.seconds)
    scores = squad_scores(preds, list(questions))
    return {
        "mode": "in-process",
        "description": (f"bm25s top-{baseline.k} whole paragraphs of {len(baseline.paragraphs)}, then per paragraph "
                        f"AutoTokenizer + AutoModelForQuestionAnswering in torch (max_length {baseline.max_length}, "
                        "no batching, no ONNX), argmax start/end, best paragraph wins"),
        "model": baseline.model_id,
        "torch_threads": baseline.threads,
        "n": len(lat),
        **latency_stats(lat),
        "f1": round(scores["f1"], 3),
        "exact_match": round(scores["exact_match"], 3),
        "predictions": preds,
    }
