"""The fine-tuning recipe: labels land on the answer, and a stopped-and-resumed
run ends with exactly the weights of an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardqa.training.finetune import TrainConfig, build_train_features, train
from shardqa.training.squad import load_squad
from shardqa.tokenization import TextTokenizer

TINY = Path(__file__).parent / "fixtures" / "tiny-bert-qa"


def _squad(path: Path, n: int = 24) -> Path:
    paragraphs = []
    for i in range(n):
        ctx = f"Paragraph {i} is about the city number {i}. Its mayor in {1900 + i} was Person{i} Smith, who liked rivers."
        ans = f"Person{i} Smith"
        paragraphs.append({"context": ctx, "qas": [{"id": f"q{i}", "question": f"Who was the mayor of city {i}?",
                                                    "answers": [{"text": ans, "answer_start": ctx.index(ans)}]}]})
    path.write_text(json.dumps({"data": [{"title": "Cities", "paragraphs": paragraphs}]}))
    return path


def test_labels_point_at_the_answer_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    examples = load_squad(_squad(tmp_path / "s.json", 4))
    feats = build_train_features(examples, tok, max_len=384, stride=128)
    assert len(feats) == 4
    for ex, (ids, _types, s, e) in zip(examples, feats):
        assert 0 < s <= e
        assert tok.decode(ids[s : e + 1].tolist()) == ex.answers[0].lower()


def test_long_context_windows_without_the_answer_point_at_cls(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    filler = " ".join(f"word{i}" for i in range(300))
    ctx = "The answer is Rollo. " + filler
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "x", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": ctx.index("Rollo")}]}]}]}]}))
    feats = build_train_features(load_squad(path), tok, max_len=128, stride=32)
    assert len(feats) > 1
    ids, _, start, end = feats[0][:4]
    assert 0 < start <= end and tok.decode(ids[start:end + 1].tolist()) == "rollo"
    assert all(f[2] == 0 and f[3] == 0 for f in feats[1:] if "rollo" not in tok.decode(f[0].tolist()))


def test_training_windows_are_the_serving_reader_s_windows(tmp_path):
    """Training labels the windows the Hugging Face way and serving cuts them
    from pre-tokenised passages: with the same max_seq_len and doc_stride the
    two are the same token ids, window for window (no train/serve skew)."""
    from transformers import AutoTokenizer

    from shardqa.services.reader import Reader, passage_from_text

    tok = AutoTokenizer.from_pretrained(TINY)
    filler = " ".join(f"The {w} river flows past town {i}." for i, w in enumerate(["long", "cold", "wide", "old"] * 20))
    ctx = "The answer is Rollo, who led the Normans. " + filler
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "x", "question": "Who led the Normans?", "answers": [{"text": "Rollo", "answer_start": ctx.index("Rollo")}]}]}]}]}))
    feats = build_train_features(load_squad(path), tok, max_len=128, stride=32)
    reader = Reader.load(str(TINY), "torch", max_seq_len=128, doc_stride=32, threads=1)
    windows = reader.features(reader.check_question("Who led the Normans?"), passage_from_text(reader.tokenizer, ctx).tokens)
    assert len(feats) == len(windows) > 2
    for (ids, types, _s, _e), w in zip(feats, windows):
        assert ids.tolist() == w.input_ids.tolist() and types.tolist() == w.token_type_ids.tolist()


@pytest.mark.slow
def test_resume_gives_identical_weights(tmp_path):
    data = _squad(tmp_path / "train.json")

    def cfg(out):
        return TrainConfig(base_model=str(TINY), train_file=str(data), dev_file=str(data), output_dir=str(out),
                           batch_size=4, epochs=1.0, eval_every=1000, eval_questions=8, checkpoint_every=2, bf16=False)

    straight = train(cfg(tmp_path / "a"), progress=False)
    assert train(cfg(tmp_path / "b"), progress=False, stop_after_steps=3) is None
    resumed = train(cfg(tmp_path / "b"), progress=False)
    a = load_file(straight / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training moved the weights at all
    base = load_file(TINY / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["dev_probe"]["n"] == 8


def test_a_later_stage_continues_the_data_order_exactly():
    from shardqa.training.finetune import build_schedule

    lengths = [(i * 37) % 300 + 10 for i in range(1000)]
    whole = build_schedule(lengths, 8, 42, 0.0, 1.5)
    first = build_schedule(lengths, 8, 42, 0.0, 0.3)
    second = build_schedule(lengths, 8, 42, 0.3, 1.2)
    assert first + second == whole
    # one epoch covers every feature once
    seen = sorted(i for b in build_schedule(lengths, 8, 42, 0.0, 1.0) for i in b)
    assert seen == list(range(1000))


def test_learning_curve_adds_up_the_stages_a_run_continued(tmp_path):
    import json

    from shardqa.training.package import learning_curve

    def stage(name, init_from, steps, probes):
        run = tmp_path / name
        (run / "final").mkdir(parents=True)
        cfg = {"steps": steps, "train_seconds": 100.0 * steps, "init_from": init_from}
        (run / "final" / "training_config.json").write_text(json.dumps(cfg))
        lines = [json.dumps({"step": s, "features_seen": 32 * s, "elapsed_s": 100.0 * s,
                             "dev_probe": {"exact_match": f1 - 10, "f1": f1, "n": 500}}) for s, f1 in probes]
        (run / "train_log.jsonl").write_text("\n".join(lines) + "\n")
        return run

    first = stage("s1", None, 10, [(5, 60.0), (10, 70.0)])
    second = stage("s2", str(first / "final"), 8, [(4, 72.0), (8, 75.0)])
    curve = learning_curve(second)
    assert [(p["stage"], p["step"], p["f1"]) for p in curve] == [(1, 5, 60.0), (1, 10, 70.0), (2, 14, 72.0), (2, 18, 75.0)]
    assert curve[-1]["features_seen"] == 320 + 256 and curve[-1]["elapsed_s"] == 1000.0 + 800.0
    assert [p["stage"] for p in learning_curve(first)] == [1, 1]


def test_model_card_states_the_int8_gap_with_its_sign(tmp_path):
    from shardqa.training.package import write_card

    scores = {
        "torch": {"exact_match": 66.65, "f1": 77.4776, "n": 10570, "seconds": 468.0},
        "onnx-int8": {"exact_match": 66.07, "f1": 76.8205, "n": 10570, "seconds": 224.0},
    }
    card = write_card(tmp_path, {"weights_sha256": "ab" * 32, "weights_bytes": 1}, {"epochs": 0.3, "steps": 10},
                      scores, [], "shardqa train RUN").read_text()
    # INT8 is the lower one here: the gap INT8 minus fp32 is negative.
    assert "INT8 minus fp32 F1: -0.66 (torch fp32 F1 77.48;" in card
    assert "| onnx-int8 | 66.07 | 76.82 | 10570 | 224 |" in card
