"""The shard worker's index versions in memory."""

from __future__ import annotations

import numpy as np

from shardqa.services.shard_worker import KEEP_VERSIONS, ShardQuery, ShardWorker
from shardqa.types import TokenizedText


class _Store:
    """Three versions of one passage each; counts loads."""

    def __init__(self):
        self.loads = []

    def load_shard(self, shard, version, tokenizer=None):
        from types import SimpleNamespace

        self.loads.append(version)
        return [SimpleNamespace(passage_id=f"{version}-p")]


def _query(version: str) -> ShardQuery:
    empty = TokenizedText(ids=np.zeros(0, np.int32), offsets=np.zeros((0, 2), np.int32), word_ids=np.zeros(0, np.int32))
    return ShardQuery(version, empty, (f"{version}-p",), 1)


def test_the_version_being_answered_is_not_pushed_out_by_two_quick_publishes():
    """v1 is answered while v2 and v3 are published and preloaded: the least
    recently used (v2) goes, not v1, so answering v1 never reloads it."""
    from types import SimpleNamespace

    assert KEEP_VERSIONS == 2
    store = _Store()
    worker = ShardWorker(0, SimpleNamespace(tokenizer=None, model_id="m"), store)
    worker.passages("v1")
    worker.passages("v2")          # the refresh preloads a new version
    worker._passages_of(_query("v1"))  # requests still pinned to v1
    worker.passages("v3")          # and another one, quickly
    assert worker.holds("v1") and worker.holds("v3") and not worker.holds("v2")
    assert worker._passages_of(_query("v1"))[0].passage_id == "v1-p"
    assert store.loads == ["v1", "v2", "v3"]
    status = worker.status("v3")
    assert set(status.versions) == {"v1", "v3"} and status.passages == 1
