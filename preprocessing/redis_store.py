"""The index in Redis: standalone (``redis://``, ``rediss://``, ``unix://``)
or Redis Cluster (``redis+cluster://host:port[,host:port...]``,
``rediss+cluster://...``).

Key layout (``P`` is the key prefix, ``shardqa`` unless the URL says
``?prefix=...``; ``V`` a version name; ``{sN}`` shard N's hash tag)::

    P:current                       string: the current version (one SET switches it)
    P:versions                      sorted set: complete versions, scored by publication time
    P:build-key                     string: the key of the last keyed build (``shardqa index --build-key``)
    P:v:V:keys                      set: every key of version V (written first, so a
                                    failed build can be cleaned up)
    P:v:V:manifest                  string: IndexManifest JSON (written after all data)
    P:v:V:docs                      hash: doc_id -> JSON [title, text]
    P:v:V:tables:meta / :NAME       routing tables (JSON / .npy bytes)
    P:{sN}:V:passages               string: JSON metadata of shard N's passages
    P:{sN}:V:tok_ptr|ids|offsets|word_ids     .npy bytes: the pre-tokenised passages
    P:{sN}:V:rank                   sorted set: passage id -> graph ranking score
    P:{sN}:V:dense                  .npy bytes: shard N's passage vectors (index built with an encoder)

Everything of one shard carries the shard's hash tag, so in a cluster it lives
in one slot and is read from one node; the ranking is read with
ZRANGEBYSCORE / ZREVRANGEBYSCORE.

A version becomes visible only after every key of it is written and the
manifest is in place: the ``current`` pointer is switched last, with one SET.
Readers that resolved the old version keep reading it until it is dropped.
"""

from __future__ import annotations

import json
import time

from shardqa.errors import IndexNotFound, StoreError, StoreUnreachable, one_line
from shardqa.preprocessing.store import (
    SHARD_ARRAYS,
    IndexBundle,
    IndexManifest,
    IndexStore,
    array_to_bytes,
    bytes_to_array,
    pack_shard,
)
from shardqa.redis_url import parse_redis_url, redact_url

DEFAULT_PREFIX = "shardqa"
#: Values larger than this are split into numbered parts (Redis' default
#: proto-max-bulk-len is 512 MB; smaller pieces keep single replies short).
CHUNK_BYTES = 32 * 1024 * 1024


def check_redis(url: str, what: str = "Redis") -> None:
    """Fail at once, in one line (the store's own messages, led by `what`),
    when ``url`` is not a Redis URL or its server does not answer a PING."""
    from shardqa.redis_url import parse_redis_url

    try:
        parse_redis_url(url)
        store = RedisStore(url, socket_timeout=5.0)
        try:
            store.ping()
        finally:
            store.close()
    except StoreError as exc:
        raise StoreError(f"{what}: {exc}") from None


def _unreachable(url: str, exc: Exception) -> StoreError:
    """Why a connection failed: a server that wants a password is reachable
    (and asking again will not mend the login); one that did not answer may
    answer later."""
    text = one_line(exc)
    if type(exc).__name__ in ("AuthenticationError", "AuthenticationWrongNumberOfArgsError") or any(
        mark in text for mark in ("NOAUTH", "WRONGPASS", "authenticated", "invalid password", "invalid username-password")
    ):
        return StoreError(f"Redis at {url} refused the login ({text}); give the password in the URL, "
                          f"e.g. redis://:PASSWORD@host:port or redis://USER:PASSWORD@host:port")
    return StoreUnreachable(f"cannot reach Redis at {url}: {text}")


