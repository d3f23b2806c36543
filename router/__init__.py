"""Question -> the few passages (and so the few shards) worth reading.

``from shardqa.router import Router``; the heavy modules load on first use so
``shardqa --help`` stays instant.
"""

from __future__ import annotations

__all__ = ["Router", "RouteParams"]


def __getattr__(name):
    if name in __all__:
        from shardqa.router import router as _router

        return getattr(_router, name)
    raise AttributeError(name)
