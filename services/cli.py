"""`shardqa ask`: the reader on a context given at the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from shardqa.config import Backend, setting_default


def _check_built_from(store_url: str, squad_json: Path, examples) -> None:
    """As `shardqa eval-route` refuses: an index of another corpus would give
    a real-looking but meaningless F1."""
    from shardqa.preprocessing.corpus import read_squad_questions
    from shardqa.preprocessing.store import open_store
    from shardqa.router.evaluate import check_built_from

    st = open_store(store_url)
    try:
        version = st.current_version()
        _, meta = st.load_tables(version)
    finally:
        st.close()
    doc_of = {q.qid: q.doc_id for q in read_squad_questions(squad_json)}
    check_built_from(meta["doc_ids"], [doc_of.get(ex.id) for ex in examples], squad_json, version, st.url)


def register(app: typer.Typer) -> None:
    @app.command()
    def ask(
        question: str = typer.Argument(..., help="the question"),
        context: Optional[str] = typer.Option(None, "--context", "-c", help="the text to answer from"),
        context_file: Optional[Path] = typer.Option(None, "--context-file", "-f", help="read the text from a UTF-8 file (- reads standard input)"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory [default: SHARDQA_MODEL, the shipped model unless set]"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help=f"torch, onnx or onnx-int8 {setting_default('backend')}"),
        top_k: int = typer.Option(1, "--top-k", "-k", min=1, max=50, help="answers to show"),
        as_json: bool = typer.Option(False, "--json", help="print a JSON list of {text, score, start, end}"),
    ) -> None:
        """Answer QUESTION from a context (pass --context or --context-file)."""
        from shardqa.cli import fail
        from shardqa.services.reader import Reader, read_context_file

        if (context is None) == (context_file is None):
            raise fail("give exactly one of --context or --context-file")
        text = context if context is not None else read_context_file(context_file)
        if not text.strip():
            raise fail("the context is empty")
        from shardqa.services.answer_cache import canonical_question

        if not canonical_question(text):
            raise fail("the context is empty (it has only control or invisible characters)")
        from shardqa.config import get_settings
        from shardqa.services.questions import check_question_text

        check_question_text(question, get_settings().max_question_chars)  # before the model loads (seconds)
        t0 = time.perf_counter()
        reader = Reader.load(model, backend)
        loaded = time.perf_counter()
        answers = reader.answer(question, [text], top_k=top_k)
        done = time.perf_counter()
        if as_json:
            typer.echo(json.dumps([{"text": a.text, "score": a.score, "start": a.start, "end": a.end} for a in answers], ensure_ascii=False))
            return
        if not answers:
            typer.echo("no answer found in the context")
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("#", "answer", "score", "chars", box=None)
        for i, a in enumerate(answers, 1):
            table.add_row(str(i), a.text, f"{a.score:.4f}", f"{a.start}-{a.end}")
        console = Console()
        console.print(table)
        console.print(
            f"[dim]{reader.model_id} on {reader.backend.name}: loaded in {loaded - t0:.1f} s, "
            f"answered in {1000 * (done - loaded):.1f} ms[/dim]"
        )

    @app.command("eval-answers")
    def eval_answers(
        squad_json: Path = typer.Argument(..., help="SQuAD-format JSON whose contexts the index was built from"),
        store: Optional[str] = typer.Option(None, "--store", "-s", help=f"index directory or Redis URL {setting_default('store')}"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory [default: SHARDQA_MODEL]"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help=f"torch, onnx or onnx-int8 {setting_default('backend')}"),
        threads: Optional[int] = typer.Option(None, "--threads", min=0, help="model threads [default: SHARDQA_THREADS]"),
        seed: int = typer.Option(0, "--seed", help="question shuffle seed (the benchmark's is 0)"),
        skip: int = typer.Option(0, "--skip", min=0, help="skip the first N shuffled questions (the benchmark asks the first ones)"),
        every: int = typer.Option(1, "--every", min=1, help="then take every N-th question"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="at most N questions"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """End-to-end EM/F1 of routing + reading + merging in one process (the service's path without Ray or HTTP), with passages read and latency; tune the reading settings with SHARDQA_* variables."""
        from shardqa.services.evaluate import evaluate_answers, pick_questions
        from shardqa.services.service_config import settings_with
        from shardqa.training.squad import load_squad

        settings = settings_with({"store": store, "model": model, "backend": backend, "threads": threads, "index_refresh_s": 3600})
        examples = pick_questions(load_squad(squad_json), seed=seed, skip=skip, every=every, limit=limit)
        if examples:
            _check_built_from(settings.store, squad_json, examples)
        ev = evaluate_answers(settings, examples, progress=not as_json)
        if as_json:
            typer.echo(json.dumps(ev.to_json()))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("questions", "EM", "F1", "passages read", "one passage", "p50 ms", "p90 ms", "p99 ms", title="end to end, in one process")
        table.add_row(str(ev.questions), f"{ev.exact_match:.2f}", f"{ev.f1:.2f}", f"{ev.passages_read:.2f}",
                      f"{ev.one_passage_share:.0%}", f"{ev.p50_ms:.1f}", f"{ev.p90_ms:.1f}", f"{ev.p99_ms:.1f}")
        console = Console()
        console.print(table)
        if ev.refused:
            console.print(f"[yellow]{ev.refused} questions refused by the service (scored as empty answers)[/]")
        console.print("[dim]" + ", ".join(f"{k}={v}" for k, v in ev.settings.items()) + "[/dim]")
