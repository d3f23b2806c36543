"""What one call to a shard costs beyond its read.

The ingress reaches a shard through a Ray Serve deployment handle at least
once per uncached question. This measures that hop from a Ray driver on the
service's cluster, next to what it is built from: a bare Ray actor call, a
Serve handle call to a deployment that does nothing, the same call to a shard
replica with no passage to read (Serve plus the replica's `@serve.batch` and
model thread), and a one-passage read through the handle beside the same read
in the caller's own process. The difference between the last two is what the
path adds to a read; the first rows say how much of it is Ray and how much is
Serve.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shardqa.services.shard_worker import answers_or_raise

#: A question of typical length; the read's cost is set by the passage.
PROBE_QUESTION = "Which year did the university open its first campus outside the city?"
PROBE_APP = "shardqa-hop-probe"


def _stats(latencies_s: list[float]) -> dict[str, float]:
    from shardqa.services.bench import latency_stats

    out = latency_stats(latencies_s)
    return {"p50_ms": out["p50_ms"], "p90_ms": out["p90_ms"], "n": len(latencies_s)}


async def _timed(call, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call(0)
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t0)
    return out


async def _measure(settings, app_name: str, shard: int, calls: int, warmup: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from shardqa.preprocessing.store import open_store
    from shardqa.services.app import shard_deployment_name
    from shardqa.services.reader import Reader
    from shardqa.services.shard_client import transport_options
    from shardqa.services.shard_worker import ShardQuery, ShardWorker

    handle = serve.get_deployment_handle(shard_deployment_name(shard), app_name=app_name)
    status = await handle.status.remote()
    if not status.versions:
        raise RuntimeError(f"shard {shard} holds no index version yet")
    version = status.versions[-1]

    reader = Reader.load(settings=settings)
    worker = ShardWorker(shard, reader, open_store(settings.store))
    pids = sorted(worker.passages(version))
    if not pids:
        raise RuntimeError(f"shard {shard} has no passages in index version {version}")
    question = reader.tokenizer.tokenize(PROBE_QUESTION)

    @ray.remote(num_cpus=0)
    class Echo:
        async def echo(self, x):
            return x

    @serve.deployment(name="echo", ray_actor_options={"num_cpus": 0})
    class EchoDeployment:
        async def echo(self, x):
            return x

    rows: list[dict[str, Any]] = []
    actor = Echo.remote()
    try:
        rows.append({"call": "Ray actor call, no Serve (an empty method)",
                     **_stats(await _timed(lambda i: actor.echo.remote(i), calls, warmup))})
    finally:
        ray.kill(actor)

    probe = serve.run(EchoDeployment.bind(), name=PROBE_APP, route_prefix=None)
    try:
        for transport in ("actor", "grpc"):
            via_transport = transport_options(probe, transport)
            rows.append({"call": f"Serve handle call to a deployment that does nothing ({transport} transport)",
                         **_stats(await _timed(lambda i: via_transport.echo.remote(i), calls, warmup))})
    finally:
        serve.delete(PROBE_APP)

    # The shard rows call as the ingress does.
    transport = settings.shard_transport
    handle = transport_options(handle, transport)

    empty = ShardQuery(version, question, (), 1)
    rows.append({"call": f"Serve handle call to shard {shard}, no passage to read ({transport} transport)",
                 **_stats(await _timed(lambda i: handle.answer.remote(empty), calls, warmup))})

    # The same passages, alternately through the handle and in this process,
    # so both see the machine in the same state.
    via, here, differ = [], [], 0
    for i in range(warmup + calls):
        query = ShardQuery(version, question, (pids[i % len(pids)],), 1)
        t0 = time.perf_counter()
        remote = await handle.answer.remote(query)
        t1 = time.perf_counter()
        local = answers_or_raise(worker.answer_batch([query])[0])
        t2 = time.perf_counter()
        if i >= warmup:
            via.append(t1 - t0)
            here.append(t2 - t1)
            differ += [a.text for a in remote] != [a.text for a in local]
    rows.append({"call": f"Serve handle call to shard {shard}, one passage read ({transport} transport)", **_stats(via)})
    rows.append({"call": "the same read in this process (`ShardWorker.answer_batch`)", **_stats(here)})
    return {"rows": rows, "shard": shard, "index_version": version, "backend": reader.backend.name, "transport": transport,
            "passages_cycled": min(len(pids), warmup + calls), "answers_differing": differ}


def measure_hops(settings, *, ray_address: str | None = None, app_name: str | None = None, shard: int = 0,
                 calls: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Run the probe on the Ray cluster serving ``app_name`` (connecting to
    ``ray_address`` unless this process already is a driver of it)."""
    import ray

    from shardqa.services.app import APP_NAME
    from shardqa.services.runtime import check_reachable

    joined = False
    if not ray.is_initialized():
        check_reachable(ray_address)
        ray.init(address=ray_address or "auto", namespace="serve", logging_level="ERROR", log_to_driver=False)
        joined = True
    try:
        return asyncio.run(_measure(settings, app_name or APP_NAME, shard, calls, warmup)) | {"calls": calls}
    finally:
        if joined:
            ray.shutdown()


def hop_table(hop: dict[str, Any]) -> str:
    from shardqa.services.bench import _fmt

    head = "| one call, from a Ray driver on the service's cluster | p50 ms | p90 ms |\n|---|---:|---:|"
    rows = [f"| {r['call']} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} |" for r in hop["rows"]]
    return head + "\n" + "\n".join(rows)
