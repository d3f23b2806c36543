"""Backend selection and the ONNX export cache (GPU paths cannot run here, so
their selection logic is what is tested)."""

import shutil
from pathlib import Path

import pytest

from shardqa.errors import BackendUnavailable
from shardqa.services import backends
from shardqa.services.backends import export_onnx, model_hash, resolve_device, select_providers

TINY = Path(__file__).parent / "fixtures" / "tiny-bert-qa"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


def test_gpu_device_prefers_tensorrt_then_cuda_then_cpu():
    assert select_providers([], [TRT, CUDA, CPU], "cuda") == [TRT, CUDA, CPU]
    assert select_providers([], [CUDA, CPU], "cuda") == [CUDA, CPU]


def test_cpu_device_uses_cpu_only_even_on_gpu_builds():
    assert select_providers([], [TRT, CUDA, CPU], "cpu") == [CPU]


def test_explicit_list_is_honoured_and_missing_providers_fall_back_to_cpu(caplog):
    assert select_providers([CUDA], [TRT, CUDA, CPU], "cpu") == [CUDA, CPU]
    assert select_providers([TRT, CUDA], [CPU], "cuda") == [CPU]
    assert "not available here" in caplog.text


def test_cuda_request_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        backends.load_backend("tensorflow", TINY, device="cpu", threads=1, cache_dir=tmp_path, providers=None)


def test_export_is_cached_by_model_hash(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    first = export_onnx(model, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert export_onnx(model, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == stamp  # loaded, not exported again
    before = model_hash(model)
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    assert model_hash(model) != before  # any change to the model files means a new export
    # tokenizer files do not change the network, so they do not change the key
    h = model_hash(model)
    (model / "vocab.txt").write_text((model / "vocab.txt").read_text())
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + "\n")
    assert model_hash(model) == h


def test_int8_graph_has_fused_attention_and_quantised_matmuls(tmp_path):
    """The fused graph is what makes INT8 fast: one Attention op per layer
    (eager-attention export) and every weight MatMul in INT8."""
    import json

    import onnx

    layers = json.loads((TINY / "config.json").read_text())["num_hidden_layers"]
    int8 = onnx.load(str(export_onnx(TINY, tmp_path, int8=True))).graph
    ops = [n.op_type for n in int8.node]
    assert ops.count("QAttention") + ops.count("Attention") == layers
    assert "MatMul" not in ops  # none left in fp32
    assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops)


def test_cpu_sessions_keep_residual_adds_out_of_skip_layer_norm(tmp_path, monkeypatch):
    """ONNX Runtime's CPU SkipLayerNormalization is several times slower than
    Add + LayerNormalization: neither the INT8 file nor a CPU session's own
    optimizer may fuse them, while a GPU session keeps the fusion."""
    import onnx

    from shardqa import onnx_export

    path = export_onnx(TINY, tmp_path, int8=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops

    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options, providers, disabled_optimizers):
            seen[providers[0]] = disabled_optimizers

    import onnxruntime as ort

    with monkeypatch.context() as m:
        m.setattr(ort, "InferenceSession", FakeSession)
        onnx_export.open_session(path, threads=1, providers=[CPU])
        onnx_export.open_session(path, threads=1, providers=[TRT, CUDA, CPU])
        onnx_export.open_session(path, threads=1, providers=["OpenVINOExecutionProvider", CPU])
    assert seen == {CPU: ["SkipLayerNormFusion"], TRT: [], "OpenVINOExecutionProvider": ["SkipLayerNormFusion"]}

    # and the real CPU session, as optimised, still has no SkipLayerNormalization
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "as-run.onnx")
    ort.InferenceSession(str(path), sess_options=opts, providers=[CPU], disabled_optimizers=onnx_export.CPU_DISABLED_FUSIONS)
    assert "SkipLayerNormalization" not in [n.op_type for n in onnx.load(str(tmp_path / "as-run.onnx")).graph.node]


