"""Corpus -> versioned, sharded, pre-tokenised index (see docs/index-and-routing.md).

``from shardqa.preprocessing import build_index``; modules load on first use so
``shardqa --help`` stays instant.
"""

from __future__ import annotations

__all__ = ["build_index", "build_index_report", "open_store"]


def __getattr__(name):
    if name in ("build_index", "build_index_report"):
        from shardqa.preprocessing import build

        return getattr(build, name)
    if name == "open_store":
        from shardqa.preprocessing.store import open_store

        return open_store
    raise AttributeError(name)
