"""`shardqa eval-answers`: the service's route -> read -> merge path in one
process over SQuAD questions (tiny model, sample corpus)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardqa.cli import app
from shardqa.services.evaluate import evaluate_answers, pick_questions
from shardqa.services.service_config import settings_with
from shardqa.training.squad import load_squad, squad_scores

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from shardqa.preprocessing.build import build_index

    store_dir = tmp_path_factory.mktemp("index-eval")
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    return str(store_dir)


@pytest.fixture(scope="module")
def reader(index):
    from shardqa.services.reader import Reader

    return Reader.load(settings=settings_with({"model": str(TINY), "backend": "torch"}), threads=1)


def settings(index, **overrides):
    return settings_with({"model": str(TINY), "store": index, "backend": "torch", "index_refresh_s": 600, "route_k": 3} | overrides)


def test_questions_are_the_benchmarks_shuffle_then_skip_every_limit():
    examples = load_squad(SAMPLE)
    everything = pick_questions(examples, seed=0)
    assert len({q.question for q in everything}) == len(everything) > 10
    assert [q.id for q in pick_questions(examples, seed=0, skip=3, every=2, limit=4)] == [q.id for q in everything[3::2][:4]]
    assert [q.id for q in pick_questions(examples, seed=1)] != [q.id for q in everything]


def test_scores_are_the_services_own_answers(index, reader):
    from shardqa.services.qa_service import QAService
    from shardqa.services.shard_client import LocalShards
    from shardqa.services.shard_worker import ShardWorker
    from shardqa.preprocessing.store import open_store

    examples = pick_questions(load_squad(SAMPLE), limit=8)
    s = settings(index)
    ev = evaluate_answers(s, examples, reader=reader, progress=False)

    store = open_store(index)
    service = QAService.create(s, LocalShards([ShardWorker(i, reader, store) for i in range(2)]))

    async def answers():
        await service.start(wait_s=30)
        try:
            return {ex.id: (json.loads((await service.answer(ex.question)).answers_json) or [{"text": ""}])[0]["text"] for ex in examples}
        finally:
            await service.stop()

    expected = squad_scores(asyncio.run(answers()), examples)
    assert ev.questions == 8
    assert ev.f1 == round(expected["f1"], 2) and ev.exact_match == round(expected["exact_match"], 2)
    assert 1 <= ev.passages_read <= 3
    assert 0 < ev.p50_ms <= ev.p90_ms <= ev.p99_ms
    assert ev.settings["route_k"] == 3 and ev.settings["read_first_stop_logit"] == 16.0


def test_passages_read_follow_the_reading_settings(index, reader):
    examples = pick_questions(load_squad(SAMPLE), limit=6)
    # Every routed passage read, all at once.
    everything = evaluate_answers(settings(index, route_min_relative_score=0.0, read_first_stop_logit=float("inf")),
                                  examples, reader=reader, progress=False)
    assert everything.passages_read == 3 and everything.one_passage_share == 0.0
    assert everything.settings["read_first_stop_logit"] == "inf"  # JSON has no inf
    json.dumps(everything.to_json(), allow_nan=False)
    # Every best passage confident: one passage each.
    first_only = evaluate_answers(settings(index, route_min_relative_score=0.0, read_first_stop_logit=-1e9),
                                  examples, reader=reader, progress=False)
    assert first_only.passages_read == 1 and first_only.one_passage_share == 1.0


def test_the_command_prints_json_and_refuses_bad_input(index, monkeypatch, capsys):
    runner = CliRunner()
    result = runner.invoke(app, ["eval-answers", str(SAMPLE), "--store", index, "--model", str(TINY), "--backend", "torch", "--limit", "3", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)  # progress bars go to stderr
    assert body["questions"] == 3 and set(body) >= {"f1", "exact_match", "passages_read", "p50_ms", "settings"}

    from shardqa.cli import main

    for args, message in (
        (["eval-answers", str(SAMPLE), "--store", index, "--skip", "100000"], "no questions to evaluate"),
        (["eval-answers", str(SAMPLE) + ".missing", "--store", index], "no such file"),
    ):
        monkeypatch.setattr("sys.argv", ["shardqa", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_question_the_service_refuses_scores_as_an_empty_answer(index, reader):
    from dataclasses import replace

    examples = pick_questions(load_squad(SAMPLE), limit=3)
    examples[1] = replace(examples[1], question="x" * 5000)  # over max_question_chars
    ev = evaluate_answers(settings(index), examples, reader=reader, progress=False)
    assert ev.questions == 3 and ev.refused == 1
    from shardqa.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="refused all 1 questions"):
        evaluate_answers(settings(index), examples[1:2], reader=reader, progress=False)


def test_an_index_of_another_corpus_is_refused_as_eval_route_refuses_it(index, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": [{"title": "Elsewhere", "paragraphs": [{
        "context": "Nothing here is in the sample corpus.",
        "qas": [{"id": "q1", "question": "What is here?", "answers": [{"text": "Nothing", "answer_start": 0}]}]}]}]}))
    from shardqa.cli import main

    monkeypatch.setattr("sys.argv", ["shardqa", "eval-answers", str(other), "--store", index, "--model", str(TINY),
                                     "--backend", "torch", "--limit", "5", "--json"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: the index (version ") and "was not built from" in out.err
    assert f"shardqa index {other} --store {index}" in out.err
