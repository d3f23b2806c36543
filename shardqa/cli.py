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


@app.command("config")
def config(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """The settings in force (defaults, SHARDQA_<NAME> variables, .env), passwords in URLs hidden."""
    import json

    from shardqa.config import get_settings, settings_in_force

    values = settings_in_force(get_settings())
    if as_json:
        typer.echo(json.dumps(values))
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table("setting", Column("value", overflow="fold"), box=None, caption="set as SHARDQA_<NAME> or in .env")
    for name, value in values.items():
        table.add_row(name, value if isinstance(value, str) else "none" if value is None else json.dumps(value))
    Console().print(table, highlight=False)


def main() -> None:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from shardqa.config import settings_error_line

    try:
        app()
    except ShardQAError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        typer.echo(f"error: {settings_error_line(exc, env=True)}", err=True)
        sys.exit(2)
    except SettingsError as exc:
        # pydantic-settings could not even decode a variable (its message
        # names the field; the cause says why).
        cause = f" ({str(exc.__cause__).splitlines()[0]})" if exc.__cause__ else ""
        typer.echo(f"error: invalid setting: {str(exc).splitlines()[0]}{cause}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
