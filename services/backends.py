"""Inference backends: the same (ids, types, mask) -> (start, end) logits call on
torch, ONNX Runtime fp32 and ONNX Runtime dynamic INT8.

ONNX files are exported once and cached on disk under a key made from the
model files' hash, so a replica start-up after the first one only loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from shardqa.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Bumped whenever the export recipe changes, so stale cache entries are not reused.
EXPORT_RECIPE = "v2-opset17-pc-ffnout-fp32"


class Backend(Protocol):
    name: str
    input_names: tuple[str, ...]

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 [batch, seq] inputs -> float32 start and end logits [batch, seq]."""


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


class TorchBackend:
    name = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0):
        import torch
        from transformers import AutoModelForQuestionAnswering

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        # Weights may ship in fp16 to stay small; computing in fp32 keeps CPU
        # kernels fast and answers identical across backends.
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self.input_names = _model_input_names(self.model)

    def run(self, input_ids, token_type_ids, attention_mask):
        torch = self.torch
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
    def __init__(self, model_dir: Path, cache_dir: Path, int8: bool, device: str = "cpu", threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        self.name = "onnx-int8" if int8 else "onnx"
        path = export_onnx(model_dir, cache_dir, int8=int8)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.providers = select_providers(providers or [], ort.get_available_providers(), device)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def run(self, input_ids, token_type_ids, attention_mask):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        start, end = self.session.run(["start_logits", "end_logits"], {k: feeds[k] for k in self.input_names})
        return start, end


def _model_input_names(model) -> tuple[str, ...]:
    import inspect

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return tuple(names)


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_onnx(model_dir: Path, cache_dir: Path, int8: bool = False) -> Path:
    """Export (once) and return the path of the fp32 or INT8 ONNX model."""
    key = model_hash(model_dir)
    folder = Path(cache_dir) / "onnx" / key
    fp32 = folder / "model.onnx"
    if not fp32.exists():
        log.info("exporting %s to ONNX (once; cached under %s)", model_dir, folder)
        _atomic_write(fp32, lambda tmp: _export_fp32(model_dir, tmp))
    if not int8:
        return fp32
    q = folder / "model-int8.onnx"
    if not q.exists():
        _atomic_write(q, lambda tmp: _quantize(fp32, model_dir, tmp))
    return q


def _export_fp32(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    names = _model_input_names(model)
    dummy = {n: torch.ones((1, 8), dtype=torch.long) for n in names}

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            out = self.m(**dict(zip(names, args)))
            return out.start_logits, out.end_logits

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes |= {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}}
    with torch.inference_mode():
        torch.onnx.export(
            Wrapper(model),
            tuple(dummy[n] for n in names),
            str(out),
            input_names=list(names),
            output_names=["start_logits", "end_logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,  # the TorchScript exporter handles dynamic axes without onnxscript
        )


def _quantize(fp32: Path, model_dir: Path, out: Path) -> None:
    import json

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg.get("model_type", "bert")
    opt_type = model_type if model_type in ("bert", "roberta", "distilbert", "albert", "electra") else "bert"
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        # The fused graph (attention, layer norm, GELU) is the base that makes
        # INT8 pay off; fp32 gains nothing from it over ORT's own optimisation.
        opt = optimize_model(
            str(fp32),
            model_type=opt_type,
            num_heads=int(cfg.get("num_attention_heads", 0)),
            hidden_size=int(cfg.get("hidden_size", 0)),
        )
        opt.save_model_to_file(str(optimized))
        graph = onnx.load(str(optimized), load_external_data=False).graph
        quantize_dynamic(
            str(optimized),
            str(out),
            weight_type=QuantType.QInt8,
            # Per-channel scales, and the feed-forward output projections kept
            # in fp32: their inputs (post-GELU activations) carry the outliers
            # that per-tensor INT8 clips. Measured on SQuAD dev with the shipped
            # MiniLM: full INT8 lost 3.6 F1; this loses none, for ~20% speed.
            per_channel=True,
            nodes_to_exclude=ffn_output_matmuls(graph),
            # Without it quantize_dynamic cannot type some fused outputs.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def ffn_output_matmuls(graph) -> list[str]:
    """MatMul nodes of the feed-forward down-projections (``.../output/dense``
    outside attention), by the module paths the exporter writes into names."""
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and "/output/dense/" in n.name and "attention" not in n.name
    ]


def load_backend(kind: str, model_dir: Path, *, device: str, threads: int, cache_dir: Path, providers: list[str] | None) -> Backend:
    if kind == "torch":
        return TorchBackend(model_dir, device=device, threads=threads)
    if kind in ("onnx", "onnx-int8"):
        return OnnxBackend(model_dir, cache_dir, int8=kind == "onnx-int8", device=device, threads=threads, providers=providers)
    raise BackendUnavailable(f"unknown backend {kind!r}: choose torch, onnx or onnx-int8")
