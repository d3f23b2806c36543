"""Checks shared by the commands' options (typer callbacks)."""

from __future__ import annotations

import math

import typer


def finite(value: float | None) -> float | None:
    """Option callback: NaN and inf pass click's ranges (NaN compares false
    with any bound, inf with an open one), and are never a useful value."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


def positive(value: float | None) -> float | None:
    """Option callback: a finite number above zero."""
    if finite(value) is not None and value <= 0:
        raise typer.BadParameter("must be above 0")
    return value
