"""`shardqa demo`: index the shipped sample corpus, serve it on an embedded
Ray, show how to ask, answer a few sample questions, serve until Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from shardqa.config import DEFAULT_SAMPLE_CORPUS
from shardqa.errors import ShardQAError

#: Sample questions per article of the sample corpus: the first of each.
SAMPLES_PER_ARTICLE = 1


def sample_questions(corpus: Path) -> list[tuple[str, tuple[str, ...], str]]:
    """(question, its SQuAD gold answers, the id of the paragraph holding
    them) for the first questions of each article."""
    from shardqa.preprocessing.corpus import squad_doc_id

    data = json.loads(corpus.read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        qas = [(qa["question"], tuple(a["text"] for a in qa.get("answers", ())), squad_doc_id(article["title"], i))
               for i, p in enumerate(article["paragraphs"]) for qa in p["qas"]]
        out.extend(qas[:SAMPLES_PER_ARTICLE])
    return out


def judge(answer: str, gold: tuple[str, ...], answer_doc: str | None = None, gold_doc: str | None = None) -> str:
    """How the answer compares with SQuAD's gold answers, by the official
    normalisation: shown so that a miss reads as a miss, and says where a
    miss came from when it is not the gold answer's paragraph."""
    from shardqa.training.squad import best_over_gold, exact_match_score, f1_score

    if not gold:
        return ""
    if best_over_gold(exact_match_score, answer, gold):
        return "matches the gold answer"
    f1 = best_over_gold(f1_score, answer, gold)
    verdict = f"gold answer {gold[0]!r}" + (f" (F1 {f1:.2f})" if f1 else ", missed")
    if answer_doc and gold_doc and answer_doc != gold_doc:
        verdict += f": the answer is from {answer_doc}, the gold answer from {gold_doc}"
    return verdict


def cli_command() -> str:
    """How to run shardqa from here, for the commands the demo prints: its
    name when it is on PATH, else the script that is running (after
    `make demo`, .venv/bin/shardqa)."""
    import shutil
    import sys

    if shutil.which("shardqa"):
        return "shardqa"
    script = Path(sys.argv[0])
    if script.name == "shardqa" and script.is_file():
        return _shortest(script)
    return f"{_shortest(Path(sys.executable))} -m shardqa.cli"


def _shortest(path: Path) -> str:
    """`path` relative to here when it lies below here, else absolute."""
    relative = os.path.relpath(path.absolute())
    return relative if not relative.startswith("..") else str(path.absolute())


def demo_settings(base, store_dir: Path, host: str, port: int):
    """The demo's service settings: its own index, and an in-process cache, as
    documented, whatever SHARDQA_CACHE_URL says."""
    from shardqa.services.service_config import settings_with

    # model_copy, as settings_with ignores None (its "not given").
    return settings_with({"store": str(store_dir), "host": host, "port": port}, base=base).model_copy(update={"cache_url": None})


def demo_index(corpus: Path, store_dir: Path, shards: int, model: str, tokenizer, encoder: str = "auto") -> tuple[str, bool]:
    """The demo's index version, built unless an index of this corpus, shard
    count, tokenizer and dense encoder (`encoder` as `shardqa index --encoder`
    takes it) is already there; (version, reused)."""
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.router.encoder import configured_encoder, encoder_fingerprint

    stamp_file = store_dir / "demo-stamp.json"
    encoder = configured_encoder(encoder)
    stamp = {
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "shards": shards,
        "tokenizer": tokenizer.fingerprint,
        # As the index manifest records its dense vectors (None: lexical
        # routing only), so switching the encoder on or off rebuilds.
        "encoder": encoder_fingerprint(encoder),
    }
    if stamp_file.exists():
        try:
            saved = json.loads(stamp_file.read_text())
            version = open_store(str(store_dir)).current_version()
            if saved.get("stamp") == stamp and saved.get("version") == version:
                return version, True
        except (ValueError, ShardQAError):
            pass  # unreadable stamp or no index: build afresh
    store_dir.mkdir(parents=True, exist_ok=True)
    manifest = build_index(corpus, str(store_dir), shards, model, tokenizer=tokenizer, encoder=encoder)
    stamp["encoder"] = (manifest.params.get("encoder") or {}).get("fingerprint")
    stamp_file.write_text(json.dumps({"stamp": stamp, "version": manifest.version}))
    return manifest.version, False


