"""Inference backends: the same (ids, types, mask) -> (start, end) logits call on
torch, ONNX Runtime fp32 and ONNX Runtime dynamic INT8.

ONNX files are exported once and cached on disk under a key made from the
model files' hash, so a replica start-up after the first one only loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from shardqa.errors import BackendUnavailable
from shardqa.onnx_export import GPU_PROVIDERS, RECIPE, cached_export, export, load_for_export, open_session

log = logging.getLogger(__name__)

#: Bumped whenever the export recipe changes, so stale cache entries are not reused.
EXPORT_RECIPE = f"reader-v3-{RECIPE}"


class Backend(Protocol):
    name: str
    input_names: tuple[str, ...]
    #: Threads of ``run(..., under_load=True)``; None: the same as every pass.
    threads_under_load: int | None

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray, under_load: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """int64 [batch, seq] inputs -> float32 start and end logits [batch, seq];
        ``under_load``: with the backend's ``threads_under_load`` threads."""


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch import problems
        return False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise BackendUnavailable("device 'cuda' was requested but no CUDA device is available")
    return device


def select_providers(requested: list[str], available: list[str], device: str) -> list[str]:
    """Execution providers to hand ONNX Runtime, best first.

    An explicit list is honoured in order, minus what this onnxruntime build
    lacks (logged), with the CPU provider always last as the fallback. With no
    list, the device decides: TensorRT, then CUDA, then CPU on a GPU; CPU alone
    otherwise.
    """
    if requested:
        wanted = list(requested)
    elif device == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    else:
        wanted = []
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("ONNX Runtime providers not available here, skipped: %s", ", ".join(missing))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def model_hash(model_dir: Path) -> str:
    """Hash of the files that define the network, so a retrained model never
    reuses an old export."""
    h = hashlib.sha256(EXPORT_RECIPE.encode())
    for name in sorted(os.listdir(model_dir)):
        # Only what defines the network: a new model card or eval file must not
        # force a re-export.
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            with open(model_dir / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


def quiet_weight_loading() -> None:
    """transformers draws a "Loading weights" progress bar for a load that
    takes milliseconds; on stderr of a one-line CLI it is noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pick_threads(threads: int, threads_under_load: int, on_gpu: bool = False) -> int | None:
    """The intra-op threads of passes made while the service is busy, or None
    when they would not be fewer than ``threads`` (0: the library default,
    taken here as the logical CPU count) or the model runs on a GPU, where
    CPU threads only feed it."""
    effective = threads or os.cpu_count() or 1
    if on_gpu or not threads_under_load or threads_under_load >= effective:
        # More threads when busy than when quiet would turn the point around.
        return None
    return threads_under_load


class TorchBackend:
    name = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0, threads_under_load: int = 0):
        import torch
        from transformers import AutoModelForQuestionAnswering

        self.threads_under_load = pick_threads(threads, threads_under_load, on_gpu=device != "cpu")
        if threads:
            torch.set_num_threads(threads)
        self._normal_threads = self._current_threads = torch.get_num_threads()
        self.torch = torch
        self.device = device
        # Weights may ship in fp16 to stay small; computing in fp32 keeps CPU
        # kernels fast and answers identical across backends.
        quiet_weight_loading()
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self.input_names = _model_input_names(self.model)

    def run(self, input_ids, token_type_ids, attention_mask, under_load=False):
        torch = self.torch
        # torch's thread count is per process; this backend's model is the
        # only one a shard replica runs, so switching it is the whole cost.
        want = self.threads_under_load if under_load and self.threads_under_load else self._normal_threads
        if want != self._current_threads:
            torch.set_num_threads(want)
            self._current_threads = want
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()})
        return (
            out.start_logits.float().cpu().numpy(),
            out.end_logits.float().cpu().numpy(),
        )


class OnnxBackend:
    def __init__(self, model_dir: Path, cache_dir: Path, int8: bool, device: str = "cpu", threads: int = 0, providers: list[str] | None = None, spin_wait: bool = False, threads_under_load: int = 0):
        import onnxruntime as ort

        self.name = "onnx-int8" if int8 else "onnx"
        path = export_onnx(model_dir, cache_dir, int8=int8)
        self.providers = select_providers(providers or [], ort.get_available_providers(), device)
        self.threads_under_load = pick_threads(threads, threads_under_load, on_gpu=any(p in GPU_PROVIDERS for p in self.providers))
        self.session = open_session(path, threads=threads, providers=self.providers, spin_wait=spin_wait)
        # A session's thread pool is fixed when it opens, so a second thread
        # count is a second session over the same file (INT8: 93 -> 124 MB resident).
        self.session_under_load = (open_session(path, threads=self.threads_under_load, providers=self.providers, spin_wait=spin_wait)
                                   if self.threads_under_load else self.session)
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def run(self, input_ids, token_type_ids, attention_mask, under_load=False):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        session = self.session_under_load if under_load else self.session
        start, end = session.run(["start_logits", "end_logits"], {k: feeds[k] for k in self.input_names})
        return start, end


def _model_input_names(model) -> tuple[str, ...]:
    import inspect

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return tuple(names)


def export_onnx(model_dir: Path, cache_dir: Path, int8: bool = False) -> Path:
    """Export (once) and return the path of the fp32 or INT8 ONNX model."""
    return cached_export(Path(cache_dir) / "onnx" / model_hash(model_dir), "model", model_dir, _export_fp32, int8)


def _export_fp32(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = load_for_export(AutoModelForQuestionAnswering, model_dir)
    names = _model_input_names(model)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            out = self.m(**dict(zip(names, args)))
            return out.start_logits, out.end_logits

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes |= {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}}
    dummy = tuple(torch.ones((1, 8), dtype=torch.long) for _ in names)
    export(Wrapper(model), dummy, out, list(names), ["start_logits", "end_logits"], axes)


def load_backend(kind: str, model_dir: Path, *, device: str, threads: int, cache_dir: Path, providers: list[str] | None, spin_wait: bool = False, threads_under_load: int = 0) -> Backend:
    if kind == "torch":
        return TorchBackend(model_dir, device=device, threads=threads, threads_under_load=threads_under_load)
    if kind in ("onnx", "onnx-int8"):
        return OnnxBackend(model_dir, cache_dir, int8=kind == "onnx-int8", device=device, threads=threads, providers=providers, spin_wait=spin_wait,
                           threads_under_load=threads_under_load)
    raise BackendUnavailable(f"unknown backend {kind!r}: choose torch, onnx or onnx-int8")
