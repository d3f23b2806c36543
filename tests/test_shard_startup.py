import asyncio

import pytest


@pytest.mark.parametrize("problem", ["unreachable", "tokenizer"])
def test_a_shard_replica_starts_while_the_store_is_unreachable(problem, monkeypatch, tmp_path):
    """A store briefly unreachable at start-up is retried by the refresh
    loop: failing the constructor would make Serve give the deployment up
    for good. Passages cut by another tokenizer still fail it."""
    from shardqa.config import Settings
    from shardqa.errors import StoreError, TokenizerMismatch
    from shardqa.services import deployments
    from shardqa.services.reader import Reader
    from shardqa.services.service_config import ServiceConfig, ShardResources
    from shardqa.services.shard_worker import ShardWorker

    monkeypatch.setattr(Reader, "load", classmethod(lambda cls, **kw: object()))
    error = (StoreError("cannot reach Redis at redis://127.0.0.1:1/0: Connection refused") if problem == "unreachable"
             else TokenizerMismatch("index built with another tokenizer"))
    calls = []

    def load_current(self):
        calls.append(1)
        raise error

    monkeypatch.setattr(ShardWorker, "load_current", load_current)
    warnings = []
    monkeypatch.setattr(deployments.log, "warning", lambda msg, *args: warnings.append(msg % args))
    config = ServiceConfig(Settings(_env_file=None, store=str(tmp_path), index_refresh_s=0.01), 1, (ShardResources(1, 1.0, 0.0),))

    async def start():
        replica = deployments.ShardDeployment.func_or_class.__new__(deployments.ShardDeployment.func_or_class)
        await replica.__init__(0, config)
        await asyncio.sleep(0.2)  # the refresh loop keeps trying
        replica._refresher.cancel()
        return replica

    if problem == "tokenizer":
        with pytest.raises(TokenizerMismatch):
            asyncio.run(start())
        return
    asyncio.run(start())
    assert len(calls) >= 2
    assert warnings[0].startswith("shard 0: cannot load the index yet (cannot reach Redis")
