"""Fine-tune a BERT-family encoder for extractive QA on SQuAD v1.1, on CPU or GPU.

Deterministic given the seed: the feature order, dropout and the optimiser
state all derive from it, and a resumed run restores every RNG, so a run that
was stopped and resumed ends with the same weights as one that was not.

Choices, and why (recorded in the model card too):
- max_seq_len 384, doc_stride 128: the serving defaults, so training windows
  look like the windows the reader sees.
- dynamic padding with length-grouped batches: SQuAD features average ~170
  tokens, so padding to 384 would waste over half the compute on 2 cores.
- bf16 autocast on CPUs that have avx512_bf16: ~1.9x faster steps measured
  here, master weights stay fp32.
- lr 1e-4 with 6% warm-up and linear decay: small encoders (384 hidden) want a
  higher rate than BERT-base's 3e-5 to move in a single epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shardqa.training.squad import SquadExample, load_squad, squad_scores


@dataclass
class TrainConfig:
    base_model: str
    train_file: str
    dev_file: str
    output_dir: str
    seed: int = 42
    max_seq_len: int = 384
    doc_stride: int = 128
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    epochs: float = 1.0
    train_limit: int | None = None  # questions of train to use (None: all)
    start_epoch: float = 0.0  # where in the seeded batch order this run starts (a continuation skips what an earlier stage saw)
    init_from: str | None = None  # weights to start from (an earlier stage's model); None = base_model
    bf16: bool = True
    threads: int | None = None
    checkpoint_every: int = 100  # optimiser steps
    eval_every: int = 200  # optimiser steps; learning-curve points
    eval_questions: int = 500  # dev questions per learning-curve point


# --- features -------------------------------------------------------------------

def build_train_features(examples: list[SquadExample], tokenizer, max_len: int, stride: int):
    """Tokenise (question, context) with overflowing windows; label start/end tokens.

    Windows that do not contain the answer are labelled with the [CLS] index, as
    the reference Hugging Face recipe does for SQuAD v1.1.
    """
    feats = []
    chunk = 1000
    for i in range(0, len(examples), chunk):
        batch = examples[i : i + chunk]
        enc = tokenizer(
            [e.question.lstrip() for e in batch],
            [e.context for e in batch],
            truncation="only_second",
            max_length=max_len,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        for j, offsets in enumerate(enc["offset_mapping"]):
            ex = batch[enc["overflow_to_sample_mapping"][j]]
            ids = enc["input_ids"][j]
            seq = enc.sequence_ids(j)
            a_start = ex.answer_starts[0]
            a_end = a_start + len(ex.answers[0])
            ctx_first = seq.index(1)
            ctx_last = len(seq) - 1 - seq[::-1].index(1)
            if offsets[ctx_first][0] > a_start or offsets[ctx_last][1] < a_end:
                s = e = 0
            else:
                s = ctx_first
                while s <= ctx_last and offsets[s][0] <= a_start:
                    s += 1
                s -= 1
                e = ctx_last
                while e >= ctx_first and offsets[e][1] >= a_end:
                    e -= 1
                e += 1
            feats.append(
                (
                    np.asarray(ids, dtype=np.int32),
                    np.asarray(enc["token_type_ids"][j], dtype=np.int8),
                    s,
                    e,
                )
            )
    return feats


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within mega-batches by length, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for i in range(0, len(order), mega):
        group = sorted(order[i : i + mega], key=lambda k: lengths[k], reverse=True)
        batches.extend(group[j : j + batch_size] for j in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def build_schedule(lengths: list[int], batch_size: int, seed: int, start_epoch: float, epochs: float) -> list[list[int]]:
    """Batches for the span [start_epoch, start_epoch + epochs) of an endless
    sequence of epochs, each with its own seeded order, so a later stage
    continues exactly where an earlier one stopped."""
    schedule: list[list[int]] = []
    begin, end = start_epoch, start_epoch + epochs
    for ep in range(math.floor(begin), math.ceil(end)):
        b = length_grouped_batches(lengths, batch_size, random.Random(seed * 1000 + ep))
        lo = int(len(b) * max(0.0, begin - ep))
        hi = int(len(b) * min(1.0, end - ep))
        schedule.extend(b[lo:hi])
    return schedule


def collate(feats, idx, pad_id: int):
    rows = [feats[k] for k in idx]
    # Round widths up to a multiple of 32: oneDNN caches kernels per shape, and
    # a new width every step costs more than the padded tokens do.
    width = -(-max(len(r[0]) for r in rows) // 32) * 32
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tt = torch.zeros((len(rows), width), dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[0])
        ids[i, :n] = torch.from_numpy(r[0].astype(np.int64))
        tt[i, :n] = torch.from_numpy(r[1].astype(np.int64))
        am[i, :n] = 1
    sp = torch.tensor([r[2] for r in rows])
    ep = torch.tensor([r[3] for r in rows])
    return ids, tt, am, sp, ep


# --- quick dev evaluation for the learning curve ----------------------------------

@torch.no_grad()
def quick_eval(model, tokenizer, examples: list[SquadExample], cfg: TrainConfig) -> dict:
    """Best valid span per question over its windows; official metric on the result.

    This is the training-time probe only; the reported figures come from
    `shardqa eval-reader`, which runs the serving reader.
    """
    model.eval()
    best: dict[str, tuple[float, str]] = {}
    bs = 64
    for i in range(0, len(examples), bs):
        batch = examples[i : i + bs]
        enc = tokenizer(
            [e.question.lstrip() for e in batch],
            [e.context for e in batch],
            truncation="only_second",
            max_length=cfg.max_seq_len,
            stride=cfg.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=enc["token_type_ids"],
            )
        start = out.start_logits.float()
        end = out.end_logits.float()
        for j in range(start.shape[0]):
            ex = batch[int(enc["overflow_to_sample_mapping"][j])]
            seq = enc.sequence_ids(j)
            mask = torch.tensor([s != 1 for s in seq] + [True] * (start.shape[1] - len(seq)))
            s = start[j].masked_fill(mask, -1e9)
            e = end[j].masked_fill(mask, -1e9)
            scores = s[:, None] + e[None, :]
            scores = torch.triu(scores) - torch.tril(torch.full_like(scores, 1e9), -1)
            scores = scores - torch.triu(torch.full_like(scores, 1e9), 30)
            flat = int(torch.argmax(scores))
            si, ei = divmod(flat, scores.shape[1])
            score = float(scores[si, ei])
            off = enc["offset_mapping"][j]
            text = ex.context[int(off[si][0]) : int(off[ei][1])]
            if ex.id not in best or score > best[ex.id][0]:
                best[ex.id] = (score, text)
    model.train()
    return squad_scores({k: v[1] for k, v in best.items()}, examples)


# --- training loop -----------------------------------------------------------------

def _rng_state():
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train(cfg: TrainConfig, progress: bool = True, stop_after_steps: int | None = None) -> Path | None:
    """Run (or resume) training; returns the final model folder, or None when
    ``stop_after_steps`` ended this invocation early (a checkpoint is written)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    examples = load_squad(cfg.train_file)
    if cfg.train_limit:
        rng = random.Random(cfg.seed)
        examples = rng.sample(examples, min(cfg.train_limit, len(examples)))
    dev = load_squad(cfg.dev_file)
    dev_probe = random.Random(cfg.seed + 1).sample(dev, min(cfg.eval_questions, len(dev)))

    t0 = time.time()
    feats = build_train_features(examples, tokenizer, cfg.max_seq_len, cfg.doc_stride)
    print(f"{len(examples)} questions -> {len(feats)} features in {time.time() - t0:.0f}s", flush=True)

    lengths = [len(f[0]) for f in feats]
    schedule = build_schedule(lengths, cfg.batch_size, cfg.seed, cfg.start_epoch, cfg.epochs)
    total = len(schedule)

    model = AutoModelForQuestionAnswering.from_pretrained(cfg.init_from or cfg.base_model)
    model.train()
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)

    ckpt = out / "checkpoint.pt"
    log_path = out / "train_log.jsonl"
    step = 0
    elapsed = 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        defaults = asdict(TrainConfig(cfg.base_model, cfg.train_file, cfg.dev_file, cfg.output_dir))
        if {k: state["config"].get(k, defaults[k]) for k in defaults} != asdict(cfg):
            raise SystemExit(f"{ckpt} was written with another configuration; use a new output directory")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        elapsed = state["elapsed"]
        _set_rng_state(state["rng"])
        print(f"resumed at step {step}/{total}", flush=True)

    def save_checkpoint():
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "rng": _rng_state(),
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", smoothing=0.05)
    running = None
    seen = sum(len(b) for b in schedule[:step])
    start_step = step
    while step < total:
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            save_checkpoint()
            bar.close()
            return None
        t = time.time()
        ids, tt, am, sp, ep = collate(feats, schedule[step], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, token_type_ids=tt, attention_mask=am, start_positions=sp, end_positions=ep).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(schedule[step - 1])
        elapsed += time.time() - t
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if step % 50 == 0:
            log({"step": step, "features_seen": seen, "loss": running, "lr": sched.get_last_lr()[0], "elapsed_s": elapsed})
        if step % cfg.checkpoint_every == 0 or step == total:
            save_checkpoint()
        if step % cfg.eval_every == 0 or step == total:
            scores = quick_eval(model, tokenizer, dev_probe, cfg)
            log({"step": step, "features_seen": seen, "dev_probe": scores, "elapsed_s": elapsed})
            print(f"step {step}: dev probe EM {scores['exact_match']:.1f} F1 {scores['f1']:.1f}", flush=True)
            save_checkpoint()
    bar.close()

    final = out / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "training_config.json").write_text(json.dumps(asdict(cfg) | {"train_seconds": elapsed, "steps": total}, indent=2))
    return final


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-model", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--dev-file", required=True)
    p.add_argument("--output-dir", required=True)
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in ("base_model", "train_file", "dev_file", "output_dir"):
            continue
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool",):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif "str" in str(f.type):
            p.add_argument(flag, type=str, default=f.default)
        elif "int" in str(f.type):
            p.add_argument(flag, type=int, default=f.default)
        else:
            p.add_argument(flag, type=float, default=f.default)
    a = p.parse_args(argv)
    cfg = TrainConfig(**vars(a))
    print(train(cfg))


if __name__ == "__main__":
    main()
