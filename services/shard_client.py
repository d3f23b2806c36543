"""How the ingress reaches the shards: Ray Serve deployment handles in the
service, or in-process shard workers for a single-process server and tests.
Both offer the same three calls."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

from shardqa.errors import ServiceUnavailable, ShardQAError, one_line
from shardqa.services.shard_worker import ShardQuery, ShardStatus, ShardWorker, answers_or_raise
from shardqa.types import Answer

log = logging.getLogger(__name__)


class ShardClient(Protocol):
    num_shards: int

    async def answer(self, shard: int, query: ShardQuery) -> list[Answer]: ...

    async def prepare(self, shard: int, version: str) -> ShardStatus:
        """Make (at least one replica of) `shard` hold `version`."""
        ...

    async def status(self, shard: int, timeout_s: float, version: str | None = None) -> ShardStatus:
        """What a replica of `shard` holds, after loading `version` if given and
        missing; raises when no replica of the shard answers in time."""
        ...


class LocalShards:
    """Shard workers in this process. One thread runs the model, as a replica
    would, so the event loop keeps accepting requests during a forward pass."""

    def __init__(self, workers: Sequence[ShardWorker]):
        self.workers = list(workers)
        self.num_shards = len(self.workers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def answer(self, shard: int, query: ShardQuery) -> list[Answer]:
        worker = self.workers[shard]
        if not worker.holds(query.index_version):
            await self._run(worker.passages, query.index_version)
        return answers_or_raise((await self._run(worker.answer_batch, [query]))[0])

    async def prepare(self, shard: int, version: str) -> ShardStatus:
        worker = self.workers[shard]
        await self._run(worker.passages, version)
        return worker.status(version)

    async def status(self, shard: int, timeout_s: float, version: str | None = None) -> ShardStatus:
        worker = self.workers[shard]
        if version is not None and not worker.holds(version):
            try:
                await asyncio.wait_for(self._run(worker.passages, version), timeout_s)
            except Exception:  # reported as "does not hold it" by the caller
                pass
        return worker.status(version)


def transport_options(handle, transport: str):
    """The handle calling over `transport` (the `shard_transport` setting).

    A replica that dies during a gRPC call surfaces as ActorUnavailableError,
    like one lost during an actor call, so the retries below cover both."""
    if transport == "grpc":
        return handle.options(_by_reference=False)
    if transport == "actor":
        return handle.options(_by_reference=True)
    raise ValueError(f"unknown shard transport {transport!r}; expected grpc or actor")


class ServeShards:
    """Deployment handles, one per shard, with retries on lost replicas.

    A request that was running on a replica when it died fails with an actor
    error; Serve has by then stopped routing to that replica, so sending it
    again reaches a live replica of the shard (or waits for a replacement).
    """

    def __init__(self, handles: Sequence, retry_deadline_s: float = 10.0, transport: str = "grpc"):
        import ray.exceptions as rex
        import ray.serve.exceptions as sex

        self.handles = [transport_options(h, transport) for h in handles]
        self.num_shards = len(self.handles)
        self.retry_deadline_s = retry_deadline_s
        # Exceptions that mean "the replica went away", worth sending again.
        self._lost = tuple(
            e for e in [getattr(rex, n, None) for n in ("RayActorError", "ActorUnavailableError", "ActorDiedError")]
            + [getattr(sex, "ReplicaUnavailableError", None)] if e is not None
        )
        # The shard cannot take the request at all (its deployment failed to
        # deploy, or its queue is full): the service is unavailable, not broken.
        self._refused = tuple(
            e for e in (getattr(sex, n, None) for n in ("DeploymentUnavailableError", "BackPressureError")) if e is not None
        )
        self._task_error = rex.RayTaskError

    async def _call(self, shard: int, method: str, *args, timeout_s: float | None = None):
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.retry_deadline_s)
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                response = getattr(self.handles[shard], method).remote(*args)
                return await asyncio.wait_for(response, max(remaining, 0.001)) if timeout_s is not None else await response
            except self._lost as exc:
                if time.monotonic() + delay >= deadline:
                    raise ServiceUnavailable(f"shard {shard} has no live replica ({type(exc).__name__})") from None
                log.warning("shard %d: replica lost during %s (attempt %d), sending again", shard, method, attempt)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except self._refused as exc:
                raise ServiceUnavailable(f"shard {shard} cannot take requests ({type(exc).__name__}: {one_line(getattr(exc, 'message', exc))})") from None
            except asyncio.TimeoutError:
                # Only `status` has a timeout of its own; a timeout from inside Ray
                # (GetTimeoutError is one) may come from a call without one.
                within = f" within {timeout_s:.1f}s" if timeout_s is not None else ""
                raise ServiceUnavailable(f"shard {shard} did not answer{within}") from None
            except self._task_error as exc:
                # Ray wraps a replica's exception in a class that is both
                # RayTaskError and the original, whose message is the remote
                # traceback: re-raise shardqa's own error, with its own message.
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ShardQAError):
                    raise cause from None
                raise

    async def answer(self, shard: int, query: ShardQuery) -> list[Answer]:
        return await self._call(shard, "answer", query)

    async def prepare(self, shard: int, version: str) -> ShardStatus:
        return await self._call(shard, "prepare", version)

    async def status(self, shard: int, timeout_s: float, version: str | None = None) -> ShardStatus:
        return await self._call(shard, "status", version, timeout_s=timeout_s)
