"""One shard's half of answering: a model copy and the shard's pre-tokenised
passages, by index version, answering batches of (question ids, passage ids).

The Ray Serve shard deployment wraps one of these per replica; keeping it free
of Serve lets the same code run in-process (tests, a single-process server).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from shardqa.errors import IndexNotFound, ShardQAError, StoreError
from shardqa.types import Answer, Passage, TokenizedText

log = logging.getLogger(__name__)

#: Index versions a replica keeps in memory: the current one, and the previous
#: one for requests routed before a switch that are still in flight. The
#: least recently used goes first, so two versions published in quick
#: succession never push out the one still being answered.
KEEP_VERSIONS = 2


@dataclass(frozen=True)
class ShardQuery:
    """What the ingress sends a shard: token ids and passage ids, never text,
    so a request costs a few hundred bytes across the handle."""

    index_version: str
    question: TokenizedText
    passage_ids: tuple[str, ...]
    top_k: int
    #: Read ``passage_ids[0]`` alone first and the others only when its best
    #: answer's logit is below this (the ingress's read-first rule, applied
    #: here so the rest of this shard's passages cost no second hop); None
    #: reads them all at once.
    stop_logit: float | None = None
    #: The ingress had other questions in flight when it sent this one, or
    #: sent it to other shards at the same time: the replicas are sharing
    #: the cores, so the reader runs on its ``threads_under_load`` (settings)
    #: instead of all its threads.
    under_load: bool = False

    def first_is_confident(self, answers: Sequence[Answer]) -> bool:
        """Whether ``answers`` let the read stop after ``passage_ids[0]``."""
        first = self.passage_ids[0]
        best = max((a.logit for a in answers if a.passage_id == first), default=-math.inf)
        return self.stop_logit is not None and best >= self.stop_logit


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    versions: tuple[str, ...]
    passages: int
    model_id: str


class ShardWorker:
    def __init__(self, shard: int, reader, store):
        self.shard = shard
        self.reader = reader
        self.store = store
        self._versions: OrderedDict[str, dict[str, Passage]] = OrderedDict()
        self._load_lock = threading.Lock()  # one load at a time
        self._state_lock = threading.Lock()  # guards _versions' changes and copies

    # --- index versions ---------------------------------------------------------

    def passages(self, version: str) -> dict[str, Passage]:
        """This shard's passages of `version`, loaded on first use (a use:
        the ingress preparing or asking about a version counts, as answering does)."""
        found = self._versions.get(version)
        if found is not None:
            self._touch(version)
            return found
        with self._load_lock:  # one load per version even when requests race
            found = self._versions.get(version)
            if found is None:
                found = self._load(version)
        return found

    def _load(self, version: str) -> dict[str, Passage]:
        t0 = time.perf_counter()
        try:
            passages = self.store.load_shard(self.shard, version, tokenizer=self.reader.tokenizer)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"shard {self.shard}: cannot load index version {version}: {exc}") from exc
        by_id = {p.passage_id: p for p in passages}
        with self._state_lock:
            self._versions[version] = by_id
            dropped = []
            while len(self._versions) > KEEP_VERSIONS:
                dropped.append(self._versions.popitem(last=False)[0])
        for old in dropped:
            log.info("shard %d: dropped index version %s", self.shard, old)
        log.info("shard %d: loaded %d passages of index version %s in %.2fs", self.shard, len(by_id), version, time.perf_counter() - t0)
        return by_id

    def _touch(self, version: str) -> None:
        """Mark `version` most recently used, so it is the last to be dropped."""
        with self._state_lock:  # the loader thread changes the order too
            if version in self._versions:
                self._versions.move_to_end(version)

    def load_current(self) -> str:
        """Load the store's current version (start-up, and when it changes)."""
        version = self.store.current_version()
        self.passages(version)
        return version

    def holds(self, version: str) -> bool:
        """Whether `version` is in memory (answering it needs no load)."""
        return version in self._versions

    def status(self, version: str | None = None) -> ShardStatus:
        """The versions held; ``passages`` counts `version`'s when held, else
        the most recently used one's."""
        with self._state_lock:
            versions = tuple(self._versions)
            counted = version if version in self._versions else (versions[-1] if versions else None)
            passages = len(self._versions[counted]) if counted is not None else 0
        return ShardStatus(self.shard, versions, passages, self.reader.model_id)

    # --- answering ---------------------------------------------------------------

    def answer_batch(self, queries: Sequence[ShardQuery]) -> list[list[Answer] | ShardQAError]:
        """Batched reader calls for many questions: each query gets the best
        ``top_k`` answers of every passage it reads, passage by passage, so
        the ingress can rank them with the router's scores.

        A query this shard cannot answer (a passage or version it does not
        hold) gets its error in its place, so it cannot fail the others it
        was batched with; ``answers_or_raise`` turns it back into a raise.

        A query with ``stop_logit`` reads its first passage in the first
        forward pass and its other passages in a second one, only if that
        first passage was not confident; the second pass batches every such
        query of the batch.

        A batch of more than one query, or one the ingress sent while busy
        (``under_load``), is read with the reader's thread count for a busy
        service."""
        out: list[list[Answer] | ShardQAError] = [[] for _ in queries]
        wanted: dict[int, list[Passage]] = {}
        for i, q in enumerate(queries):
            try:
                wanted[i] = self._passages_of(q)
            except ShardQAError as exc:
                out[i] = exc
        held_back = {i: queries[i].stop_logit is not None and len(ps) > 1 for i, ps in wanted.items()}
        busy = self.reads_under_load(queries)
        first = self._read([(queries[i], ps[:1] if held_back[i] else ps) for i, ps in wanted.items()], busy)
        for i, answers in zip(wanted, first):
            out[i] = answers
        second = [i for i in wanted if held_back[i] and not queries[i].first_is_confident(out[i])]
        if second:
            for i, answers in zip(second, self._read([(queries[i], wanted[i][1:]) for i in second], busy)):
                out[i].extend(answers)
        return out

    @staticmethod
    def reads_under_load(queries: Sequence[ShardQuery]) -> bool:
        """Whether ``answer_batch(queries)`` runs on the reader's thread count
        for a busy service: several queries, or one the ingress sent while busy."""
        return len(queries) > 1 or any(q.under_load for q in queries)

    def _passages_of(self, query: ShardQuery) -> list[Passage]:
        # The caller loads a version before the query reaches the batch (a
        # Serve replica on its loader thread): a load here would stall every
        # query batched with this one.
        by_id = self._versions.get(query.index_version)
        if by_id is None:
            raise IndexNotFound(f"shard {self.shard} does not hold index version {query.index_version}")
        self._touch(query.index_version)
        try:
            return [by_id[pid] for pid in query.passage_ids]
        except KeyError as exc:
            raise IndexNotFound(f"shard {self.shard} has no passage {exc.args[0]!r} in index version {query.index_version}") from None

    def _read(self, work: Sequence[tuple[ShardQuery, Sequence[Passage]]], under_load: bool) -> list[list[Answer]]:
        """One batched reader call: every (query, passages) pair's answers, per passage."""
        from shardqa.services.reader import ReadRequest

        requests, owners = [], []
        for i, (q, passages) in enumerate(work):
            for p in passages:
                # By logit: the ingress merges passages on it (qa_service.merge_answers).
                requests.append(ReadRequest(q.question, [p], q.top_k, rank_by="logit"))
                owners.append(i)
        out: list[list[Answer]] = [[] for _ in work]
        for i, answers in zip(owners, self.reader.answer_batch(requests, under_load=under_load)):
            out[i].extend(answers)
        return out


def answers_or_raise(result: list[Answer] | ShardQAError) -> list[Answer]:
    """One query's entry of ``ShardWorker.answer_batch``: its answers, or its error raised."""
    if isinstance(result, ShardQAError):
        raise result
    return result
