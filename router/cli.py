"""`shardqa route` and `shardqa eval-route`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from shardqa.config import setting_default


def register(app: typer.Typer) -> None:
    @app.command("route")
    def route(
        question: str = typer.Argument(..., help="the question"),
        store: Optional[str] = typer.Option(None, "--store", "-s", help=f"index directory or Redis URL {setting_default('store')}"),
        k: Optional[int] = typer.Option(None, "-k", "--k", min=1, help=f"passages to route {setting_default('route_k')}"),
        version: Optional[str] = typer.Option(None, "--version", help="index version [default: current]"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """Route a question: the top passages with scores and shard tags, grouped by shard."""
        from rich.console import Console
        from rich.table import Table

        from shardqa.config import get_settings
        from shardqa.preprocessing.store import open_store
        from shardqa.router import Router
        from shardqa.services.questions import QuestionChecker

        settings = get_settings()
        # The service's own question checks, tokens included (with the
        # serving model's tokenizer), before the router loads (seconds); the
        # canonical text is what the service routes.
        checker = QuestionChecker.for_settings(settings)
        question = checker.check_text(question)
        checker.tokenize(question)
        k = k or settings.route_k
        st = open_store(store)
        router = Router.from_store(st, version)
        result, ms = router.timed_route(question, k)
        if as_json:
            typer.echo(json.dumps({
                "question": result.question,
                "version": router.version,
                "ms": round(ms, 3),
                "passages": [
                    {"passage_id": p.passage_id, "doc_id": p.doc_id, "shard": p.shard, "shard_tag": p.shard_tag, "score": round(p.score, 6)}
                    for p in result.passages
                ],
                "by_shard": {str(s): ids for s, ids in result.by_shard.items()},
            }))
            return
        texts = {}
        for s in result.by_shard:
            for p in st.load_shard(s, router.version):
                texts[p.passage_id] = p.text
        con = Console()
        table = Table(title=f"{question}  ({ms:.2f} ms, index {router.version})", show_lines=True)
        for col in ("#", "score", "shard", "passage", "text"):
            table.add_column(col)
        for i, p in enumerate(result.passages, 1):
            text = texts.get(p.passage_id, "")
            table.add_row(str(i), f"{p.score:.3f}", p.shard_tag, p.passage_id, text[:240] + ("…" if len(text) > 240 else ""))
        con.print(table)
        con.print("by shard: " + ", ".join(f"{st.shard_tag(s)} {len(ids)}" for s, ids in result.by_shard.items()), highlight=False)

    @app.command("eval-route")
    def eval_route(
        squad_json: Path = typer.Argument(..., help="SQuAD-format JSON whose contexts the index was built from"),
        store: Optional[str] = typer.Option(None, "--store", "-s", help=f"index directory or Redis URL {setting_default('store')}"),
        version: Optional[str] = typer.Option(None, "--version", help="index version [default: current]"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N questions only"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """Recall@1/3/5/8 of the router (gold answer inside a routed passage), shards touched, passage tokens and latency, next to plain BM25 over the same passages."""
        from shardqa.config import get_settings
        from shardqa.preprocessing.corpus import read_squad_questions
        from shardqa.preprocessing.store import open_store
        from shardqa.router import Router
        from shardqa.router.evaluate import KS, evaluate_routing

        from shardqa.services.questions import QuestionChecker

        questions = read_squad_questions(squad_json)  # a bad file fails before the router loads (seconds)
        settings = get_settings()
        # The service's own question checks, tokens included, with its model's tokenizer.
        checker = QuestionChecker.for_settings(settings)
        st = open_store(store)
        router = Router.from_store(st, version)
        ev = evaluate_routing(router, st, squad_json, limit=limit, questions=questions, checker=checker)
        if as_json:
            typer.echo(json.dumps(ev.to_json()))
            return
        from rich.console import Console
        from rich.table import Table

        con = Console()
        table = Table(title=f"routing {ev.questions} questions · index {router.version} in {st.url}")
        table.add_column("k", justify="right")
        table.add_column("recall@k (router)", justify="right")
        if ev.lexical_recall is not None:
            table.add_column("recall@k (router, no dense)", justify="right")
        table.add_column("recall@k (BM25)", justify="right")
        table.add_column("shards touched", justify="right")
        for k in KS:
            lex = [f"{ev.lexical_recall[k]:.4f}"] if ev.lexical_recall is not None else []
            table.add_row(str(k), f"{ev.recall[k]:.4f}", *lex, f"{ev.baseline_recall[k]:.4f}", f"{ev.mean_shards_at[k]:.2f}")
        con.print(table)
        dense = f"{ev.dense} (encoder ran for {ev.dense_share:.0%} of questions)" if ev.dense else "off (lexical routing)"
        con.print(f"dense signal: {dense}", highlight=False)
        con.print(
            f"mean routed passage tokens (k=8) {ev.mean_passage_tokens:.1f} (index mean {ev.index_mean_passage_tokens:.1f}) · "
            f"latency p50 {ev.p50_ms:.3f} ms, p99 {ev.p99_ms:.3f} ms, mean {ev.mean_ms:.3f} ms",
            highlight=False,
        )
        if ev.refused:
            con.print(f"[yellow]{ev.refused} questions left out: the service would refuse them (empty, too long, not text "
                      "or without a word the model knows)[/]")
        if ev.missing_documents:
            con.print(f"[yellow]{ev.missing_documents} questions ask about contexts not in the index (counted as misses)[/]")
