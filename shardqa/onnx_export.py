"""Exporting BERT-family networks to ONNX and making their INT8 copies: the
one recipe shared by the reader's backends and the router's dense encoder.

Both export with eager attention: ONNX Runtime's transformer optimizer
recognises that pattern and fuses it (Attention, EmbedLayerNormalization,
BiasGelu); the SDPA export, transformers' default, stays a dozen unfused
nodes per layer and made INT8 about 1.5x slower on the 2-core benchmark machine.

The residual adds stay ``Add`` + ``LayerNormalization`` on the CPU: ONNX
Runtime's CPU ``SkipLayerNormalization`` kernel took 0.20 ms for one
100 x 384 activation where ``Add`` + ``LayerNormalization`` took 0.03 ms, and
a BERT layer has two of them. Neither the offline optimizer nor the session's
own graph optimizer may fuse them there (on a GPU the fused kernel is the fast
one, so GPU sessions keep that fusion).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

#: Part of every export cache key: bump it when what the exported network
#: computes changes (the dense encoder's index fingerprint includes it).
RECIPE = "eager-fused-opset17-int8-per-channel"
#: Part of the INT8 file's name: bump it when only how the graph is laid out
#: changes (same numbers to float rounding), so indexes stay valid and the
#: file is rebuilt once.
INT8_LAYOUT = "add-layernorm"
#: ONNX Runtime's session-level fusion that would undo ``INT8_LAYOUT`` on the CPU.
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion"]
#: Execution providers whose fused SkipLayerNormalization is the fast kernel.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                           "MIGraphXExecutionProvider", "DmlExecutionProvider"})


def atomic_write(target: Path, write) -> None:
    """``write(tmp_path)``, then rename into place: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def quiet_tools():
    """The exporter's tracer warnings and the quantiser's advice speak to
    whoever calls those tools, not to a shardqa user. The quantiser logs
    through the root logger, whose first use would also switch on every
    library's DEBUG lines for the rest of the process (logging.basicConfig)."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


def cached_export(folder: Path, stem: str, model_dir: Path, export_fp32, int8: bool) -> Path:
    """``folder/stem.onnx`` made once by ``export_fp32(model_dir, path)``, and
    with ``int8`` its quantised copy ``folder/stem-int8-<INT8_LAYOUT>.onnx``, made once too."""
    fp32 = folder / f"{stem}.onnx"
    if not fp32.exists():
        log.info("exporting %s to ONNX (once; cached under %s)", model_dir, folder)
        with quiet_tools():
            atomic_write(fp32, lambda tmp: export_fp32(model_dir, tmp))
    if not int8:
        return fp32
    q = folder / f"{stem}-int8-{INT8_LAYOUT}.onnx"
    if not q.exists():
        with quiet_tools():
            atomic_write(q, lambda tmp: quantize_int8(fp32, model_dir, tmp))
    return q


def load_for_export(auto_class, model_dir: Path):
    """The model in fp32 with eager attention (weights may ship in fp16)."""
    import torch

    from shardqa.services.backends import quiet_weight_loading

    quiet_weight_loading()
    return auto_class.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()


def export(module, dummy: tuple, out: Path, input_names: list[str], output_names: list[str], axes: dict) -> None:
    import torch

    with torch.inference_mode():
        torch.onnx.export(
            module, dummy, str(out), input_names=input_names, output_names=output_names,
            dynamic_axes=axes, opset_version=17,
            dynamo=False,  # the TorchScript exporter handles dynamic axes without onnxscript
        )


def quantize_int8(fp32: Path, model_dir: Path, out: Path) -> None:
    """Fuse the transformer graph, then quantise every weight MatMul to INT8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg.get("model_type", "bert")
    opt_type = model_type if model_type in ("bert", "roberta", "distilbert", "albert", "electra") else "bert"
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        fusions = FusionOptions(opt_type)
        fusions.enable_skip_layer_norm = False
        opt = optimize_model(str(fp32), model_type=opt_type, num_heads=int(cfg.get("num_attention_heads", 0)),
                             hidden_size=int(cfg.get("hidden_size", 0)), optimization_options=fusions)
        opt.save_model_to_file(str(optimized))
        quantize_dynamic(
            str(optimized), str(out), weight_type=QuantType.QInt8,
            # Per-channel weight scales: on the fused graph every MatMul in INT8
            # stays within 0.4 dev F1 of fp32 for the shipped reader, and the
            # encoder's vectors at cosine 0.994 to fp32 (per-tensor: 0.96).
            per_channel=True,
            # Without it quantize_dynamic cannot type some fused outputs.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def open_session(path: Path, *, threads: int, providers: list[str], spin_wait: bool = False):
    """An ONNX Runtime session with this project's CPU choices: ``threads``
    intra-op threads (0: ONNX Runtime's default), one inter-op thread, and no
    spin-waiting unless asked (replicas that spin burn the cores the others need)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    on_gpu = any(p in GPU_PROVIDERS for p in providers)
    disabled = [] if on_gpu else CPU_DISABLED_FUSIONS
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers, disabled_optimizers=disabled)
