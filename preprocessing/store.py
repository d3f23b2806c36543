"""Index stores: where a built index lives and how it is read back.

One small interface, :class:`IndexStore`, with two implementations:

* :class:`DirectoryStore` (the default, no server): ``ROOT/<version>/`` holds one
  immutable version — ``manifest.json``, per shard ``shard-<i>/`` with the
  passages' token arrays as ``.npy`` files (memory-mappable), their metadata
  as JSON and (when built with an encoder) their dense vectors ``dense.npy``, the routing tables as ``.npy`` files, and the ranking as sorted
  arrays. ``ROOT/CURRENT`` names the current version and is replaced
  atomically (write + ``os.replace``) once a version is complete.
* :class:`~shardqa.preprocessing.redis_store.RedisStore` (``redis://``,
  ``rediss://``, ``redis+cluster://host:port[,host:port]``,
  ``rediss+cluster://...``): the same content in Redis keys; a shard's keys
  carry its hash tag (``{s2}``) so they live in one cluster slot, and the
  ranking is one sorted set per shard, read with range-by-score queries.

A version is written completely, checked, and only then made current; the
previous versions stay readable until dropped (``keep`` newest are kept).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shardqa.errors import IndexNotFound, ShardQAError, StoreError, TokenizerMismatch, one_line
from shardqa.types import Passage, TokenizedText

FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]{0,99}$")


@dataclass(frozen=True)
class IndexManifest:
    version: str
    model: str
    tokenizer_fingerprint: str
    shards: int
    num_documents: int
    num_passages: int
    passages_per_shard: list[int]
    tokens_per_shard: list[int]
    created_at: str
    num_sentences: int = 0
    format: int = FORMAT_VERSION
    #: how the index was built: passage windows, analyzer, graph, source corpus.
    params: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "IndexManifest":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"the manifest is a JSON {type(data).__name__}, not an object")
        known = {f for f in cls.__dataclass_fields__}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a field missing
            raise ValueError(f"the manifest lacks a field ({exc})") from None
        if not isinstance(manifest.format, int) or manifest.format > FORMAT_VERSION:
            raise StoreError(f"index format {manifest.format!r} is newer than this shardqa reads ({FORMAT_VERSION}); upgrade shardqa or rebuild the index")
        if not isinstance(manifest.shards, int) or manifest.shards < 1:
            raise ValueError(f"the manifest gives {manifest.shards!r} shards")
        return manifest


@dataclass
class IndexBundle:
    """Everything one index version consists of, ready to be written."""

    manifest: IndexManifest
    shards: list[list[Passage]]
    #: per shard: (passage_id, score) — the graph ranking of the shard's passages.
    rankings: list[list[tuple[str, float]]]
    #: routing tables: name -> array, plus JSON-able metadata.
    tables: dict[str, np.ndarray]
    tables_meta: dict
    documents: dict[str, tuple[str, str]]  # doc_id -> (title, text)
    #: per shard: the passages' dense vectors [passages of the shard, dim] (float16, L2-normalised,
    #: rows in the shard's passage order), or None for an index built without an encoder.
    dense: list[np.ndarray] | None = None


def new_version() -> str:
    """Sortable by time of creation, unique: 20250101T120000.123456Z-3fa2c1."""
    now = time.time()
    micros = int((now % 1) * 1_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{micros:06d}Z-" + secrets.token_hex(3)


def check_tokenizer(manifest: IndexManifest, tokenizer) -> None:
    """Refuse an index pre-tokenised with another tokenizer than ``tokenizer``."""
    fp = getattr(tokenizer, "fingerprint", tokenizer)
    if fp != manifest.tokenizer_fingerprint:
        raise TokenizerMismatch(
            f"index version {manifest.version} was tokenised for model {manifest.model!r} "
            f"(tokenizer {manifest.tokenizer_fingerprint}) but this tokenizer is {fp}; "
            "re-index with the serving model (shardqa index ... --model DIR)"
        )


#: The reads every store implements; a failure inside one that is not
#: shardqa's own error means files or keys that are not a whole index.
_READS = ("current_version", "_read_manifest", "_read_shard", "_read_tables", "_read_dense", "ranking", "document_text")
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _reading(fn):
    @functools.wraps(fn)
    def read(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except ShardQAError:
            raise
        except OSError as exc:
            if not isinstance(exc, _MISSING):
                raise StoreError(f"{self.url}: cannot read the index ({exc.strerror or exc})") from None
            raise StoreError(_damaged(self.url, exc)) from None
        # Not TypeError or AttributeError: those are bugs of the caller, not
        # of the files (the parsers above turn a file's shape into ValueError).
        except (ValueError, KeyError, IndexError, EOFError) as exc:
            raise StoreError(_damaged(self.url, exc)) from None

    return read


def _damaged(url: str, exc: BaseException) -> str:
    detail = one_line(exc, 200)
    return (f"the index in {url} is damaged or incomplete ({type(exc).__name__}: {detail}); "
            f"if it was not just replaced by a newer version, rebuild it with: shardqa index CORPUS --store {url}")


class IndexStore(ABC):
    """A place holding versioned indexes. Reads never see a half-written version."""

    url: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A damaged index (a truncated copy, a hand-edited manifest) is named
        # as such, whichever store holds it, instead of failing deep inside.
        for name in _READS:
            if name in cls.__dict__:
                setattr(cls, name, _reading(cls.__dict__[name]))

    # --- versions -------------------------------------------------------------
    @abstractmethod
    def current_version(self) -> str:
        """The current version; raises IndexNotFound when there is none."""

    @abstractmethod
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""

    @abstractmethod
    def set_current(self, version: str) -> None:
        """Switch the current-version pointer, atomically."""

    @abstractmethod
    def drop_version(self, version: str) -> None:
        """Delete a version (never the current one)."""

    @abstractmethod
    def build_key(self) -> str | None:
        """The key given to the last keyed build (``shardqa index --build-key``), if any."""

    @abstractmethod
    def set_build_key(self, key: str) -> None: ...

    # --- reading --------------------------------------------------------------
    @abstractmethod
    def _read_manifest(self, version: str) -> IndexManifest: ...

    @abstractmethod
    def _read_shard(self, shard: int, version: str) -> dict: ...

    @abstractmethod
    def _read_tables(self, version: str) -> tuple[dict[str, np.ndarray], dict]: ...

    @abstractmethod
    def ranking(
        self, shard: int, version: str | None = None, min_score: float = float("-inf"),
        max_score: float = float("inf"), limit: int | None = None, descending: bool = False,
    ) -> list[tuple[str, float]]:
        """The shard's ranked passages with min_score <= score <= max_score (range by score)."""

    @abstractmethod
    def document_text(self, doc_id: str, version: str | None = None) -> str: ...

    # --- writing --------------------------------------------------------------
    @abstractmethod
    def _write_version(self, bundle: IndexBundle) -> None:
        """Write every part of a version; it must not become visible as current."""

    def close(self) -> None:
        pass

    # --- shared behaviour -------------------------------------------------------
    def resolve(self, version: str | None) -> str:
        return self.current_version() if version is None else version

    def manifest(self, version: str | None = None) -> IndexManifest:
        return self._read_manifest(self.resolve(version))

    def shard_tag(self, shard: int) -> str:
        return f"{{s{int(shard)}}}"

    def load_shard(self, shard: int, version: str | None = None, tokenizer=None) -> list[Passage]:
        """All passages of one shard, pre-tokenised. With ``tokenizer``, refuse a mismatch."""
        version = self.resolve(version)
        manifest = self._read_manifest(version)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer)
        if not 0 <= shard < manifest.shards:
            raise StoreError(f"index version {version} has shards 0..{manifest.shards - 1}, not {shard}")
        return unpack_shard(self._read_shard(shard, version), shard)

    def load_tables(self, version: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
        return self._read_tables(self.resolve(version))

    def load_dense(self, shard: int, version: str | None = None) -> np.ndarray | None:
        """The shard's passage vectors [passages, dim] (rows in ``load_shard`` order), or None
        when the version was built without an encoder (``manifest.params["encoder"]`` absent)."""
        version = self.resolve(version)
        manifest = self._read_manifest(version)
        if not manifest.params.get("encoder"):
            return None
        if not 0 <= shard < manifest.shards:
            raise StoreError(f"index version {version} has shards 0..{manifest.shards - 1}, not {shard}")
        arr = self._read_dense(shard, version)
        if arr is None:
            raise IndexNotFound(f"index version {version} in {self.url}: shard {shard} has no dense vectors")
        return arr

    def _read_dense(self, shard: int, version: str) -> np.ndarray | None:
        return None

    def publish(self, bundle: IndexBundle, keep: int = 3) -> str:
        """Write a complete version, make it current, drop versions beyond the newest ``keep``."""
        version = bundle.manifest.version
        if not _VERSION_RE.match(version):
            raise StoreError(f"bad version name {version!r}")
        self._write_version(bundle)
        self.set_current(version)
        if keep > 0:
            for old in self.versions()[:-keep]:
                if old != version:
                    self.drop_version(old)
        return version


# --- shard (de)serialisation shared by the stores ----------------------------------

def pack_shard(passages: list[Passage]) -> dict:
    """A shard as four flat token arrays + JSON metadata (texts, ids, starts)."""
    lens = np.fromiter((len(p.tokens) for p in passages), dtype=np.int64, count=len(passages))
    ptr = np.zeros(len(passages) + 1, dtype=np.int64)
    np.cumsum(lens, out=ptr[1:])
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, dtype=np.int32)  # noqa: E731
    return {
        "meta": {
            "passage_ids": [p.passage_id for p in passages],
            "doc_ids": [p.doc_id for p in passages],
            "doc_starts": [int(p.doc_start) for p in passages],
            "texts": [p.text for p in passages],
        },
        "tok_ptr": ptr,
        "ids": cat([p.tokens.ids for p in passages], (0,)).astype(np.int32, copy=False),
        "offsets": cat([p.tokens.offsets for p in passages], (0, 2)).astype(np.int32, copy=False).reshape(-1, 2),
        "word_ids": cat([p.tokens.word_ids for p in passages], (0,)).astype(np.int32, copy=False),
    }


