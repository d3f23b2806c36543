"""`shardqa ask`: the reader on a context given at the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from shardqa.config import Backend


def register(app: typer.Typer) -> None:
    @app.command()
    def ask(
        question: str = typer.Argument(..., help="the question"),
        context: Optional[str] = typer.Option(None, "--context", "-c", help="the text to answer from"),
        context_file: Optional[Path] = typer.Option(None, "--context-file", "-f", help="read the text from a UTF-8 file"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory [default: the shipped model]"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help="torch, onnx or onnx-int8"),
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
