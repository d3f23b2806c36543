"""`shardqa index`: build a versioned, sharded, pre-tokenised index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shardqa.config import MAX_SHARDS, setting_default


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index(
        corpus: Path = typer.Argument(..., help="JSONL (id,title,text), SQuAD-format JSON, or a folder of .txt/.md files"),
        store: Optional[str] = typer.Option(None, "--store", "-s", help=f"index directory or Redis URL (redis://, rediss://, redis+cluster://host:port,..., rediss+cluster://, unix://) {setting_default('store')}"),
        shards: Optional[int] = typer.Option(None, "--shards", "-n", min=1, max=MAX_SHARDS, help=f"number of shards {setting_default('shards')}"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="model directory whose tokenizer pre-tokenises passages [default: SHARDQA_MODEL]"),
        passage_sentences: Optional[int] = typer.Option(None, "--passage-sentences", min=1, help=f"sentences per passage window {setting_default('passage_sentences')}"),
        passage_stride: Optional[int] = typer.Option(None, "--passage-stride", min=1, help="sentences between window starts (< sentences: windows overlap) [default: 2]"),
        passage_max_tokens: Optional[int] = typer.Option(None, "--passage-max-tokens", min=16, help=f"cap on tokens per passage {setting_default('passage_max_tokens')}"),
        segmenter: str = typer.Option("blingfire", "--segmenter", help="sentence segmenter: blingfire or pysbd"),
        on_error: str = typer.Option("stop", "--on-error", help="a bad record (invalid JSON line, document without text): stop, or skip it and report it"),
        keep: int = typer.Option(3, "--keep", min=1, help="versions to keep in the store (older ones are dropped)"),
        encoder: Optional[str] = typer.Option(None, "--encoder", help=f"dense encoder embedding the passages for the router: auto (the installed all-MiniLM-L6-v2), a folder, or none {setting_default('route_encoder')}"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
        build_key: Optional[str] = typer.Option(
            None, "--build-key",
            help="build only if the last build given a key was given another one (or the current version no longer "
                 "suits --shards, the model or the dense encoder); the Helm chart's upgrade hook passes a hash of its index values, so an "
                 "upgrade that leaves them alone keeps the current version, even one `shardqa cluster reindex` made",
        ),
    ) -> None:
        """Index a corpus: sentences, passages, sentence graph and ranking, shards, pre-tokenised passages; then make the new version current."""
        from rich.console import Console
        from rich.table import Table

        from shardqa.preprocessing.build import build_index_report

        if on_error not in ("skip", "stop"):
            from shardqa.cli import fail

            raise fail("--on-error must be skip or stop")
        result = build_index_report(
            corpus, store, shards, model, window=passage_sentences, stride=passage_stride,
            max_tokens=passage_max_tokens, on_error=on_error, keep=keep, progress=not quiet, segmenter=segmenter,
            encoder="auto" if encoder is None else encoder, build_key=build_key or None,
        )
        if result.kept:
            Console().print(f"index version [bold]{result.manifest.version}[/] stays current in {result.store_url}: "
                            "the build key is the last keyed build's, so nothing was rebuilt", highlight=False)
            return
        # soft_wrap: a skipped record or a warning is one line whatever the
        # width (grep-able in a log; Rich would cut it at 80 columns there).
        err = Console(stderr=True, soft_wrap=True)
        for problem in result.problems:
            err.print(f"[yellow]skipped:[/] {problem}", highlight=False, markup=True)
        m = result.manifest
        con = Console()
        con.print(f"index version [bold]{m.version}[/] is current in {result.store_url}", highlight=False)
        table = Table(show_header=True, header_style="bold")
        table.add_column("shard")
        table.add_column("tag")
        table.add_column("passages", justify="right")
        table.add_column("tokens", justify="right")
        for s in range(m.shards):
            table.add_row(str(s), f"{{s{s}}}", str(m.passages_per_shard[s]), str(m.tokens_per_shard[s]))
        con.print(table)
        p = m.params
        con.print(
            f"documents {m.num_documents} · sentences {m.num_sentences} · passages {m.num_passages} "
            f"(mean {p.get('mean_passage_tokens')} tokens; windows of {p.get('passage_sentences')} sentences, "
            f"stride {p.get('passage_stride')}, cap {p.get('passage_max_tokens')}) · graph edges {p.get('graph_edges')}",
            highlight=False,
        )
        if result.long_sentences:
            con.print(f"{result.long_sentences} sentences longer than the cap were cut into overlapping pieces", highlight=False)
        enc = p.get("encoder")
        con.print(f"dense vectors: {enc['id']} ({enc['dim']}-d {enc['dtype']}, encoder {enc['fingerprint']})" if enc
                  else "dense vectors: none (the router ranks lexically)", highlight=False)
        if result.problems:
            con.print(f"[yellow]{len(result.problems)} records skipped[/] (listed above)")
        empty = [s for s, n in enumerate(m.passages_per_shard) if n == 0]
        if empty:
            # A group (a document, or an article's paragraphs) stays whole on
            # one shard; a fixed shard count may outnumber a small corpus's.
            listed = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            err.print(f"[yellow]warning:[/] {len(empty)} of {m.shards} shards hold no passage (shards "
                      f"{listed}): the corpus has fewer document groups than shards, and a group "
                      f"is never split; their deployments will have nothing to read", highlight=False, markup=True)
        phases = " ".join(f"{k} {v:.1f}s" for k, v in result.phase_seconds.items())
        con.print(f"model {m.model} (tokenizer {m.tokenizer_fingerprint}) · {result.seconds:.1f} s ({phases})", highlight=False)
