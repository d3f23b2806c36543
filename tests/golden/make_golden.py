"""Record the reference answers the reader is tested against.

The reference is the ``question-answering`` pipeline of transformers 4.57.x
(transformers 5 removed it), run on the tiny fixture model
``tests/fixtures/tiny-bert-qa`` with the pipeline's own defaults unless a case
says otherwise. This script runs in its OWN virtual environment, never the
project's (see ``tests/golden/README.md`` for the exact steps)::

    python3 -m venv /tmp/shardqa-ref
    /tmp/shardqa-ref/bin/pip install torch==2.13.0 transformers==4.57.6
    /tmp/shardqa-ref/bin/python tests/golden/make_golden.py

It writes ``tests/golden/pipeline_answers.json``::

    {"meta": {...versions, fixture file hashes...},
     "cases": [{"name", "question", "context", "kwargs",      # kwargs as given to the pipeline
                "resolved": {max_seq_len, doc_stride, max_answer_len, top_k, handle_impossible_answer},
                "answers": [{"answer", "score", "start", "end"}, ...],   # always a list, best first
                "features": [{"input_ids", "token_type_ids", "attention_mask", "offset_mapping"}, ...]}]}

``features`` is the reference tokenizer's
``tokenizer(question, context, truncation='only_second', max_length=max_seq_len,
stride=doc_stride, return_overflowing_tokens=True)``, window by window.

Every recorded case is checked to be well defined, so that the comparison
cannot hinge on float noise or on numpy's tie-breaking:

* every answer has a strictly positive score (the pipeline can pad short
  top-k lists with zero-score pseudo-spans picked by ``np.argpartition``; such
  cases are not recorded);
* consecutive scores of the top-(k+1) answers differ by at least
  ``MIN_REL_GAP`` relative, so a last-digit change cannot reorder them or swap
  the k-th answer for the next one.

Hand-written cases must pass these checks (the script stops otherwise); random
SQuAD cases that fail them are redrawn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "tiny-bert-qa"
OUT = HERE / "pipeline_answers.json"
DEFAULT_SQUAD = Path.home() / ".cache" / "shardqa" / "squad" / "dev-v1.1.json"

REFERENCE_TRANSFORMERS = "4.57."
SEED = 1234
NUM_SQUAD_CASES = 150
MIN_REL_GAP = 1e-4

# --- hand-written cases -----------------------------------------------------------------

SHORT = [
    (
        "Who wrote Pride and Prejudice?",
        "Pride and Prejudice is an 1813 novel of manners written by Jane Austen. The novel follows the "
        "character development of Elizabeth Bennet, the protagonist of the book.",
    ),
    (
        "When was the bridge opened?",
        "The Golden Gate Bridge was opened to traffic on May 27, 1937, after four years of construction.",
    ),
    ("What colour is the sky?", "The sky is blue."),
    (
        "How many moons does Mars have?",
        "Mars has two small moons, Phobos and Deimos, which may be captured asteroids.",
    ),
    (
        "Which river flows through Paris?",
        "Paris is the capital of France. The Seine flows through the city from east to west, and more than "
        "thirty bridges cross it.",
    ),
    (
        "What does CPU stand for?",
        "A CPU (central processing unit) executes instructions; a GPU, by contrast, runs many simple "
        "operations in parallel. Both are built from transistors on silicon.",
    ),
]

UNICODE = [
    (
        "unicode-accents",
        "Where did Zoë meet Björk?",
        "Café Müller's naïve résumé: Zoë met Björk at the Hôtel de Genève in 1998, near the façade of the "
        "Ångström institute. Señor Núñez said « très bien » and left for São Paulo.",
    ),
    (
        "unicode-cjk",
        "What is the capital of Japan?",
        "東京は日本の首都です。人口は約1400万人で、世界最大の都市圏の一つです。Tokyo is the capital of Japan, "
        "and 北京 (Beijing) is the capital of China. 서울은 한국의 수도입니다.",
    ),
    (
        "unicode-emoji",
        "What did Alice bring?",
        "The party 🎉 started at 9pm 🕘 and ended at midnight 🌙. Alice 👩‍💻 brought the cake 🎂 while "
        "Bob 🧔🏽 played the guitar 🎸. Everyone ❤️ it! 🇫🇷🇯🇵 flags hung on the wall.",
    ),
    (
        "unicode-combining",
        "Which word uses combining accents?",
        "The word e\u0301te\u0301 uses combining acute accents, and n\u0303 is an n with a combining tilde. "
        "Z\u0351\u0357a\u0352l\u0308g\u0300o\u0489 text stacks many marks: a\u0300\u0301\u0302\u0303\u0304 "
        "is still one letter. Precomposed été looks the same.",
    ),
    (
        "unicode-whitespace",
        "What is the answer?",
        "Line one\tcolumn two\nLine two\u00a0with\u00a0no-break\u00a0spaces,\u2003an em space,\u200ba zero "
        "width space\r\nand a CRLF.\u3000Ideographic space.\u2028Line separator. The answer is forty\u00a0two"
        " (42),\t\tsaid\n\n\nDeep   Thought.",
    ),
    (
        "unicode-scripts",
        "What is the capital of Russia?",
        "Москва — столица России. Αθήνα είναι η πρωτεύουσα της Ελλάδας. القاهرة هي عاصمة مصر. "
        "ירושלים היא עיר. नई दिल्ली भारत की राजधानी है। กรุงเทพมหานครเป็นเมืองหลวง. Moscow is the capital of Russia.",
    ),
    (
        "unicode-case-folding",
        "Where is İstanbul?",
        "İstanbul is in Türkiye; Straße and STRASSE differ only in ß. The ﬁrst ligature ﬂows, "
        "ǅ is a titlecase digraph, and ΣΊΣΥΦΟΣ lowercases to σίσυφος. İİİ ıııı KELVIN \u212a sign.",
    ),
    (
        "unicode-controls",
        "Who signed the letter?",
        "\ufeffThe letter\u00ad was signed\x07 by Dr.\u202eevil\u202c Smith\x1f and co\u00adsigned by "
        "Ms. O\u2019Brien\u2009\u2014\u2009the \u201cfinal\u201d draft\x0b\x0c of 2021\u2026 \ufffd end.",
    ),
    (
        "unicode-question",
        "¿Dónde está el café «Ünïcödé» 😊?",
        "El café «Ünïcödé» está en la calle Mayor, número 7, junto a la panadería de Doña Inés. "
        "Abre a las 8:00 y cierra a las 20:00 todos los días excepto el domingo.",
    ),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_squad(path: Path) -> list[dict]:
    """Articles as [{'title', 'paragraphs': [{'context', 'questions': [...]}]}]."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [
        {
            "title": a["title"],
            "paragraphs": [{"context": p["context"], "questions": [q["question"] for q in p["qas"]]} for p in a["paragraphs"]],
        }
        for a in data
    ]


