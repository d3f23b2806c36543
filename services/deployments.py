"""The Ray Serve deployments: one per shard, and the HTTP ingress.

Each shard is its own deployment (`shard-0`, `shard-1`, ...), so a replica
of it holds exactly that shard's passages, and Serve's handle routing, health
checks and replacement of dead replicas all work per shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from shardqa.errors import IndexNotFound, StoreUnreachable
from shardqa.services.service_config import ServiceConfig
from shardqa.services.shard_worker import ShardQuery, ShardStatus, ShardWorker, answers_or_raise
from shardqa.types import Answer

log = logging.getLogger("ray.serve")

#: How long the model thread may take to pick up a health-check no-op.
HEALTH_CHECK_MODEL_THREAD_S = 5.0


@serve.deployment(name="shard", health_check_period_s=5, health_check_timeout_s=10)
class ShardDeployment:
    async def __init__(self, shard: int, config: ServiceConfig):
        from shardqa.monitoring import metrics
        from shardqa.preprocessing.store import open_store
        from shardqa.services.reader import Reader

        settings = config.settings
        self.shard = shard
        self.settings = settings
        self._metrics = metrics
        # The model runs on one dedicated thread: the replica's event loop
        # stays free to queue the next batch while a forward pass runs, and
        # the model's intra-op threads are its own (`threads`, or
        # `threads_under_load` for a busy service), however many callers wait.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard{shard}")
        # Index versions load on their own thread, so answering goes on while
        # a new version is read.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard{shard}-load")
        reader = Reader.load(settings=settings, threads=config.resources(shard).threads(settings),
                             threads_under_load=settings.threads_under_load)
        self.worker = ShardWorker(shard, reader, open_store(settings.store))
        self.answer_batch.set_max_batch_size(settings.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        try:
            await self._load(self.worker.load_current)
        except IndexNotFound as exc:
            log.warning("shard %d: no index yet (%s); loading it when it appears", shard, exc)
        except StoreUnreachable as exc:
            # A store briefly down must not fail the constructor: Serve gives
            # up for good on a deployment whose replicas never started. Other
            # store errors (another tokenizer, a damaged index) do not mend
            # by waiting, and fail the deployment loudly.
            log.warning("shard %d: cannot load the index yet (%s); trying again every %g s", shard, exc,
                        settings.index_refresh_s)
        self._status_problem = ""
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _load(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def _refresh_loop(self) -> None:
        # Every replica preloads a new index version on its own, so the
        # ingress's switch (which tells one replica per shard) finds all
        # replicas ready instead of the first requests paying the load.
        last_problem = ""
        while True:
            await asyncio.sleep(self.settings.index_refresh_s)
            try:
                await self._load(self.worker.load_current)
            except Exception as exc:
                if str(exc) != last_problem:  # once per distinct problem, not every tick
                    log.warning("shard %d: index refresh failed: %s", self.shard, exc)
                last_problem = str(exc)
            else:
                last_problem = ""

    async def answer(self, query: ShardQuery) -> list[Answer]:
        for _ in range(2):  # a version dropped between the load and the batch is loaded once more
            if not self.worker.holds(query.index_version):
                # On the loader thread, before batching: a version this replica
                # has not loaded yet (or has dropped) holds up only this request.
                await self._load(self.worker.passages, query.index_version)
            result = await self.answer_batch(query)
            if self.worker.holds(query.index_version) or not isinstance(result, IndexNotFound):
                break
        return answers_or_raise(result)

    # Its size and wait are set from the settings in __init__.
    @serve.batch
    async def answer_batch(self, queries: list[ShardQuery]) -> list[list[Answer] | Exception]:
        t0 = time.perf_counter()
        results = await self._run(self.worker.answer_batch, queries)
        self._metrics.record_shard_inference(self.shard, time.perf_counter() - t0, len(queries),
                                             self.worker.reader.adapts_threads and self.worker.reads_under_load(queries))
        return results

    async def prepare(self, version: str) -> ShardStatus:
        await self._load(self.worker.passages, version)
        return self.worker.status(version)

    async def status(self, version: str | None = None) -> ShardStatus:
        """What this replica holds. Given the ingress's `version`, a replica
        that has not loaded it yet (its own refresh runs every
        ``index_refresh_s``) loads it first: /readyz then reports whether
        this replica can answer the version, not whether its refresh tick
        happened to come before the probe."""
        if version is not None and not self.worker.holds(version):
            try:
                await self._load(self.worker.passages, version)
            except Exception as exc:  # reported as "does not hold it" by the caller
                problem = f"cannot load index version {version} for a status check: {exc}"
                if problem != self._status_problem:  # once, not on every probe
                    log.warning("shard %d: %s", self.shard, problem)
                self._status_problem = problem
        return self.worker.status(version)

    async def check_health(self) -> None:
        # Serve replaces a replica whose check fails. A wedged model thread
        # would leave requests hanging, so the check goes through it (behind
        # at most one batch, far shorter than the timeout). A replica
        # without any index is still healthy: the index may not be built
        # yet, and the ingress's /readyz reports that case.
        await asyncio.wait_for(self._run(lambda: None), HEALTH_CHECK_MODEL_THREAD_S)


@serve.deployment(name="ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(self, config: ServiceConfig, *shard_handles):
        from shardqa.services.qa_service import QAService
        from shardqa.services.shard_client import ServeShards

        self.config = config
        # The API's lifespan starts the service (index watcher) on the
        # replica's serving loop.
        self.service = QAService.create(config.settings, ServeShards(shard_handles, transport=config.settings.shard_transport))

    def __serve_build_asgi_app__(self):
        from shardqa.services.api import create_api

        return create_api(self.service, self.config.settings)
