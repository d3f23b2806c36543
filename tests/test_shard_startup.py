"""A shard replica's start-up while its index store is not there yet."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(monkeypatch, store: str):
    """Run a ShardDeployment replica's constructor (no Ray: the class itself)
    with a stand-in reader; the refresh loop runs for a moment."""
    from shardqa.config import Settings
    from shardqa.services import deployments
    from shardqa.services.reader import Reader
    from shardqa.services.service_config import ServiceConfig, ShardResources
    from shardqa.tokenization import TextTokenizer

    tokenizer = TextTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tiny-bert-qa")
    monkeypatch.setattr(Reader, "load", classmethod(lambda cls, **kw: SimpleNamespace(tokenizer=tokenizer, model_id="m", adapts_threads=False)))
    warnings = []
    monkeypatch.setattr(deployments.log, "warning", lambda msg, *args: warnings.append(msg % args))
    config = ServiceConfig(Settings(_env_file=None, store=store, index_refresh_s=0.05), 1, (ShardResources(1, 1.0, 0.0),))

    async def start():
        cls = deployments.ShardDeployment.func_or_class
        replica = cls.__new__(cls)
        await replica.__init__(0, config)
        await asyncio.sleep(0.3)  # the refresh loop keeps trying
        replica._refresher.cancel()
        return replica

    return asyncio.run(start()), warnings


@pytest.mark.parametrize("scheme", ["redis+cluster", "redis"])
def test_a_shard_replica_starts_while_the_redis_store_is_unreachable(scheme, monkeypatch):
    """Failing the constructor would make Serve give the deployment up for
    good; the refresh loop loads the index once the store answers."""
    url = f"{scheme}://127.0.0.1:{_closed_port()}" + ("/0" if scheme == "redis" else "")
    _, warnings = _start(monkeypatch, url)
    assert warnings[0].startswith("shard 0: cannot load the index yet (cannot reach Redis at ")
    assert any("index refresh failed" in w for w in warnings[1:])  # and tried again


def test_a_store_error_that_waiting_cannot_mend_fails_the_replica(monkeypatch, tmp_path):
    """A damaged index is not retried quietly for ever: the deployment fails, loudly."""
    from shardqa.errors import StoreError, StoreUnreachable

    (tmp_path / "CURRENT").write_text("v1")
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_text("{bad")  # damaged
    with pytest.raises(StoreError) as info:
        _start(monkeypatch, str(tmp_path))
    assert not isinstance(info.value, StoreUnreachable)