def unpack_shard(packed: dict, shard: int) -> list[Passage]:
    meta = packed["meta"]
    ptr = np.asarray(packed["tok_ptr"])
    ids = np.ascontiguousarray(packed["ids"])
    offs = np.ascontiguousarray(packed["offsets"]).reshape(-1, 2)
    words = np.ascontiguousarray(packed["word_ids"])
    out = []
    for i, pid in enumerate(meta["passage_ids"]):
        a, b = int(ptr[i]), int(ptr[i + 1])
        tok = TokenizedText(ids=ids[a:b], offsets=offs[a:b], word_ids=words[a:b])
        out.append(Passage(pid, meta["doc_ids"][i], shard, meta["texts"][i], int(meta["doc_starts"][i]), tok))
    return out


SHARD_ARRAYS = ("tok_ptr", "ids", "offsets", "word_ids")


def array_to_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def bytes_to_array(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


# --- the embedded directory store -----------------------------------------------------

class DirectoryStore(IndexStore):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a directory")

    def _vdir(self, version: str) -> Path:
        if not _VERSION_RE.match(version):
            raise IndexNotFound(f"bad version name {version!r}")
        return self.root / version

    def current_version(self) -> str:
        try:
            version = (self.root / "CURRENT").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise IndexNotFound(f"no index in {self.root} (build one with: shardqa index CORPUS --store {self.root})") from None
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot read the current version ({exc.strerror})") from None
        if not version:
            raise IndexNotFound(f"no index in {self.root}")
        return version

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "manifest.json").is_file())

    def set_current(self, version: str) -> None:
        if not (self._vdir(version) / "manifest.json").is_file():
            raise IndexNotFound(f"no index version {version} in {self.root}")
        tmp = self.root / f".CURRENT.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(version + "\n", encoding="utf-8")
        os.replace(tmp, self.root / "CURRENT")

    def drop_version(self, version: str) -> None:
        try:
            current = self.current_version()
        except IndexNotFound:
            current = None
        if version == current:
            raise StoreError(f"version {version} is current; make another current before dropping it")
        shutil.rmtree(self._vdir(version), ignore_errors=True)

    def build_key(self) -> str | None:
        try:
            return (self.root / "BUILD_KEY").read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def set_build_key(self, key: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".BUILD_KEY.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(key + "\n", encoding="utf-8")
        os.replace(tmp, self.root / "BUILD_KEY")

    def _read_manifest(self, version: str) -> IndexManifest:
        path = self._vdir(version) / "manifest.json"
        try:
            return IndexManifest.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexNotFound(f"no index version {version} in {self.root}") from None

    def _read_shard(self, shard: int, version: str) -> dict:
        d = self._vdir(version) / f"shard-{shard}"
        packed = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in SHARD_ARRAYS}
        packed["meta"] = json.loads((d / "passages.json").read_text(encoding="utf-8"))
        return packed

    def _read_tables(self, version: str) -> tuple[dict[str, np.ndarray], dict]:
        d = self._vdir(version) / "tables"
        try:
            meta = json.loads((d / "tables.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexNotFound(f"index version {version} in {self.root} has no routing tables") from None
        return {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}, meta

    def _read_dense(self, shard: int, version: str) -> np.ndarray | None:
        path = self._vdir(version) / f"shard-{shard}" / "dense.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def ranking(self, shard, version=None, min_score=float("-inf"), max_score=float("inf"), limit=None, descending=False):
        d = self._vdir(self.resolve(version)) / f"shard-{shard}"
        scores = np.load(d / "rank_scores.npy", mmap_mode="r")
        members = json.loads((d / "rank_members.json").read_text(encoding="utf-8"))
        lo = int(np.searchsorted(scores, min_score, side="left"))
        hi = int(np.searchsorted(scores, max_score, side="right"))
        idx = range(hi - 1, lo - 1, -1) if descending else range(lo, hi)
        out = [(members[i], float(scores[i])) for i in idx]
        return out[:limit] if limit is not None else out

    def document_text(self, doc_id: str, version: str | None = None) -> str:
        path = self._vdir(self.resolve(version)) / "documents.json"
        docs = json.loads(path.read_text(encoding="utf-8"))
        try:
            return docs[doc_id][1]
        except KeyError:
            raise IndexNotFound(f"no document {doc_id!r} in index version {self.resolve(version)}") from None

    def _write_version(self, bundle: IndexBundle) -> None:
        version = bundle.manifest.version
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot create the index directory ({exc.strerror})") from None
        final = self._vdir(version)
        if final.exists():
            raise StoreError(f"index version {version} already exists in {self.root}")
        tmp = self.root / f".building-{version}"
        try:
            tmp.mkdir()
            for i, passages in enumerate(bundle.shards):
                d = tmp / f"shard-{i}"
                d.mkdir()
                packed = pack_shard(passages)
                for name in SHARD_ARRAYS:
                    np.save(d / f"{name}.npy", packed[name], allow_pickle=False)
                (d / "passages.json").write_text(json.dumps(packed["meta"]), encoding="utf-8")
                ranked = sorted(bundle.rankings[i], key=lambda m: (m[1], m[0]))
                np.save(d / "rank_scores.npy", np.asarray([s for _, s in ranked], dtype=np.float64))
                (d / "rank_members.json").write_text(json.dumps([m for m, _ in ranked]), encoding="utf-8")
                if bundle.dense is not None:
                    np.save(d / "dense.npy", np.ascontiguousarray(bundle.dense[i]), allow_pickle=False)
            t = tmp / "tables"
            t.mkdir()
            for name, arr in bundle.tables.items():
                np.save(t / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            meta = dict(bundle.tables_meta, arrays=sorted(bundle.tables))
            (t / "tables.json").write_text(json.dumps(meta), encoding="utf-8")
            (tmp / "documents.json").write_text(json.dumps(bundle.documents), encoding="utf-8")
            # The manifest is written last: a directory without one is not a version.
            (tmp / "manifest.json").write_text(bundle.manifest.to_json(), encoding="utf-8")
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{self.root}: cannot write index version {version} ({exc.strerror or exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def open_store(url: str | os.PathLike | None = None) -> IndexStore:
    """A directory path (embedded store) or a Redis URL: redis://, rediss://,
    redis+cluster://host:port[,host:port], rediss+cluster://..."""
    if url is None:
        from shardqa.config import get_settings

        url = get_settings().store
    from shardqa.config import REDIS_STORE_SCHEMES, STORE_SCHEMES_HINT

    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in REDIS_STORE_SCHEMES:
        from shardqa.preprocessing.redis_store import RedisStore

        return RedisStore(text)
    if scheme == "file":
        text = text[len("file://"):]
    elif scheme:
        raise StoreError(f"unknown store URL scheme {scheme!r}: use {STORE_SCHEMES_HINT}")
    if not text.strip():
        # Path("") is the working directory: an index would land among its files.
        raise StoreError("the index store is empty: name a directory or a Redis URL (--store or SHARDQA_STORE)")
    return DirectoryStore(text)
