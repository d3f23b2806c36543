"""The `shardqa` command. Each stage registers its own sub-commands; heavy
imports happen inside the commands so `shardqa --help` stays instant."""

from __future__ import annotations

import sys

import typer

from shardqa.errors import ShardQAError

app = typer.Typer(
    name="shardqa",
    help="Sharded, millisecond-latency extractive question answering.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a one-line error (no traceback) and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _register() -> None:
    # The order of `shardqa --help`: the request's path, then evaluation and
    # training, then benchmarks and operations.
    from importlib import import_module

    for module in (
        "shardqa.preprocessing.cli",
        "shardqa.router.cli",
        "shardqa.services.serve_cli",
        "shardqa.services.cli",
        "shardqa.training.cli",
        "shardqa.services.bench_cli",
        "shardqa.monitoring.cli",
    ):
        import_module(module).register(app)


_register()


def settings_error(exc) -> str:
    """One line for a rejected SHARDQA_* setting (environment or .env)."""
    parts = []
    for e in exc.errors():
        name = ".".join(str(p) for p in e.get("loc", ())) or "settings"
        parts.append(f"SHARDQA_{name.upper()}={e.get('input')!r}: {e.get('msg', 'invalid')}")
    return "invalid setting " + "; ".join(parts)


def main() -> None:
    from pydantic import ValidationError

    try:
        app()
    except ShardQAError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        typer.echo(f"error: {settings_error(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
