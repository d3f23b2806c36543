"""The answer cache against real redis-server processes: hashed key names,
TTLs, single-flight across ingress replicas, and outages that only ever make
answers uncached."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from shardqa.services.answer_cache import KEY_PREFIX, AnswerCache, RedisBackend, cache_key, normalise_question

pytestmark = pytest.mark.redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def test_entries_are_hashed_and_expire(redis_server):
    # Generous deadlines: this test is about keys and TTLs, not about timeouts.
    cache = AnswerCache(RedisBackend(redis_server.url, 5.0), ttl_s=120, timeout_s=5.0)
    question = "Who gave their name to Normandy?"
    key = cache_key("v7", normalise_question(question, lowercase=True), 1)

    async def scenario():
        first = await cache.get_or_compute(key, lambda: asyncio.sleep(0, b'[{"text":"Normans"}]'))
        second = await cache.get_or_compute(key, lambda: asyncio.sleep(0, b"never"))
        await cache.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert (first.shared, second.shared) == (False, True)
    assert second.value == b'[{"text":"Normans"}]'
    r = redis_server.client()
    names = [k.decode() for k in r.keys("*")]
    assert names == [KEY_PREFIX + key]  # the lock is gone, and no user text in any name
    assert "Normandy" not in names[0]
    assert 0 < r.ttl(names[0]) <= 120


def test_single_flight_across_two_ingress_replicas(redis_server):
    """Two caches (two ingress processes) on one Redis: one computes, the other waits for its value."""
    a = AnswerCache(RedisBackend(redis_server.url, 5.0), ttl_s=60, timeout_s=5.0)
    b = AnswerCache(RedisBackend(redis_server.url, 5.0), ttl_s=60, timeout_s=5.0)
    calls = 0

    async def compute():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return b"[1]"

    async def scenario():
        results = await asyncio.gather(*(c.get_or_compute("same", compute) for c in (a, b, a, b)))
        await a.close()
        await b.close()
        return results

    results = asyncio.run(scenario())
    assert calls == 1
    assert [r.value for r in results] == [b"[1]"] * 4


def _holder_then_peer(url: str, holding, asking, deadline_s: float | None = None, **cache_kw):
    """Two ingress replicas on one Redis: replica a starts ``holding()`` (and
    takes the lock), then replica b asks for the same key with ``asking``.
    Returns a's outcome (its value, or the exception it raised), b's
    CacheResult, and how long b took."""
    a = AnswerCache(RedisBackend(url, 5.0), ttl_s=60, timeout_s=5.0, **cache_kw)
    b = AnswerCache(RedisBackend(url, 5.0), ttl_s=60, timeout_s=5.0, **cache_kw)
    computing = asyncio.Event()

    async def held():
        computing.set()  # a holds the lock now
        return await holding()

    async def scenario():
        first = asyncio.ensure_future(a.get_or_compute("q", held))
        await computing.wait()
        t0 = time.monotonic()
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        second = await b.get_or_compute("q", asking, deadline=deadline)
        waited = time.monotonic() - t0
        try:
            outcome = (await first).value
        except Exception as exc:
            outcome = exc
        await a.close()
        await b.close()
        return outcome, second, waited

    return asyncio.run(scenario())


def test_a_peer_that_fails_releases_its_waiters_at_once(redis_server):
    """The replica holding the lock fails: the other stops waiting as soon as
    the lock is gone, instead of sitting out the lock's TTL."""

    async def failing():
        await asyncio.sleep(0.1)
        raise RuntimeError("shard down")

    async def later():
        return b"[ok]"

    outcome, result, waited = _holder_then_peer(redis_server.url, failing, later, lock_ttl_ms=5000)
    assert isinstance(outcome, RuntimeError)
    assert result.value == b"[ok]" and not result.shared
    assert waited < 2.0  # the lock's TTL is 5 s


def test_an_answer_slower_than_the_lock_ttl_is_still_computed_once(redis_server):
    """The holder renews its short lock while it computes: a peer keeps
    waiting for an answer that takes several lock TTLs, instead of computing
    it a second time once the first TTL ran out."""
    calls = []

    async def slow():
        calls.append("a")
        await asyncio.sleep(1.2)  # four lock TTLs
        return b"[slow]"

    async def again():
        calls.append("b")
        return b"[again]"

    outcome, second, _ = _holder_then_peer(redis_server.url, slow, again, lock_ttl_ms=300, peer_wait_s=10)
    assert calls == ["a"]
    assert outcome == second.value == b"[slow]" and second.shared


