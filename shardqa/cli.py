"""The `shardqa` command. Each stage registers its own sub-commands; heavy
imports happen inside the commands so `shardqa --help` stays instant."""

from __future__ import annotations

import os
import sys

import typer

from shardqa.errors import ShardQAError, one_line, validator_message

app = typer.Typer(
    name="shardqa",
    help="Sharded, millisecond-latency extractive question answering.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain: "[default: X]" in them is text, not Rich markup
    # (which would silently drop it).
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from shardqa import __version__

        typer.echo(f"shardqa {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Sharded, millisecond-latency extractive question answering."""


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
    try:  # the click typer runs on: recent typer vendors its own copy
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from shardqa.config import settings_error_line

    _warn_unknown_settings()
    try:
        # Not standalone: click would print usage errors as a boxed block and
        # swallow Ctrl-C; here every failure becomes one line.
        code = app(standalone_mode=False)
    except ShardQAError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            # `shardqa` (or a group) alone: its help, as a user asking for it.
            typer.echo(exc.ctx.get_help())
            sys.exit(2)
        where = exc.ctx.command_path if exc.ctx is not None else "shardqa"
        typer.echo(f"error: {one_line(validator_message(exc.format_message()), 1000)} (see `{where} --help`)", err=True)
        sys.exit(2)
    except ValidationError as exc:
        if exc.title != "Settings":
            _unexpected(exc)
        typer.echo(f"error: {settings_error_line(exc, env=True)}", err=True)
        sys.exit(2)
    except SettingsError as exc:
        # pydantic-settings could not even decode a variable (its message
        # names the field; the cause says why).
        cause = f" ({str(exc.__cause__).splitlines()[0]})" if exc.__cause__ else ""
        typer.echo(f"error: invalid setting: {str(exc).splitlines()[0]}{cause}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        _unexpected(exc)
    if code == 130:
        # Recent typer turns Ctrl-C into a quiet exit 130 itself when not
        # standalone, so the except above never sees it.
        typer.echo("interrupted", err=True)
    # A command's return value is not an exit code unless it is one.
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


#: SHARDQA_* variables that are not settings: read by a test, a script or
#: the chart's index Job, or SHARDQA_DEBUG above.
NOT_SETTINGS = frozenset({"SHARDQA_DEBUG", "SHARDQA_CORPUS", "SHARDQA_INDEX_BUILD_KEY", "SHARDQA_HELM", "SHARDQA_TERMINATION_LOG"})


def _warn_unknown_settings() -> None:
    """pydantic-settings ignores a misspelled variable, in the environment as
    in the `.env` file it reads; say so instead."""
    names = {k: "" for k in os.environ if k.upper().startswith("SHARDQA_")}
    if os.path.isfile(".env"):
        try:
            from dotenv import dotenv_values

            names.update({k: " (in .env)" for k in dotenv_values(".env") if k.upper().startswith("SHARDQA_") and k not in names})
        except Exception:  # an unreadable .env is the settings' own error to report
            pass
    if not names:
        return
    import difflib

    from shardqa.config import Settings

    # Matched without case, as pydantic-settings reads them.
    known = {f"SHARDQA_{name.upper()}" for name in Settings.model_fields}
    for name in sorted(k for k in names if k.upper() not in known | NOT_SETTINGS):
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        typer.echo(f"warning: {name}{names[name]} is not a shardqa setting and is ignored{hint}; `shardqa config` lists them",
                   err=True)


def _unexpected(exc: BaseException) -> None:
    """A failure no check named: still one line (its type and message), with
    the traceback one variable away, so a user can report it."""
    if os.environ.get("SHARDQA_DEBUG"):
        raise exc
    message = one_line(exc)
    typer.echo(f"error: {type(exc).__name__}{': ' + message if message else ''} (unexpected; SHARDQA_DEBUG=1 shows the traceback)", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