class Recorder:
    def __init__(self, qa, tokenizer):
        self.qa = qa
        self.tok = tokenizer
        self.cases: list[dict] = []
        self.rejected: dict[str, int] = {}

    def resolve(self, kwargs: dict) -> dict:
        # The pipeline's own defaulting (QuestionAnsweringPipeline.preprocess / postprocess).
        max_seq_len = kwargs.get("max_seq_len", min(self.tok.model_max_length, 384))
        doc_stride = kwargs.get("doc_stride", min(max_seq_len // 2, 128))
        return {
            "max_seq_len": max_seq_len,
            "doc_stride": doc_stride,
            "max_answer_len": kwargs.get("max_answer_len", 15),
            "top_k": kwargs.get("top_k", 1),
            "handle_impossible_answer": kwargs.get("handle_impossible_answer", False),
        }

    def run(self, question: str, context: str, kwargs: dict) -> list[dict]:
        out = self.qa(question=question, context=context, **kwargs)
        if isinstance(out, dict):
            out = [out]
        return [{"answer": a["answer"], "score": float(a["score"]), "start": int(a["start"]), "end": int(a["end"])} for a in out]

    def problem(self, question: str, context: str, kwargs: dict, answers: list[dict]) -> str | None:
        """Why the case would not be a fair, noise-free comparison (None if it is)."""
        if not answers:
            return "no answers"
        if any(not a["score"] > 0.0 for a in answers):
            return "zero-score pseudo answers"
        more = dict(kwargs, top_k=self.resolve(kwargs)["top_k"] + 1)
        scores = [a["score"] for a in self.run(question, context, more)]
        for hi, lo in zip(scores, scores[1:]):
            if lo > 0 and (hi - lo) < MIN_REL_GAP * hi:
                return f"near-tie {hi!r} vs {lo!r}"
        return None

    def features(self, question: str, context: str, resolved: dict) -> list[dict]:
        enc = self.tok(
            question,
            context,
            truncation="only_second",
            max_length=resolved["max_seq_len"],
            stride=resolved["doc_stride"],
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        return [
            {
                "input_ids": list(enc["input_ids"][i]),
                "token_type_ids": list(enc["token_type_ids"][i]),
                "attention_mask": list(enc["attention_mask"][i]),
                "offset_mapping": [list(o) for o in enc["offset_mapping"][i]],
            }
            for i in range(len(enc["input_ids"]))
        ]

    def add(self, name: str, question: str, context: str, strict: bool = True, **kwargs) -> bool:
        answers = self.run(question, context, kwargs)
        why = self.problem(question, context, kwargs, answers)
        if why:
            if strict:
                raise SystemExit(f"hand-written case {name!r} is not well defined: {why}")
            self.rejected[why.split()[0]] = self.rejected.get(why.split()[0], 0) + 1
            return False
        resolved = self.resolve(kwargs)
        self.cases.append(
            {
                "name": name,
                "question": question,
                "context": context,
                "kwargs": kwargs,
                "resolved": resolved,
                "answers": answers,
                "features": self.features(question, context, resolved),
            }
        )
        return True


def long_context(article: dict, min_chars: int) -> tuple[str, list[str]]:
    """Paragraphs of one article joined until the text is at least min_chars long."""
    parts, questions = [], []
    for p in article["paragraphs"]:
        parts.append(p["context"])
        questions.extend(p["questions"])
        if sum(len(x) + 1 for x in parts) >= min_chars:
            break
    return "\n".join(parts), questions


def hand_written(rec: Recorder, squad: list[dict]) -> None:
    for i, (q, c) in enumerate(SHORT):
        rec.add(f"short-{i}", q, c)
    rec.add("short-top3", *SHORT[0], top_k=3)
    rec.add("short-top10", *SHORT[4], top_k=10)
    rec.add("short-top10-b", *SHORT[5], top_k=10)
    rec.add("short-max-answer-5", *SHORT[0], max_answer_len=5, top_k=3)
    rec.add("short-max-answer-30", *SHORT[4], max_answer_len=30, top_k=3)
    rec.add("short-impossible", *SHORT[1], handle_impossible_answer=True, top_k=3)
    rec.add("short-impossible-top1", *SHORT[3], handle_impossible_answer=True)
    rec.add("short-impossible-top11", *SHORT[1], handle_impossible_answer=True, top_k=11)
    # Very short contexts, where the null answer ("", 0, 0) ranks first or
    # among the answers returned.
    rec.add("null-first", "How many?", "Three.", handle_impossible_answer=True, top_k=3)
    rec.add("null-first-top1", "How many?", "Three.", handle_impossible_answer=True)
    rec.add("null-second", "What colour is the sky?", "Blue.", handle_impossible_answer=True, top_k=2)
    rec.add("null-third", "Who?", "Nobody knows.", handle_impossible_answer=True, top_k=4)
    rec.add("null-off", "How many?", "Three.", top_k=2)
    # The null score over several windows is the smallest window's.
    rec.add("null-two-windows", "What colour is the sky?", "Three. Four.", handle_impossible_answer=True, max_seq_len=12, doc_stride=2, top_k=5)
    rec.add("null-four-windows", "What colour is the sky?", "Blue. Green. Red.", handle_impossible_answer=True, max_seq_len=12, doc_stride=2, top_k=8)

    for name, q, c in UNICODE:
        rec.add(name, q, c)
        rec.add(name + "-top3", q, c, top_k=3)
    rec.add("unicode-emoji-top10-len30", UNICODE[2][1], UNICODE[2][2], top_k=10, max_answer_len=30)
    rec.add("unicode-whitespace-small-windows", UNICODE[4][1], UNICODE[4][2], max_seq_len=32, doc_stride=8, top_k=3)
    rec.add("unicode-cjk-small-windows", UNICODE[1][1], UNICODE[1][2], max_seq_len=48, doc_stride=12, top_k=3)

    # Long passages: several paragraphs of one article, so the default 384/128
    # windows overlap several times; then smaller windows over the same text.
    long_specs = [
        ("long-default", 0, 3000, {}),
        ("long-default-top3", 1, 4000, {"top_k": 3}),
        ("long-default-top10", 2, 5000, {"top_k": 10}),
        ("long-128-32", 3, 2500, {"max_seq_len": 128, "doc_stride": 32}),
        ("long-128-32-top3", 4, 2500, {"max_seq_len": 128, "doc_stride": 32, "top_k": 3}),
        ("long-64-16", 5, 1500, {"max_seq_len": 64, "doc_stride": 16}),
        ("long-64-16-top10", 6, 1500, {"max_seq_len": 64, "doc_stride": 16, "top_k": 10}),
        ("long-impossible", 7, 3000, {"handle_impossible_answer": True, "top_k": 3}),
        ("long-max-answer-5", 8, 3000, {"max_answer_len": 5, "top_k": 3}),
        ("long-max-answer-30", 9, 3000, {"max_answer_len": 30, "top_k": 3}),
        ("long-256-64-impossible", 10, 3000, {"max_seq_len": 256, "doc_stride": 64, "handle_impossible_answer": True}),
        # A stride given is used as is, even above half a window (only the
        # default is capped at max_seq_len // 2).
        ("long-64-40", 11, 1500, {"max_seq_len": 64, "doc_stride": 40, "top_k": 3}),
        ("long-384-200", 12, 4000, {"doc_stride": 200, "top_k": 3}),
        ("long-128-only-seq", 13, 2500, {"max_seq_len": 128}),
    ]
    for name, art, chars, kw in long_specs:
        context, questions = long_context(squad[art], chars)
        # The first question whose case is well defined (hand-picked article,
        # automatic question): deterministic, and stops if none is.
        for q in questions:
            if rec.add(name, q, context, strict=False, **kw):
                break
        else:
            raise SystemExit(f"no well-defined question for {name}")


def random_squad(rec: Recorder, squad: list[dict], n: int, seed: int) -> None:
    rng = random.Random(seed)
    variants = [
        ({}, 6),
        ({"top_k": 3}, 2),
        ({"top_k": 10}, 1),
        ({"max_answer_len": 5}, 1),
        ({"max_answer_len": 30, "top_k": 2}, 1),
        ({"max_seq_len": 128, "doc_stride": 32}, 1),
        ({"max_seq_len": 64, "doc_stride": 16, "top_k": 3}, 1),
        ({"handle_impossible_answer": True}, 1),
    ]
    pool = [kw for kw, weight in variants for _ in range(weight)]
    made = 0
    while made < n:
        article = rng.randrange(len(squad))
        paragraphs = squad[article]["paragraphs"]
        first = rng.randrange(len(paragraphs))
        span = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        chosen = paragraphs[first : first + span]
        context = "\n".join(p["context"] for p in chosen)
        question = rng.choice([q for p in chosen for q in p["questions"]])
        kwargs = dict(rng.choice(pool))
        if len(rec.tok(question, add_special_tokens=False)["input_ids"]) > 40:
            continue
        if rec.add(f"squad-{made:03d}", question, context, strict=False, **kwargs):
            made += 1


def main() -> None:
    parser = argparse.ArgumentParser(description="Record reference answers of the transformers 4.57 QA pipeline.")
    parser.add_argument("--squad", type=Path, default=DEFAULT_SQUAD, help="SQuAD v1.1 dev file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--num-squad", type=int, default=NUM_SQUAD_CASES)
    args = parser.parse_args()

    import numpy
    import tokenizers
    import torch
    import transformers
    from transformers import AutoTokenizer, pipeline

    if not transformers.__version__.startswith(REFERENCE_TRANSFORMERS):
        sys.exit(f"the reference is transformers {REFERENCE_TRANSFORMERS}x; this environment has {transformers.__version__}")
    torch.manual_seed(0)
    torch.set_num_threads(1)

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE))
    assert tokenizer.is_fast
    qa = pipeline("question-answering", model=str(FIXTURE), tokenizer=str(FIXTURE), device="cpu")
    rec = Recorder(qa, tokenizer)
    squad = load_squad(args.squad)

    hand_written(rec, squad)
    random_squad(rec, squad, args.num_squad, SEED)

    meta = {
        "reference": "transformers QuestionAnsweringPipeline",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
        "fixture": FIXTURE.name,
        "fixture_sha256": {p.name: sha256(p) for p in sorted(FIXTURE.iterdir()) if p.is_file()},
        "squad_sha256": sha256(args.squad),
        "seed": SEED,
        "min_rel_gap": MIN_REL_GAP,
        "rejected_random_cases": rec.rejected,
    }
    # One case per line keeps diffs of regenerated files readable.
    lines = ['{"meta": ' + json.dumps(meta, ensure_ascii=False, sort_keys=True) + ', "cases": [']
    lines.append(",\n".join(json.dumps(c, ensure_ascii=False) for c in rec.cases))
    lines.append("]}")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(args.out.read_text(encoding="utf-8"))  # round-trips
    windows = sum(len(c["features"]) for c in rec.cases)
    print(f"wrote {len(rec.cases)} cases ({windows} windows) to {args.out}; rejected random draws: {rec.rejected}")


if __name__ == "__main__":
    main()