class RedisStore(IndexStore):
    def __init__(self, url: str, socket_timeout: float = 10.0):
        import redis

        self.url = redact_url(url)
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        # Not a RedisError: raised when no startup node answers, but also for
        # a node without cluster mode or uncovered slots.
        self._cluster_error = redis.exceptions.RedisClusterException
        self._response_error = redis.exceptions.RedisError
        try:
            target = parse_redis_url(url)
            self.prefix = (target.query.get("prefix") or [DEFAULT_PREFIX])[0]
            self.cluster = target.cluster
            common = dict(socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 5.0))
            if self.cluster:
                from redis.cluster import ClusterNode

                self._cluster_args = dict(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                                          ssl=target.ssl, **target.tls_options, **target.auth, **common)
                self._cluster_client = None
            else:
                # Connects on first use, like the cluster client below.
                self._single_client = redis.Redis.from_url(target.single_server_url(without=("prefix",)), **common)
        except StoreError:
            raise
        except (ValueError, self._response_error) as exc:
            raise StoreError(f"bad Redis store URL {self.url}: {exc}") from None

    @property
    def _client(self):
        """The redis-py client (``redis.Redis`` or ``redis.cluster.RedisCluster``).
        A cluster client connects when made, so it is made on first use: a
        store opened while Redis is down (a shard replica starting) fails
        its first call, which the caller can try again, not its constructor."""
        if not self.cluster:
            return self._single_client
        if self._cluster_client is None:
            from redis.cluster import RedisCluster

            try:
                self._cluster_client = RedisCluster(**self._cluster_args)
            except self._redis_errors as exc:
                raise _unreachable(self.url, exc) from None
            except self._cluster_error as exc:
                if "cannot be connected" in str(exc):
                    raise _unreachable(self.url, exc) from None
                raise StoreError(f"Redis at {self.url} refused a cluster connection: {exc}") from None
        return self._cluster_client

    @property
    def r(self):
        return self._client

    # --- keys ------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    def _vk(self, version: str, *parts: str) -> str:
        return self._k("v", version, *parts)

    def _sk(self, version: str, shard: int, name: str) -> str:
        return self._k(self.shard_tag(shard), version, name)

    # --- plumbing ------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise _unreachable(self.url, exc) from None
        except self._response_error as exc:
            raise StoreError(f"Redis at {self.url} refused: {exc}") from None

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        client = self._cluster_client if self.cluster else self._single_client
        try:
            if client is not None:
                client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def _get_blob(self, key: str) -> bytes | None:
        """A value stored whole or, when large, as ``key`` -> part count and ``key:N`` parts."""
        raw = self._call(self._client.get, key)
        if raw is None or not raw.startswith(b"#parts:"):
            return raw
        n = int(raw[len(b"#parts:"):])
        pieces = [self._call(self._client.get, f"{key}:{i}") for i in range(n)]
        if any(p is None for p in pieces):
            return None
        return b"".join(pieces)

    def _set_blob(self, pipe, key: str, value: bytes, keys: list[str]) -> None:
        keys.append(key)
        if len(value) <= CHUNK_BYTES:
            pipe.set(key, value)
            return
        n = (len(value) + CHUNK_BYTES - 1) // CHUNK_BYTES
        for i in range(n):
            part = f"{key}:{i}"
            keys.append(part)
            pipe.set(part, value[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
        pipe.set(key, b"#parts:%d" % n)

    # --- versions ------------------------------------------------------------------
    def current_version(self) -> str:
        raw = self._call(self._client.get, self._k("current"))
        if not raw:
            raise IndexNotFound(f"no index in {self.url} (build one with: shardqa index CORPUS --store {self.url})")
        return raw.decode()

    def versions(self) -> list[str]:
        return [v.decode() for v in self._call(self._client.zrange, self._k("versions"), 0, -1)]

    def build_key(self) -> str | None:
        raw = self._call(self._client.get, self._k("build-key"))
        return raw.decode() if raw else None

    def set_build_key(self, key: str) -> None:
        self._call(self._client.set, self._k("build-key"), key)

    def set_current(self, version: str) -> None:
        if not self._call(self._client.exists, self._vk(version, "manifest")):
            raise IndexNotFound(f"no index version {version} in {self.url}")
        self._call(self._client.set, self._k("current"), version)

    def drop_version(self, version: str) -> None:
        try:
            current = self.current_version()
        except IndexNotFound:
            current = None
        if version == current:
            raise StoreError(f"version {version} is current; make another current before dropping it")
        self._call(self._client.zrem, self._k("versions"), version)
        self._delete_version_keys(version)

    def _delete_version_keys(self, version: str) -> None:
        keys_key = self._vk(version, "keys")
        keys = [k.decode() for k in self._call(self._client.smembers, keys_key)]
        # The manifest goes first: a version without one is never read.
        ordered = [self._vk(version, "manifest")] + [k for k in keys if not k.endswith(":manifest")] + [keys_key]
        for i in range(0, len(ordered), 256):
            batch = ordered[i:i + 256]
            if self.cluster:
                # DEL of several keys must stay within one slot in a cluster.
                pipe = self._client.pipeline()
                for k in batch:
                    pipe.delete(k)
                self._call(pipe.execute)
            else:
                self._call(self._client.delete, *batch)

    # --- reading -------------------------------------------------------------------
    def _read_manifest(self, version: str) -> IndexManifest:
        raw = self._call(self._client.get, self._vk(version, "manifest"))
        if raw is None:
            raise IndexNotFound(f"no index version {version} in {self.url}")
        return IndexManifest.from_json(raw)

    def _read_shard(self, shard: int, version: str) -> dict:
        meta = self._get_blob(self._sk(version, shard, "passages"))
        if meta is None:
            raise IndexNotFound(f"index version {version} in {self.url} has no shard {shard}")
        packed: dict = {"meta": json.loads(meta)}
        for name in SHARD_ARRAYS:
            raw = self._get_blob(self._sk(version, shard, name))
            if raw is None:
                raise IndexNotFound(f"index version {version} in {self.url}: shard {shard} is incomplete ({name})")
            packed[name] = bytes_to_array(raw)
        return packed

    def _read_tables(self, version: str):
        raw = self._get_blob(self._vk(version, "tables", "meta"))
        if raw is None:
            raise IndexNotFound(f"index version {version} in {self.url} has no routing tables")
        meta = json.loads(raw)
        tables = {}
        for name in meta["arrays"]:
            blob = self._get_blob(self._vk(version, "tables", name))
            if blob is None:
                raise IndexNotFound(f"index version {version} in {self.url}: routing table {name} is missing")
            tables[name] = bytes_to_array(blob)
        return tables, meta

    def _read_dense(self, shard: int, version: str):
        raw = self._get_blob(self._sk(version, shard, "dense"))
        return None if raw is None else bytes_to_array(raw)

    def ranking(self, shard, version=None, min_score=float("-inf"), max_score=float("inf"), limit=None, descending=False):
        key = self._sk(self.resolve(version), shard, "rank")
        lo = "-inf" if min_score == float("-inf") else repr(float(min_score))
        hi = "+inf" if max_score == float("inf") else repr(float(max_score))
        page = {} if limit is None else {"start": 0, "num": int(limit)}
        if descending:
            rows = self._call(self._client.zrevrangebyscore, key, hi, lo, withscores=True, **page)
        else:
            rows = self._call(self._client.zrangebyscore, key, lo, hi, withscores=True, **page)
        return [(m.decode(), float(s)) for m, s in rows]

    def document_text(self, doc_id: str, version: str | None = None) -> str:
        version = self.resolve(version)
        raw = self._call(self._client.hget, self._vk(version, "docs"), doc_id)
        if raw is None:
            raise IndexNotFound(f"no document {doc_id!r} in index version {version}")
        return json.loads(raw)[1]

    # --- writing -------------------------------------------------------------------
    def _write_version(self, bundle: IndexBundle) -> None:
        version = bundle.manifest.version
        if self._call(self._client.exists, self._vk(version, "manifest")):
            raise StoreError(f"index version {version} already exists in {self.url}")
        keys_key = self._vk(version, "keys")
        try:
            self._call(self._write_parts, bundle, keys_key)
            # Last: the manifest (the version exists from now on) and the list of versions.
            self._call(self._client.set, self._vk(version, "manifest"), bundle.manifest.to_json())
            self._call(self._client.zadd, self._k("versions"), {version: time.time()})
        except BaseException:
            try:
                self._delete_version_keys(version)
            except Exception:  # noqa: BLE001 - the server may be gone; the keys are unreachable anyway
                pass
            raise

    def _write_parts(self, bundle: IndexBundle, keys_key: str) -> None:
        version = bundle.manifest.version

        def flush(pipe, keys: list[str]) -> None:
            # Record the keys before writing them, so a failed build can always be cleaned up.
            if keys:
                self._call(self._client.sadd, keys_key, *keys)
            self._call(pipe.execute)

        for shard, passages in enumerate(bundle.shards):
            pipe, keys = self._client.pipeline(transaction=False), []
            packed = pack_shard(passages)
            self._set_blob(pipe, self._sk(version, shard, "passages"), json.dumps(packed["meta"]).encode(), keys)
            for name in SHARD_ARRAYS:
                self._set_blob(pipe, self._sk(version, shard, name), array_to_bytes(packed[name]), keys)
            if bundle.dense is not None:
                self._set_blob(pipe, self._sk(version, shard, "dense"), array_to_bytes(bundle.dense[shard]), keys)
            rank_key = self._sk(version, shard, "rank")
            keys.append(rank_key)
            ranking = bundle.rankings[shard]
            for i in range(0, len(ranking), 1000):
                pipe.zadd(rank_key, {pid: float(score) for pid, score in ranking[i:i + 1000]})
            flush(pipe, keys)

        pipe, keys = self._client.pipeline(transaction=False), []
        for name, arr in bundle.tables.items():
            self._set_blob(pipe, self._vk(version, "tables", name), array_to_bytes(arr), keys)
        meta = dict(bundle.tables_meta, arrays=sorted(bundle.tables))
        self._set_blob(pipe, self._vk(version, "tables", "meta"), json.dumps(meta).encode(), keys)
        flush(pipe, keys)

        docs_key = self._vk(version, "docs")
        items = list(bundle.documents.items())
        pipe, keys = self._client.pipeline(transaction=False), [docs_key]
        for i in range(0, len(items), 500):
            pipe.hset(docs_key, mapping={d: json.dumps(v) for d, v in items[i:i + 500]})
        flush(pipe, keys)
