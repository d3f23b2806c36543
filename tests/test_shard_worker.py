"""The shard worker's index versions in memory."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from shardqa.services.shard_worker import KEEP_VERSIONS, ShardQuery, ShardWorker
from shardqa.types import TokenizedText


class _Store:
    """Version vN holds N passages; counts loads."""

    def __init__(self):
        self.loads = []

    def load_shard(self, shard, version, tokenizer=None):
        self.loads.append(version)
        return [SimpleNamespace(passage_id=f"{version}-p{i}") for i in range(int(version[1:]))]


def _query(version: str) -> ShardQuery:
    empty = TokenizedText(ids=np.zeros(0, np.int32), offsets=np.zeros((0, 2), np.int32), word_ids=np.zeros(0, np.int32))
    return ShardQuery(version, empty, (f"{version}-p0",), 1)


def _worker() -> tuple[ShardWorker, _Store]:
    store = _Store()
    return ShardWorker(0, SimpleNamespace(tokenizer=None, model_id="m"), store), store


def test_the_version_being_answered_is_not_pushed_out_by_two_quick_publishes():
    """v1 is answered while v2 and v3 are published and preloaded: the least
    recently used (v2) goes, not v1, so answering v1 never reloads it."""
    assert KEEP_VERSIONS == 2
    worker, store = _worker()
    worker.passages("v1")
    worker.passages("v2")              # the refresh preloads a new version
    worker._passages_of(_query("v1"))  # requests still pinned to v1
    worker.passages("v3")              # and another one, quickly
    assert worker.holds("v1") and worker.holds("v3") and not worker.holds("v2")
    assert worker._passages_of(_query("v1"))[0].passage_id == "v1-p0"
    assert store.loads == ["v1", "v2", "v3"]
    assert (worker.status("v3").passages, worker.status("v1").passages) == (3, 1)


def test_a_version_prepared_for_a_switch_counts_as_used():
    """The ingress prepares v2 and switches to it; before v2's first query a
    quick v3 publish drops v1, not the version now served."""
    worker, _ = _worker()
    worker.passages("v1")
    worker._passages_of(_query("v1"))
    worker.passages("v2")   # preloaded by the refresh
    worker._passages_of(_query("v1"))  # v1 still answered meanwhile
    worker.passages("v2")   # the ingress's prepare(v2), then its switch
    worker.passages("v3")
    assert worker.holds("v2") and worker.holds("v3") and not worker.holds("v1")
