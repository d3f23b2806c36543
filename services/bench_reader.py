"""Reader-only figures per backend: `shardqa bench-reader`.

The reader alone, in this process, without HTTP, routing or cache: one
question against one pre-tokenised passage of exactly N passage tokens, for
each backend (torch, ONNX fp32, ONNX dynamic INT8) and each N. A passage
longer than the window (question + passage + special tokens > max_seq_len)
is read in overlapping windows, as the service reads it; the table says how
many. Backends are interleaved in small blocks so that a change in the
machine's background load during the run falls on all of them alike.

Also the gold-paragraph EM/F1 of each backend on SQuAD questions (the reader
given the question's own paragraph), which is the ceiling the end-to-end
F1 is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from shardqa.services.bench import BenchError, latency_stats

BACKENDS = ("torch", "onnx", "onnx-int8")
LENGTHS = (32, 64, 128, 256, 384)


@dataclass(frozen=True)
class Case:
    question: str
    passage: Any  # shardqa.types.Passage


def cut_passage(tokenizer, text: str, n_tokens: int, passage_id: str):
    """The first ``n_tokens`` tokens of ``text`` as a pre-tokenised Passage,
    or None when the text is shorter."""
    from shardqa.types import Passage, TokenizedText

    tok = tokenizer.tokenize(text)
    if len(tok) < n_tokens:
        return None
    end_char = int(tok.offsets[n_tokens - 1][1])
    cut = TokenizedText(tok.ids[:n_tokens].copy(), tok.offsets[:n_tokens].copy(), tok.word_ids[:n_tokens].copy())
    return Passage(passage_id, passage_id, 0, text[:end_char], 0, cut)


def make_cases(tokenizer, examples, n_tokens: int, count: int) -> list[Case]:
    """Up to ``count`` (question, passage) pairs from distinct SQuAD paragraphs
    whose first ``n_tokens`` tokens make the passage."""
    out, seen = [], set()
    for ex in examples:
        if ex.context in seen:
            continue
        seen.add(ex.context)
        p = cut_passage(tokenizer, ex.context, n_tokens, f"p{len(out)}")
        if p is not None:
            out.append(Case(ex.question, p))
            if len(out) == count:
                break
    if not out:
        raise BenchError(f"no paragraph in the question file has {n_tokens} tokens")
    return out


def bench_lengths(readers: dict[str, Any], examples, lengths: Sequence[int], runs: int, *, block: int = 10,
                  warmup: int = 5, pairs: int = 20, log=None) -> list[dict[str, Any]]:
    """Median/p99 latency of ``reader.answer(question, [passage])`` per backend and length."""
    rows = []
    first = next(iter(readers.values()))
    for n_tokens in lengths:
        cases = make_cases(first.tokenizer, examples, n_tokens, pairs)
        times: dict[str, list[float]] = {name: [] for name in readers}
        for name, reader in readers.items():
            for c in cases[:warmup]:
                reader.answer(c.question, [c.passage])
        i = 0
        while i < runs:
            todo = min(block, runs - i)
            for name, reader in readers.items():
                for j in range(todo):
                    c = cases[(i + j) % len(cases)]
                    t0 = time.perf_counter()
                    reader.answer(c.question, [c.passage])
                    times[name].append(time.perf_counter() - t0)
            i += todo
        for name, reader in readers.items():
            c = cases[0]
            q = reader.check_question(c.question)
            windows = reader.features(q, c.passage.tokens)
            row = {
                "backend": name,
                "passage_tokens": n_tokens,
                "windows": len(windows),
                "sequence_tokens": int(max(len(w.input_ids) for w in windows)),
                "n": len(times[name]),
                **latency_stats(times[name]),
            }
            rows.append(row)
            if log:
                log(f"  {name:<10} {n_tokens:>4} tokens: p50={row['p50_ms']:.2f} ms p99={row['p99_ms']:.2f} ms "
                    f"({row['windows']} window(s), n={row['n']})")
    return rows


def gold_paragraph_scores(reader, examples) -> dict[str, Any]:
    """EM/F1 of the reader given each question's own (gold) paragraph."""
    from shardqa.errors import ShardQAError
    from shardqa.training.squad import squad_scores

    preds, lat = {}, []
    for ex in examples:
        t0 = time.perf_counter()
        try:
            answers = reader.answer(ex.question, [ex.context])
        except ShardQAError:
            answers = []  # a question the reader refuses scores as an empty answer
        lat.append(time.perf_counter() - t0)
        preds[ex.id] = answers[0].text if answers else ""
    s = squad_scores(preds, list(examples))
    return {"n": s["n"], "f1": round(s["f1"], 3), "exact_match": round(s["exact_match"], 3),
            "p50_ms": latency_stats(lat)["p50_ms"], "predictions": preds}


