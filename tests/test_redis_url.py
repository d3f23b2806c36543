"""Redis URL forms shared by the index store and the answer cache."""

import pytest

from shardqa.errors import StoreError
from shardqa.redis_url import parse_redis_url


def test_cluster_url_with_credentials_and_seed_nodes():
    u = parse_redis_url("rediss+cluster://app:s3cr%40t@10.0.0.1:7000,[::1]:7001,redis-2")
    assert u.cluster and u.ssl
    assert u.nodes == [("10.0.0.1", 7000), ("::1", 7001), ("redis-2", 6379)]
    assert u.auth == {"username": "app", "password": "s3cr@t"}
    assert "s3cr" not in u.redacted and ":***@" in u.redacted


def test_single_server_urls_are_left_to_redis_py():
    u = parse_redis_url("redis://:pw@localhost:6380/2?prefix=x")
    assert not u.cluster and not u.ssl and u.nodes == []
    assert u.password == "pw" and u.query == {"prefix": ["x"]}


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
