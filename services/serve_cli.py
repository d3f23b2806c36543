"""`shardqa serve`, `shardqa demo` and `shardqa query`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from shardqa.config import Backend, setting_default


def _serving_overrides(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def wait_for_interrupt() -> None:
    # Explicit handlers: a process started in the background by a script
    # inherits SIGINT as ignored (Python then installs no handler), and
    # Kubernetes stops pods with SIGTERM. Both must shut Ray down cleanly.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        store: Optional[str] = typer.Option(None, "--store", "-s", help=f"index directory or Redis URL (redis://, rediss://, redis+cluster://, rediss+cluster://, unix://) {setting_default('store')}"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="existing Ray cluster (else RAY_ADDRESS, else an embedded Ray)"),
        host: Optional[str] = typer.Option(None, "--host", help=f"HTTP bind address {setting_default('host')}"),
        port: Optional[int] = typer.Option(None, "--port", "-p", min=1, max=65535, help=f"HTTP port {setting_default('port')}"),
        shards_config: Optional[Path] = typer.Option(None, "--shards-config", help="JSON/YAML file: replicas and resources per shard"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help=f"torch, onnx or onnx-int8 {setting_default('backend')}"),
        replicas_per_shard: Optional[int] = typer.Option(None, "--replicas-per-shard", min=1, help=f"replicas of every shard deployment (2 or more: a lost replica costs no availability) {setting_default('replicas_per_shard')}"),
        num_cpus: Optional[float] = typer.Option(None, "--num-cpus", min=0, help="CPUs per shard replica"),
        num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help="GPUs per shard replica"),
        cache_url: Optional[str] = typer.Option(None, "--cache-url", help="Redis URL of the answer cache (else in-process)"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="show replica logs"),
    ) -> None:
        """Serve an index over HTTP with Ray Serve until Ctrl-C."""
        from shardqa.services.app import service_config_from_args
        from shardqa.services.runtime import check_can_start, deploy, wait_ready
        from shardqa.services.service_config import settings_with

        settings = settings_with(_serving_overrides(host=host, port=port))
        address = ray_address or settings.ray_address
        t0 = time.perf_counter()
        check_can_start(settings.host, settings.port, address)
        config = service_config_from_args(
            _serving_overrides(
                store=store,
                model=model,
                backend=backend,
                replicas_per_shard=replicas_per_shard,
                num_cpus_per_replica=num_cpus,
                num_gpus_per_replica=num_gpus,
                cache_url=cache_url,
                shards_config=str(shards_config) if shards_config else None,
            )
        )
        from shardqa.services.reader import check_qa_model, resolve_model_dir

        # A missing or wrong model fails here, in one line, before Ray starts.
        check_qa_model(resolve_model_dir(config.settings.model, config.settings.cache_dir))
        if config.settings.cache_url:
            from shardqa.preprocessing.redis_store import check_redis

            # Unchecked, an unreachable cache would only show as every answer
            # computed afresh and a metric.
            check_redis(config.settings.cache_url, what="the answer cache")
        typer.echo(f"starting {config.shards} shard deployment(s) of {config.settings.store} ...", err=True)
        running = deploy(config, settings.host, settings.port, address=address, quiet=not verbose)
        try:
            ready = wait_ready(running.url)
            typer.echo(
                f"serving index {ready['index_version']} at {running.url} (ready in {time.perf_counter() - t0:.1f} s); "
                f"API docs at {running.url}/docs. Ctrl-C stops.",
                err=True,
            )
            wait_for_interrupt()
        finally:
            typer.echo("stopping ...", err=True)
            running.shutdown()
            typer.echo("stopped", err=True)

    @app.command()
    def demo(
        port: Optional[int] = typer.Option(None, "--port", "-p", min=1, max=65535, help=f"HTTP port {setting_default('port')}"),
        host: Optional[str] = typer.Option(None, "--host", help=f"HTTP bind address {setting_default('host')}"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="QA model directory [default: SHARDQA_MODEL, the shipped model unless set]"),
        backend: Optional[Backend] = typer.Option(None, "--backend", "-b", help=f"torch, onnx or onnx-int8 {setting_default('backend')}"),
        shards: int = typer.Option(4, "--shards", min=1, help="shards to split the sample corpus into"),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="where the demo index lives [default: <cache_dir>/demo]"),
        exit_after_samples: bool = typer.Option(False, "--exit-after-samples", help="stop after the sample questions instead of serving on"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="show replica logs"),
    ) -> None:
        """Index the shipped sample corpus, serve it, answer sample questions."""
        from shardqa.services.demo import run_demo
        from shardqa.services.service_config import settings_with

        settings = settings_with(_serving_overrides(host=host, port=port))
        run_demo(
            host=settings.host,
            port=settings.port,
            overrides=_serving_overrides(model=model, backend=backend),
            shards=shards,
            workdir=workdir,
            serve_forever=not exit_after_samples,
            verbose=verbose,
            echo=lambda line: typer.echo(line),
        )

    @app.command()
    def query(
        question: str = typer.Argument(..., help="the question"),
        url: Optional[str] = typer.Option(None, "--url", "-u", help="service base URL [default: http://SHARDQA_HOST:SHARDQA_PORT]"),
        top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="answers to return"),
        as_json: bool = typer.Option(False, "--json", help="print the service's JSON response"),
        timeout: float = typer.Option(30.0, "--timeout", help="seconds to wait for the answer"),
    ) -> None:
        """Ask a running shardqa service a question."""
        import math

        from shardqa.cli import fail
        from shardqa.services.client import ask
        from shardqa.services.questions import check_question_text
        from shardqa.tokenization import not_unicode_at

        if not (timeout > 0 and math.isfinite(timeout)):
            raise fail(f"--timeout must be a positive number of seconds, not {timeout:g}")
        at = not_unicode_at(question)
        if at is not None:
            raise fail(f"the question is not valid Unicode text (a byte that is not UTF-8 at character {at})")

        # Named here, not as an unreachable service; the length limit is the
        # service's own (it may differ from this machine's settings).
        check_question_text(question, None)
        if url is None:
            from shardqa.config import get_settings

            s = get_settings()
            url = f"http://{s.host}:{s.port}"
        import httpx

        # The client is made before the clock starts: its set-up (TLS
        # context) costs tens of ms, which the service had no part in.
        with httpx.Client() as client:
            t0 = time.perf_counter()
            body = ask(url, question, top_k=top_k, timeout_s=timeout, client=client)
            ms = 1000 * (time.perf_counter() - t0)
        if as_json:
            typer.echo(json.dumps(body, ensure_ascii=False))
            return
        answers = body.get("answers", [])
        if not answers:
            typer.echo("no answer found")
        for i, a in enumerate(answers, 1):
            prefix = f"{i}. " if len(answers) > 1 else ""
            typer.echo(f"{prefix}{a['text']}")
            typer.echo(f"   score {a['score']:.4f} · {a['doc_id']} chars {a['start']}-{a['end']} · shard {a['shard']}")
        typer.echo(f"index {body.get('index_version')} · {'cached' if body.get('cached') else 'computed'} · {ms:.1f} ms round trip")