def test_a_wait_for_a_peer_ends_by_the_request_s_deadline(redis_server):
    """Waiting for a peer and computing after it take one answer deadline
    together: the wait ends at the request's deadline, not after peer_wait_s."""

    async def slow():
        await asyncio.sleep(2.0)
        return b"[slow]"

    async def own():
        return b"[own]"

    outcome, second, waited = _holder_then_peer(redis_server.url, slow, own, deadline_s=0.3, lock_ttl_ms=300, peer_wait_s=10)
    assert outcome == b"[slow]"
    assert second.value == b"[own]" and not second.shared and waited < 1.5


def test_only_the_owner_releases_a_lock(redis_server):
    backend = RedisBackend(redis_server.url, 5.0)

    async def scenario():
        token = await backend.try_lock("k", 60_000)
        assert token and await backend.try_lock("k", 60_000) is None
        await backend.unlock("k", "someone-else")
        assert await backend.lock_held("k")
        await backend.unlock("k", token)
        assert not await backend.lock_held("k")
        await backend.close()

    asyncio.run(scenario())


def test_redis_outage_degrades_to_uncached_and_recovers(redis_server):
    from test_metrics import delta, scrape

    cache = AnswerCache(RedisBackend(redis_server.url, 0.1), ttl_s=60, timeout_s=0.1, retry_after_s=0.2)
    computed = 0

    async def compute():
        nonlocal computed
        computed += 1
        return b"[]"

    async def ask(n: int):
        return [await cache.get_or_compute(f"q{i}", compute) for i in range(n)]

    async def scenario():
        assert await cache.warm_up()  # as the ingress does: the connection is not made under a 0.1 s deadline
        warm = await ask(3)
        assert [r.shared for r in warm] == [False] * 3
        assert all(r.shared for r in await ask(3))  # cached

        redis_server.stop()
        gets = count_calls(cache.backend, "get")
        before = scrape()
        t0 = time.perf_counter()
        down = await ask(20)
        elapsed = time.perf_counter() - t0
        after = scrape()
        assert all(r.value == b"[]" and not r.shared for r in down)  # answers keep coming, uncached
        assert delta(before, after, "shardqa_cache_requests_total", result="error") == 20
        # Redis is asked once per back-off (0.2 s), not once per request.
        assert 1 <= len(gets) <= 1 + math.ceil(elapsed / 0.2) < 20

        redis_server.start()
        # Past the back-off the cache fills and serves again.
        deadline = time.monotonic() + 10
        while not (await ask(1))[0].shared:
            assert time.monotonic() < deadline, "the cache was not used again after Redis came back"
            await asyncio.sleep(0.3)
        await cache.close()

    asyncio.run(scenario())


def test_a_frozen_redis_costs_one_timeout_per_backoff(redis_server):
    cache = AnswerCache(RedisBackend(redis_server.url, 0.2), ttl_s=60, timeout_s=0.2, retry_after_s=5)

    async def scenario():
        await cache.get_or_compute("warm", lambda: asyncio.sleep(0, b"[]"))  # connect
        gets = count_calls(cache.backend, "get")
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            results = [await cache.get_or_compute(f"k{i}", lambda: asyncio.sleep(0, b"[]")) for i in range(10)]
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await cache.close()
        return results, gets

    results, gets = asyncio.run(scenario())
    assert all(r.value == b"[]" for r in results)
    assert len(gets) == 1  # one 0.2 s timeout, then the cache is bypassed for 5 s (not 10 timeouts)


def count_calls(obj, name: str) -> list:
    """Record each call of the coroutine method ``obj.name``."""
    calls, original = [], getattr(obj, name)

    async def counted(*args, **kwargs):
        calls.append(args)
        return await original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def test_warm_up_connects_before_the_first_request_and_never_turns_the_cache_off(redis_server):
    up = AnswerCache(RedisBackend(redis_server.url, 0.1), ttl_s=60, timeout_s=0.1)
    down = AnswerCache(RedisBackend(f"redis://127.0.0.1:{free_port()}/0", 0.1), ttl_s=60, timeout_s=0.1)

    async def scenario():
        ok = await up.warm_up()
        # The connection is open and idle in the pool: the first request uses it.
        pool = up.backend._client.connection_pool
        idle = len(pool._available_connections)
        refused = await down.warm_up()
        await up.close()
        await down.close()
        return ok, idle, refused

    ok, idle, refused = asyncio.run(scenario())
    assert ok is True and idle == 1
    # Nothing listens there: logged, and the cache stays on for requests to try.
    assert refused is False and down.available
