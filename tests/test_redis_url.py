"""Redis URL forms shared by the index store and the answer cache."""

import pytest

from shardqa.errors import StoreError
from shardqa.redis_url import parse_redis_url, redact_url


def test_cluster_url_with_credentials_and_seed_nodes():
    u = parse_redis_url("rediss+cluster://app:s3cr%40t@10.0.0.1:7000,[::1]:7001,redis-2")
    assert u.cluster and u.ssl
    assert u.nodes == [("10.0.0.1", 7000), ("::1", 7001), ("redis-2", 6379)]
    assert u.auth == {"username": "app", "password": "s3cr@t"}
    assert "s3cr" not in redact_url(u.url) and ":***@" in redact_url(u.url)


def test_single_server_urls_are_left_to_redis_py():
    u = parse_redis_url("redis://:pw@localhost:6380/2?prefix=x")
    assert not u.cluster and not u.ssl and u.nodes == []
    assert u.password == "pw" and u.query == {"prefix": ["x"]}
    assert u.single_server_url(without=("prefix",)) == "redis://:pw@localhost:6380/2"
    # a socket path keeps its three slashes (redis-py needs unix://)
    sock = parse_redis_url("unix:///run/redis.sock?db=1&prefix=x")
    assert sock.single_server_url(without=("prefix",)) == "unix:///run/redis.sock?db=1"


def test_an_index_store_on_a_unix_socket(tmp_path):
    """unix:// names one server by its socket, for the store as for the cache."""
    from redis_servers import RedisServer

    from shardqa.preprocessing.store import open_store

    sock = tmp_path / "redis.sock"
    with RedisServer(extra=("--unixsocket", str(sock), "--unixsocketperm", "700")):
        store = open_store(f"unix://{sock}?prefix=qa")
        try:
            store.ping()
            assert store.prefix == "qa" and not store.cluster
        finally:
            store.close()


@pytest.mark.parametrize("bad, msg", [("http://h:1", "not a Redis URL"), ("redis+cluster://", "needs host:port"), ("redis+cluster://h:port", "bad port")])
def test_bad_urls_are_named(bad, msg):
    with pytest.raises(StoreError, match=msg):
        parse_redis_url(bad)


def test_answer_cache_hands_cluster_credentials_to_the_client(monkeypatch):
    import redis.asyncio as aioredis

    from shardqa.services.answer_cache import RedisBackend

    seen = {}

    class FakeCluster:
        def __init__(self, startup_nodes, **kw):
            seen["nodes"] = [(n.host, n.port) for n in startup_nodes]
            seen.update(kw)

    monkeypatch.setattr(aioredis, "RedisCluster", FakeCluster)
    RedisBackend("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001", 0.05)._connect()
    assert seen["password"] == "pw" and seen["nodes"] == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
