"""The answer cache: Redis when a URL is configured, else in-process.

* Keys are a hash of (serving scope, normalised question, top_k): user text
  never appears in key names. The scope names the index version, the model
  and the settings that decide an answer, so answers of one index version,
  model or reading configuration are never served for another.
* The question is made canonical once (`canonical_question`), and that one
  string is what the tokenizer, the router and the key all see: two questions
  share a key only when the service would answer them identically.
* Single-flight: concurrent misses for one key run inference once. Within a
  process, callers share one task, which runs to the end even when the caller
  that started it goes away (a client hanging up must not fail the others);
  across ingress replicas, a Redis lock (SET NX PX, released only by its
  owner) makes the others wait for the value instead of computing. The lock
  is short (2 s) and its owner renews it while computing: a slow answer keeps
  it, a replica that dies frees it within 2 s.
* The cache is an optimisation, never a dependency: every Redis call has a
  deadline, and an error or timeout makes the request go uncached (counted as
  a cache "error"). After a failure Redis is left alone for a short back-off
  so an outage costs one timeout per back-off period, not one per request.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from shardqa.errors import AnswerTimedOut
from shardqa.monitoring import metrics
from shardqa.redis_url import parse_redis_url

log = logging.getLogger(__name__)

KEY_PREFIX = "shardqa:answer:"
LOCK_PREFIX = "shardqa:answer-lock:"

_SPACES = re.compile(r"\s+")
_UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_RENEW_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


def canonical_question(question: str) -> str:
    """The text the service answers: NFC, control characters read as spaces,
    invisible format characters (zero-width space, soft hyphen, BOM) dropped,
    runs of whitespace as one space, trimmed.

    The tokenizer would drop a control character between two words and so
    join them, and the router does not normalise Unicode at all: keyed on a
    looser form than they read, one question could fill the cache with the
    answer to another."""
    q = unicodedata.normalize("NFC", question)
    if not q.isprintable():  # most questions have nothing to replace
        q = "".join(_replacement(c) for c in q)
    return _SPACES.sub(" ", q).strip()


def _replacement(c: str) -> str:
    category = unicodedata.category(c)
    return " " if category == "Cc" else "" if category == "Cf" else c


def normalise_question(question: str, lowercase: bool) -> str:
    """The key form of a question: canonical, and case-folded only when every
    stage that reads it ignores case."""
    q = canonical_question(question)
    if not lowercase:
        return q
    # A capital sigma stays as it is: str.lower() (the router's analyzer)
    # makes a word-final one "ς", an uncased tokenizer, one character at a
    # time, "σ"; folded either way, two questions one stage tells apart would
    # share a key.
    return q.lower() if "Σ" not in q else "".join(c if c == "Σ" else c.lower() for c in q)


def cache_key(index_version: str, normalised_question: str, top_k: int, scope: str = "") -> str:
    """``scope`` names what else decides an answer: the model and the reading settings."""
    digest = hashlib.blake2b(
        f"{index_version}\x00{scope}\x00{top_k}\x00{normalised_question}".encode(), digest_size=20
    ).hexdigest()
    return digest


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        """A token proving ownership when the lock was taken, else None."""
        ...

    async def unlock(self, key: str, token: str) -> None:
        """Release the lock only if `token` still owns it."""
        ...

    async def renew_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extend the lock to ``ttl_ms`` from now if `token` still owns it."""
        ...

    async def lock_held(self, key: str) -> bool: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...

    @property
    def shared(self) -> bool:
        """True when other processes see the same entries (locks matter)."""
        ...