def demo_dir(path: Path) -> Path:
    """The demo's folder, made now: a path that cannot be one fails in one
    line before the model loads and Ray starts."""
    from shardqa.errors import StoreError

    if path.exists() and not path.is_dir():
        raise StoreError(f"--workdir {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"--workdir {path}: cannot create it ({exc.strerror or exc})") from None
    return path


def run_demo(
    *,
    host: str,
    port: int,
    overrides: dict[str, Any],
    shards: int,
    workdir: Path | None,
    serve_forever: bool,
    verbose: bool,
    echo: Callable[[str], None],
) -> None:
    import httpx

    from shardqa.services.client import ask
    from shardqa.services.reader import check_qa_model, resolve_model_dir
    from shardqa.services.runtime import check_bind, deploy, wait_ready
    from shardqa.services.serve_cli import wait_for_interrupt
    from shardqa.services.service_config import make_service_config, settings_with
    from shardqa.tokenization import TextTokenizer

    t0 = time.perf_counter()
    check_bind(host, port)
    # The demo always runs its own Ray, even where RAY_ADDRESS names a cluster.
    os.environ.pop("RAY_ADDRESS", None)
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # Ray notes, on every start where a token exists in ~/.ray, that it
        # turned token authentication on: nothing for a demo user to do. Its
        # warning that authentication is off still shows.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled"))

    base = settings_with(overrides)
    corpus = DEFAULT_SAMPLE_CORPUS
    store_dir = demo_dir(Path(workdir or base.cache_dir / "demo").expanduser()) / "index"
    # A missing or wrong model fails here, in one line, before Ray starts.
    model_dir = resolve_model_dir(base.model, base.cache_dir)
    check_qa_model(model_dir)
    tokenizer = TextTokenizer.from_pretrained(model_dir)

    echo(f"shardqa demo: {corpus.name} (SQuAD v1.1 dev sample, CC BY-SA 4.0), model {model_dir.name}, backend {base.backend}")
    t_index = time.perf_counter()
    version, reused = demo_index(corpus, store_dir, shards, str(model_dir), tokenizer)
    echo(f"  index {version}: {'reused' if reused else 'built'} in {time.perf_counter() - t_index:.1f} s ({store_dir})")

    settings = demo_settings(base, store_dir, host, port)
    config = make_service_config(settings, shards)
    echo(f"  starting embedded Ray Serve: {shards} shard deployments + ingress ...")
    running = deploy(config, host, port, address=None, quiet=not verbose)
    try:
        wait_ready(running.url, timeout_s=600)
        url = running.url
        echo(f"ready in {time.perf_counter() - t0:.1f} s at {url}  (API docs: {url}/docs)")
        echo("")
        echo("ask it:")
        echo(
            f"  curl -s {url}/v1/answer -H 'content-type: application/json' "
            "-d '{\"question\": \"Who gave their name to Normandy?\", \"top_k\": 1}'"
        )
        echo(f"  {cli_command()} query \"Who gave their name to Normandy?\" --url {url}")
        echo("")
        with httpx.Client() as client:
            for q, gold, gold_doc in sample_questions(corpus):
                t = time.perf_counter()
                body = ask(url, q, client=client)
                ms = 1000 * (time.perf_counter() - t)
                best = body["answers"][0] if body["answers"] else None
                answer = f"{best['text']!r} (score {best['score']:.2f}, {best['doc_id']}, shard {best['shard']})" if best else "no answer"
                verdict = judge(best["text"] if best else "", gold, best["doc_id"] if best else None, gold_doc)
                echo(f"  Q: {q}\n  A: {answer}  [{ms:.0f} ms]" + (f"\n     {verdict}" if verdict else ""))
        if serve_forever:
            echo("")
            echo("serving; Ctrl-C stops.")
            wait_for_interrupt()
    finally:
        echo("stopping ...")
        running.shutdown()
        echo("stopped")
