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


@pytest.mark.redis
def test_tls_redis_with_a_private_ca_for_the_store_and_the_cache(tmp_path):
    """rediss:// with ?ssl_ca_certs=: the CA file the Helm chart mounts for a
    managed Redis whose certificate a private CA signed. Without it the
    connection is refused, with it both the store and the cache connect."""
    import asyncio

    import trustme
    from redis_servers import RedisServer, free_port

    from shardqa.preprocessing.store import open_store
    from shardqa.services.answer_cache import RedisBackend

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    tls_port = free_port()
    extra = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
             "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no")
    with RedisServer(extra=extra):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            open_store(url).ping()  # the system's CAs do not know this one
        store = open_store(f"{url}?ssl_ca_certs={ca_file}")
        store.ping()
        store.close()

        async def cache_round_trip():
            backend = RedisBackend(f"{url}?ssl_ca_certs={ca_file}", 2.0)
            await backend.set("k", b"v", 60)
            return await backend.get("k")

        assert asyncio.run(cache_round_trip()) == b"v"


def test_a_cluster_url_hands_its_ca_file_to_the_cluster_clients(monkeypatch):
    import redis.asyncio as aioredis
    import redis.cluster

    from shardqa.preprocessing.redis_store import RedisStore
    from shardqa.services.answer_cache import RedisBackend

    seen = []

    class FakeCluster:
        def __init__(self, startup_nodes, **kw):
            seen.append(kw)

    monkeypatch.setattr(aioredis, "RedisCluster", FakeCluster)
    monkeypatch.setattr(redis.cluster, "RedisCluster", FakeCluster)
    url = "rediss+cluster://app:pw@10.0.0.1:6379?ssl_ca_certs=/etc/shardqa/redis-ca/ca.crt"
    assert RedisStore(url).r is not None  # the cluster client is made on first use
    RedisBackend(url, 0.05)._connect()
    assert [(kw["ssl"], kw["ssl_ca_certs"], kw["username"]) for kw in seen] == [(True, "/etc/shardqa/redis-ca/ca.crt", "app")] * 2
    assert parse_redis_url(url.replace("rediss+", "redis+")).tls_options == {}  # no TLS, no CA