class MemoryBackend:
    """An LRU of bounded size with per-entry expiry, for one process."""

    shared = False

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._data[key] = (time.monotonic() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        return "local"  # the in-process single-flight already covers one process

    async def unlock(self, key: str, token: str) -> None:
        return None

    async def renew_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return True

    async def lock_held(self, key: str) -> bool:
        return False

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()


class RedisBackend:
    """redis:// or rediss:// (one server), or redis+cluster:// / rediss+cluster:// (see shardqa.redis_url)."""

    shared = True

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        self._client = None

    def _connect(self):
        # Created on first use, inside the event loop that will use it: a
        # Serve replica runs user code on its own loop, not the constructor's.
        if self._client is None:
            import redis.asyncio as aioredis

            opts = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, retry_on_timeout=False)
            target = parse_redis_url(self.url)
            if target.cluster:
                from redis.asyncio.cluster import ClusterNode

                nodes = [ClusterNode(host, port) for host, port in target.nodes]
                self._client = aioredis.RedisCluster(startup_nodes=nodes, ssl=target.ssl, **target.tls_options, **target.auth, **opts)
            else:
                self._client = aioredis.Redis.from_url(self.url, **opts)
        return self._client

    async def get(self, key: str) -> bytes | None:
        return await self._connect().get(KEY_PREFIX + key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._connect().set(KEY_PREFIX + key, value, ex=ttl_s)

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        token = secrets.token_hex(8)
        taken = await self._connect().set(LOCK_PREFIX + key, token.encode(), nx=True, px=ttl_ms)
        return token if taken else None

    async def unlock(self, key: str, token: str) -> None:
        # A holder slower than the lock's TTL must not delete the lock another
        # replica has taken since: delete only while the value is our token.
        await self._connect().eval(_UNLOCK_SCRIPT, 1, LOCK_PREFIX + key, token)

    async def renew_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._connect().eval(_RENEW_SCRIPT, 1, LOCK_PREFIX + key, token, ttl_ms))

    async def lock_held(self, key: str) -> bool:
        return bool(await self._connect().exists(LOCK_PREFIX + key))

    async def ping(self) -> None:
        await self._connect().ping()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


@dataclass
class CacheResult:
    value: bytes
    #: True when this request did not run inference for the value: a cache
    #: hit, or a wait on another request's identical computation.
    shared: bool
    #: True only for a cache hit: the value was there when the request came.
    #: A wait on another computation is shared but not a hit; it takes as
    #: long as the computation, which would skew cached-latency figures.
    hit: bool = False


