"""End-to-end answers in one process: the service's own route → read → merge
path (`QAService` over in-process shard workers, no Ray, no HTTP) over SQuAD
questions, scored with the official metric.

This is what tunes the reading settings (`route_k`, `route_min_relative_score`,
`read_first_stop_logit`, `merge_route_weight`, set as `SHARDQA_*` variables):
it answers exactly as a running service would, minus the hop costs, so F1 and
passages read carry over, and its latencies are the floor a service adds its
hops to. `--skip`/`--every` pick questions the HTTP benchmark never asks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from shardqa.services.qa_service import READING_SETTINGS


@dataclass(frozen=True)
class AnswersEvaluation:
    questions: int
    refused: int  # questions the service refused (scored as empty answers)
    exact_match: float
    f1: float
    passages_read: float  # mean per question
    one_passage_share: float  # questions answered from one passage (the best was confident, or the only one read)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    settings: dict

    def to_json(self) -> dict:
        return asdict(self)


def pick_questions(examples, seed: int = 0, skip: int = 0, every: int = 1, limit: int | None = None) -> list:
    """Distinct answerable questions, shuffled with `seed` as `shardqa bench`
    shuffles them, then ``[skip::every][:limit]``. The benchmark asks the
    first ones of its shuffle, so a large `skip` keeps tuning off them."""
    from shardqa.services.bench import shuffled_questions

    return shuffled_questions(examples, seed)[skip::every][:limit]


class _CountingReader:
    """The reader, counting the passages it is asked to read (one per request)."""

    def __init__(self, reader):
        self._reader = reader
        self.passages = 0

    def answer_batch(self, requests, under_load=False):
        self.passages += sum(len(r.passages) for r in requests)
        return self._reader.answer_batch(requests, under_load=under_load)

    def __getattr__(self, name):
        return getattr(self._reader, name)


def evaluate_answers(settings, examples: Sequence, *, reader=None, progress: bool = True) -> AnswersEvaluation:
    """Answer every example through the service's path and score it."""
    from shardqa.errors import InvalidQuestion, InvalidRequest
    from shardqa.preprocessing.store import open_store
    from shardqa.services.qa_service import QAService
    from shardqa.services.reader import Reader
    from shardqa.services.shard_client import LocalShards
    from shardqa.services.shard_worker import ShardWorker
    from shardqa.training.squad import squad_scores

    if not examples:
        raise InvalidRequest("no questions to evaluate (check --limit, --skip and --every)")
    store = open_store(settings.store)
    shards = store.manifest(store.current_version()).shards
    counting = _CountingReader(reader or Reader.load(settings=settings))
    service = QAService.create(settings, LocalShards([ShardWorker(s, counting, store) for s in range(shards)]))

    async def run() -> tuple[dict[str, str], list[float], list[int], int]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        predictions, latencies, read, refused = {}, [], [], 0
        columns = (TextColumn("answer"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
        try:
            if not await service.start(wait_s=max(settings.startup_index_wait_s, 60)):
                raise InvalidRequest(f"cannot serve the index in {settings.store}: {service.view_problem}")
            with Progress(*columns, disable=not progress, transient=True) as bar:
                task = bar.add_task("answer", total=len(examples))
                for ex in examples:
                    before = counting.passages
                    t0 = time.perf_counter()
                    try:
                        # The service's public path; the questions are distinct
                        # under its cache key, so every one is answered uncached.
                        outcome = await service.answer(ex.question)
                    except InvalidQuestion:
                        # A question the service refuses (too long, empty)
                        # scores as an empty answer, as a client would see it.
                        refused += 1
                        predictions[ex.id] = ""
                    else:
                        latencies.append(time.perf_counter() - t0)
                        read.append(counting.passages - before)
                        answers = json.loads(outcome.answers_json)
                        predictions[ex.id] = answers[0]["text"] if answers else ""
                    bar.advance(task)
        finally:
            await service.stop()
        return predictions, latencies, read, refused

    predictions, latencies, read, refused = asyncio.run(run())
    if not latencies:
        raise InvalidRequest(f"the service refused all {refused} questions")
    scores = squad_scores(predictions, list(examples))
    ms = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    one_passage = sum(1 for n in read if n <= 1) / len(read)
    return AnswersEvaluation(
        questions=len(examples),
        refused=refused,
        exact_match=round(scores["exact_match"], 2),
        f1=round(scores["f1"], 2),
        passages_read=round(float(np.mean(read)), 3),
        one_passage_share=round(one_passage, 4),
        p50_ms=round(float(p50), 2),
        p90_ms=round(float(p90), 2),
        p99_ms=round(float(p99), 2),
        mean_ms=round(float(ms.mean()), 2),
        # inf is a valid setting but not valid JSON.
        settings={name: _json_safe(getattr(settings, name)) for name in READING_SETTINGS},
    )


def _json_safe(value):
    return str(value) if isinstance(value, float) and not np.isfinite(value) else value