def run_reader_bench(model: str | None, backends: Sequence[str], lengths: Sequence[int], runs: int, examples,
                     f1_examples=None, threads: int | None = None, log=None) -> dict[str, Any]:
    from shardqa.config import get_settings
    from shardqa.services.reader import Reader

    st = get_settings()
    readers: dict[str, Any] = {}
    load_s = {}
    for name in backends:
        t0 = time.perf_counter()
        readers[name] = Reader.load(model, name, threads=threads)
        load_s[name] = round(time.perf_counter() - t0, 2)
        if log:
            log(f"reader: {name} loaded in {load_s[name]:.1f} s")
    rows = bench_lengths(readers, examples, lengths, runs, log=log)
    first = next(iter(readers.values()))
    out: dict[str, Any] = {
        "model": first.model_id,
        "backends": list(backends),
        "lengths": list(lengths),
        "runs": runs,
        "threads": threads if threads is not None else st.threads,
        "max_seq_len": first.max_seq_len,
        "doc_stride": first.doc_stride,
        "load_s": load_s,
        "rows": rows,
        "gold_paragraph": {},
    }
    if f1_examples:
        for name, reader in readers.items():
            g = gold_paragraph_scores(reader, f1_examples)
            g.pop("predictions")
            out["gold_paragraph"][name] = g
            if log:
                log(f"reader: {name} gold-paragraph F1={g['f1']:.1f} EM={g['exact_match']:.1f} (n={g['n']})")
    return out


def reader_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    backends = result["backends"]
    head = "| passage tokens | windows x tokens | " + " | ".join(f"{b} p50 ms | {b} p99 ms" for b in backends) + " |"
    sep = "|---:|---:|" + "---:|---:|" * len(backends)
    lines = [head, sep]
    for n in result["lengths"]:
        cells = {r["backend"]: r for r in rows if r["passage_tokens"] == n}
        any_row = next(iter(cells.values()))
        vals = " | ".join(f"{cells[b]['p50_ms']:.2f} | {cells[b]['p99_ms']:.2f}" for b in backends)
        lines.append(f"| {n} | {any_row['windows']} x {any_row['sequence_tokens']} | {vals} |")
    if result.get("gold_paragraph"):
        lines += ["", "| backend | gold-paragraph EM | gold-paragraph F1 | questions |", "|---|---:|---:|---:|"]
        for b, g in result["gold_paragraph"].items():
            lines.append(f"| {b} | {g['exact_match']:.1f} | {g['f1']:.1f} | {g['n']} |")
    return "\n".join(lines)


def plot_reader(result: dict[str, Any], path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for b in result["backends"]:
        rows = sorted((r for r in result["rows"] if r["backend"] == b), key=lambda r: r["passage_tokens"])
        xs = [r["passage_tokens"] for r in rows]
        line, = ax.plot(xs, [r["p50_ms"] for r in rows], "o-", label=f"{b} p50")
        ax.plot(xs, [r["p99_ms"] for r in rows], "s--", color=line.get_color(), alpha=0.6, label=f"{b} p99")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["lengths"])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("passage tokens (one question, one passage)")
    ax.set_ylabel("reader latency, ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"reader only: {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