@pytest.mark.parametrize("spin", [False, True])
def test_onnx_spin_wait_follows_the_setting(tmp_path, spin):
    from shardqa.services.reader import Reader
    from shardqa.services.service_config import settings_with

    settings = settings_with({"model": str(TINY), "backend": "onnx", "cache_dir": str(tmp_path), "threads": 2, "onnx_spin_wait": spin})
    session = Reader.load(settings=settings).backend.session
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


def test_export_tools_neither_warn_nor_switch_on_root_logging():
    """The quantiser logs through the root logger: unguarded, its first line
    would install logging.basicConfig and print every library's DEBUG lines
    from then on."""
    import subprocess
    import sys

    code = (
        "import logging, warnings\n"
        "from shardqa.onnx_export import quiet_tools\n"
        "with quiet_tools():\n"
        "    logging.warning('Please consider to run pre-processing before quantization')\n"
        "    warnings.warn('a tracer warning')\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


def test_a_second_thread_count_is_kept_only_when_it_differs(monkeypatch):
    monkeypatch.setattr(backends.os, "cpu_count", lambda: 2)
    assert backends.pick_threads(2, 1) == 1
    assert backends.pick_threads(0, 1) == 1  # the library default is the core count
    assert backends.pick_threads(1, 1) is None
    assert backends.pick_threads(0, 2) is None
    assert backends.pick_threads(2, 0) is None  # 0: always `threads`
    assert backends.pick_threads(1, 2) is None  # never more threads when busy than when quiet
    assert backends.pick_threads(0, 4) is None
    assert backends.pick_threads(2, 1, on_gpu=True) is None


def test_a_gpu_session_has_one_thread_count(tmp_path, monkeypatch):
    import onnxruntime as ort

    opened = []

    class FakeSession:
        def get_inputs(self):
            return []

    def fake_open(path, *, threads, providers, spin_wait=False):
        opened.append((threads, providers))
        return FakeSession()

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(backends, "open_session", fake_open)
    be = backends.OnnxBackend(TINY, tmp_path, int8=False, device="cuda", threads=2, threads_under_load=1)
    assert opened == [(2, [CUDA, CPU])] and be.session_under_load is be.session
    opened.clear()
    be = backends.OnnxBackend(TINY, tmp_path, int8=False, device="cpu", threads=2, threads_under_load=1)
    assert [t for t, _ in opened] == [2, 1] and be.session_under_load is not be.session


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_passes_under_load_run_on_their_own_thread_count_with_the_same_logits(tmp_path, kind):
    import numpy as np
    import torch

    from shardqa.services.reader import Reader
    from shardqa.services.service_config import settings_with

    settings = settings_with({"model": str(TINY), "backend": kind, "cache_dir": str(tmp_path)})
    reader = Reader.load(settings=settings, threads=2, threads_under_load=1)
    be = reader.backend
    assert reader.adapts_threads
    used = []  # the thread count each pass ran on
    if kind == "onnx":
        class Recording:
            def __init__(self, session):
                self.session = session

            def run(self, *args):
                used.append(int(self.session.get_session_options().intra_op_num_threads))
                return self.session.run(*args)

        be.session, be.session_under_load = Recording(be.session), Recording(be.session_under_load)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(2, 24)).astype(np.int64)
    types, mask = np.zeros_like(ids), np.ones_like(ids)

    def run(under_load):
        out = be.run(ids, types, mask, under_load=under_load)
        if kind == "torch":
            used.append(torch.get_num_threads())
        return out

    quiet, busy, _ = run(False), run(True), run(False)
    assert used == [2, 1, 2]  # and back for a quiet service
    for a, b in zip(quiet, busy):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_one_session_when_no_second_thread_count_is_asked(tmp_path):
    from shardqa.services.reader import Reader
    from shardqa.services.service_config import settings_with

    settings = settings_with({"model": str(TINY), "backend": "onnx", "cache_dir": str(tmp_path)})
    reader = Reader.load(settings=settings, threads=2)  # the CLI and eval commands: no service, no load
    assert reader.backend.session_under_load is reader.backend.session and not reader.adapts_threads