class AnswerCache:
    def __init__(self, backend: CacheBackend, ttl_s: int, timeout_s: float, *, lock_ttl_ms: int = 2000,
                 retry_after_s: float = 1.0, peer_wait_s: float = 30.0):
        self.backend = backend
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        # The lock is short and renewed while its holder computes: a holder
        # that dies frees it within lock_ttl_ms, a slow one keeps it.
        self.lock_ttl_ms = lock_ttl_ms
        #: How long a replica waits for a peer that holds the lock (the
        #: answer timeout: a peer never takes longer than that).
        self.peer_wait_s = peer_wait_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        #: key -> (the computation, when it began)
        self._inflight: dict[str, tuple[asyncio.Future[tuple[bytes, bool]], float]] = {}

    @classmethod
    def from_url(cls, url: str | None, ttl_s: int, timeout_s: float, peer_wait_s: float = 30.0) -> "AnswerCache":
        backend: CacheBackend = RedisBackend(url, timeout_s) if url else MemoryBackend()
        return cls(backend, ttl_s, timeout_s, peer_wait_s=peer_wait_s)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, op: Awaitable, what: str):
        """Run one cache operation under the deadline; (ok, result)."""
        if not self.available:
            op.close()  # type: ignore[attr-defined]  # a never-awaited coroutine would warn
            return False, None
        try:
            return True, await asyncio.wait_for(op, self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, TimeoutError: all mean "no cache now"
            self._down_until = time.monotonic() + self.retry_after_s
            log.warning("answer cache %s failed (%s: %s); serving uncached for %.1fs", what, type(exc).__name__, exc, self.retry_after_s)
            return False, None

    async def warm_up(self, timeout_s: float = 2.0) -> bool:
        """Open the connection before the first request needs it. Made under
        a request's deadline (tens of ms), a connection on a busy machine can
        miss it, and a miss turns the cache off for `retry_after_s`: the
        first answers of a new replica would go uncached and unshared. A
        failure here is only logged; requests then connect as usual."""
        try:
            await asyncio.wait_for(self.backend.ping(), max(timeout_s, self.timeout_s))
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("answer cache not reachable at start-up (%s: %s); requests will try again", type(exc).__name__, exc)
            return False

    async def lookup(self, key: str) -> bytes | None:
        ok, value = await self._call(self.backend.get(key), "get")
        metrics.record_cache("hit" if value is not None else "miss" if ok else "error")
        return value

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[bytes]],
                             deadline: float | None = None) -> CacheResult:
        """The cached value of `key`, else `compute()`'s, stored for the next
        request; one computation per key at a time. A wait for a peer
        replica's computation ends by ``deadline`` (monotonic clock), so
        ``compute`` can keep to the same deadline."""
        t0 = time.perf_counter()
        value = await self.lookup(key)
        metrics.record_stage("cache", time.perf_counter() - t0)
        if value is not None:
            return CacheResult(value, shared=True, hit=True)
        return await self.compute_once(key, compute, deadline)

    async def compute_once(self, key: str, compute: Callable[[], Awaitable[bytes]],
                           deadline: float | None = None) -> CacheResult:
        joined = key in self._inflight
        if not joined:
            task = asyncio.ensure_future(self._fill(key, compute, deadline))
            self._inflight[key] = (task, time.monotonic())
            task.add_done_callback(functools.partial(self._finished, key))
        task, started = self._inflight[key]
        # Shielded: a caller cancelled (its client hung up) stops waiting,
        # while the computation goes on for the other callers and the cache.
        try:
            value, computed = await asyncio.shield(task)
        except AnswerTimedOut:
            # The computation this caller joined ran out of its first
            # caller's time. A caller that came later tries once more only
            # with at least half the time that one had: less would most
            # likely time out too, adding load to shards already too slow.
            now = time.monotonic()
            if not joined or deadline is None or deadline - now < (now - started) / 2:
                raise
            return await self.compute_once(key, compute, deadline)
        return CacheResult(value, shared=joined or not computed)

    def _finished(self, key: str, task: asyncio.Future) -> None:
        if self._inflight.get(key, (None,))[0] is task:
            del self._inflight[key]
        if not task.cancelled():
            # Retrieved here, so a failure whose callers all went away is
            # not logged as "exception was never retrieved".
            task.exception()

    async def _fill(self, key: str, compute: Callable[[], Awaitable[bytes]], deadline: float | None = None) -> tuple[bytes, bool]:
        """The value, and whether this process computed it (not a peer)."""
        token = None
        try:
            if self.backend.shared:
                ok, token = await self._call(self.backend.try_lock(key, self.lock_ttl_ms), "lock")
                if ok and token is None:
                    value = await self._wait_for_peer(key, deadline)
                    if value is not None:
                        return value, False
            keeper = asyncio.create_task(self._keep_lock(key, token)) if token is not None else None
            try:
                value = await compute()
            finally:
                if keeper is not None:
                    keeper.cancel()
            await self._call(self.backend.set(key, value, self.ttl_s), "set")
            return value, True
        finally:
            if token is not None:
                await self._call(self.backend.unlock(key, token), "unlock")

    async def _keep_lock(self, key: str, token: str) -> None:
        """Renew the lock while this process computes, so peers keep waiting
        for an answer slower than the lock's TTL instead of computing it too."""
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            try:
                if not await asyncio.wait_for(self.backend.renew_lock(key, token, self.lock_ttl_ms), self.timeout_s):
                    return  # the lock expired and a peer may hold it now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Only the renewal failed: peers stop waiting when the lock
                # expires and compute it themselves; the cache stays on.
                log.debug("answer cache lock renewal failed (%s: %s)", type(exc).__name__, exc)
                return

    async def _wait_for_peer(self, key: str, deadline: float | None = None) -> bytes | None:
        """Another process holds the lock: poll for its value while it holds
        the lock; None means compute it here after all (the peer failed, or
        its lock expired)."""
        deadline = min(time.monotonic() + self.peer_wait_s, deadline if deadline is not None else math.inf)
        delay = 0.002
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            ok, value = await self._call(self.backend.get(key), "get")
            if not ok:
                return None
            if value is not None:
                return value
            ok, held = await self._call(self.backend.lock_held(key), "lock check")
            if not ok or not held:
                # One more read: the peer may have stored the value between the two calls.
                ok, value = await self._call(self.backend.get(key), "get")
                return value if ok else None
        return None

    async def close(self) -> None:
        await self.backend.close()
