"""`shardqa bench`, `shardqa bench-reader` and `shardqa bench-all`."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

from shardqa.cli_options import finite
from shardqa.config import setting_default


def _results_dir(path: Path, what: str = "--out") -> Path:
    """`path`, made now: a run's figures must not be lost at the end to a
    folder that cannot be written."""
    from shardqa.services.bench import BenchError

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".shardqa-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _floats(text: str, what: str) -> tuple[float, ...]:
    from shardqa.services.bench import BenchError

    text = (text or "").strip()
    if not text:
        return ()
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v < math.inf for v in vals):  # also NaN
        raise BenchError(f"{what}: values must be positive and finite, got {text!r}")
    return vals


def _ints(text: str, what: str) -> tuple[int, ...]:
    from shardqa.services.bench import BenchError

    vals = _floats(text, what)
    if any(v != int(v) for v in vals):
        raise BenchError(f"{what}: expected whole numbers, got {text!r}")
    return tuple(int(v) for v in vals)


def default_questions_file() -> Path:
    """SQuAD v1.1 dev, fetched into the cache directory on first use."""
    from shardqa.config import get_settings
    from shardqa.training.squad import fetch_squad

    dest = get_settings().cache_dir / "squad"
    path = dest / "dev-v1.1.json"
    if not path.exists():
        typer.echo(f"fetching SQuAD v1.1 into {dest} ...", err=True)
        fetch_squad(dest)
    return path


def model_name(model_dir: Path) -> str:
    """The id a model directory reports (its shardqa.json card, else its folder name),
    as the service reports it in GET /v1/index."""
    card = model_dir / "shardqa.json"
    if card.exists():
        try:
            return str(json.loads(card.read_text()).get("model_id") or model_dir.name)
        except (ValueError, OSError):
            pass
    return model_dir.name


def resolve_baseline_model(model: Optional[str], service_index: dict | None) -> str:
    """--model, else the model the service reports when it is a local directory,
    else the configured default model if it is the one the service runs."""
    from shardqa.config import get_settings
    from shardqa.errors import ModelNotFound

    if model:
        return model
    reported = (service_index or {}).get("model")
    if reported and Path(reported).is_dir():
        return str(reported)
    default = Path(get_settings().model)
    if not default.is_dir():
        raise ModelNotFound(f"no model for the baseline: the default {default} does not exist; pass --model")
    if reported and model_name(default) != Path(reported).name:
        raise ModelNotFound(
            f"the service runs model {reported!r} but the default model here is {model_name(default)!r}; "
            "pass --model with the service's model directory so the baseline uses the same model"
        )
    return str(default)


def _last_message(text: str) -> str:
    """The last line of a command's error output that says something, with
    the frame characters of rich's boxes taken off."""
    for line in reversed(text.splitlines()):
        line = line.strip().strip("│╭╮╰╯─ ").strip()
        if any(ch.isalnum() for ch in line):
            return line
    return ""


def _shown_arg(arg: str) -> str:
    """An argument as the report shows it: paths shortened, quoted when needed
    (a leading ``~/`` stays unquoted so the line still works in a shell)."""
    from shardqa.services.bench import display_path

    shown = display_path(arg)
    if shown.startswith("~/") and shlex.quote(shown[2:]) == shown[2:]:
        return shown
    return shlex.quote(shown)


def command_line() -> str:
    """This command as typed, with paths shown relative to the repository or home."""
    argv, args = [], iter(sys.argv[1:])
    for a in args:
        if a == "--setup-command":  # the setup commands are listed on their own
            next(args, None)
        elif a == "--profile-pid":
            next(args, None)
            argv += [a, "PID"]  # the service's process id means nothing to a reader
        elif a.startswith("--profile-pid="):
            argv.append("--profile-pid=PID")
        elif not a.startswith("--setup-command="):
            argv.append(a)
    name = Path(sys.argv[0]).name if sys.argv else "shardqa"
    if name in ("__main__.py", "cli.py"):
        name = "shardqa"
    return " ".join([name, *(_shown_arg(a) for a in argv)])


def run_bench(
    url: str,
    questions_file: Path,
    *,
    limit: int,
    concurrency: tuple[int, ...],
    rates: tuple[float, ...],
    top_k: int = 1,
    seed: int = 0,
    warmup: int = 5,
    warm: bool = True,
    timeout_s: float = 30.0,
    ready_timeout_s: float = 60.0,
    baseline: bool = True,
    baseline_limit: int | None = None,
    model: str | None = None,
    corpus_file: Path | None = None,
    service_pid: int | None = None,
    log=None,
) -> tuple[dict[str, Any], list, set[str]]:
    """The whole end-to-end benchmark. Returns the result object, the questions
    the cold levels asked (for scoring the reader on the same ones), and the
    normal forms of every question asked (so a later pass can stay cold)."""
    import asyncio

    from shardqa.services import bench as B
    from shardqa.services.bench import display_path
    from shardqa.training.squad import load_squad

    log = log or B._log
    examples = load_squad(questions_file)
    plan = B.LoadPlan(concurrency=concurrency, rates=rates, per_level=limit, warmup=warmup, top_k=top_k, seed=seed,
                      timeout_s=timeout_s, warm=warm)
    machine = B.machine_description()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    if not concurrency and not rates:
        raise B.BenchError(B.NO_LEVELS)
    log(f"bench: {url}, {len(concurrency) + len(rates)} load levels x {limit} questions, cold{' + warm' if warm else ''}")
    alive = (lambda: B.process_alive(service_pid)) if service_pid else None
    levels, info, qplan, raw = asyncio.run(B.run_levels(url, examples, plan, ready_timeout_s=ready_timeout_s, log=log, alive=alive))
    for lv in levels:
        if lv["cache"] == "cold" and (lv["cache_hit_ratio"] or 0) > 0:
            log(f"warning: {B.describe_level(lv).split()[0]} cold level had a cache hit ratio of {lv['cache_hit_ratio']}: "
                "the service's cache already held some of these answers (restart the service or pass another --seed)")

    result: dict[str, Any] = {"levels": levels, "baseline": None, "speedup_p50": None, "speedup_p99": None}
    if baseline:
        from shardqa.services.baseline import NaiveBaseline, corpus_paragraphs, run_baseline
        from shardqa.training.squad import squad_scores

        ref = B.reference_level(levels)
        ref_i = levels.index(ref) if ref else 0
        ref_questions, ref_samples = raw[ref_i]
        n = min(baseline_limit or len(ref_questions), len(ref_questions))
        same = ref_questions[:n]
        model_id = resolve_baseline_model(model, info.get("index"))
        corpus_examples = load_squad(corpus_file) if corpus_file else examples
        log(f"baseline: loading {model_id} and indexing the corpus with bm25s ...")
        naive = NaiveBaseline(model_id, corpus_paragraphs(corpus_examples))
        log(f"baseline: {n} questions, one at a time, in-process")
        base = run_baseline(naive, same)
        base.pop("predictions")
        base["model"] = display_path(base["model"])
        svc_preds = {s.qid: (s.text or "") for s in ref_samples if s.ok}
        svc = squad_scores(svc_preds, list(same))
        base["service_f1_same_questions"] = round(svc["f1"], 3)
        base["service_em_same_questions"] = round(svc["exact_match"], 3)
        base["questions_from"] = B.describe_level(ref).split()[0] if ref else None
        result["baseline"] = base
        result.update(B.speedups(levels, base))
        log(f"baseline: p50={base['p50_ms']:.1f} ms p99={base['p99_ms']:.1f} ms F1={base['f1']:.1f} "
            f"(shardqa F1 on the same questions {base['service_f1_same_questions']:.1f}); speedup p50 {result['speedup_p50']}")
    result["end_to_end_f1"] = B.end_to_end_f1(levels)
    result["floor"] = info.get("floor")
    result["service"] = {"url": url, "index": info.get("index")}
    result["meta"] = {
        "command": command_line(),
        "started_at": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "questions_file": questions_file.name,
        "distinct_questions_used": sum(len(s) for s in qplan.slices) + len(qplan.warmup),
        "per_level": limit,
        "concurrency": list(concurrency),
        "rates": list(rates),
        "top_k": top_k,
        "seed": seed,
        "warmup": warmup,
        "client": "asyncio + httpx, one process on the same machine as the service; latency measured per request "
                  "from the client (open loop: from the scheduled send time)",
        "arrivals": "requests evenly spaced at 1/rate",
    }
    machine["loadavg_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    result["machine"] = machine
    result["targets"] = B.evaluate_targets(result)
    cold_questions = [q for lv, (qs, _) in zip(levels, raw) if lv["cache"] == "cold" for q in qs]
    asked = {B.question_key(q.question) for q in [*qplan.warmup, *cold_questions]}
    return result, cold_questions, asked


def _reference_settings(store: str, model_dir: str, backend: str, threads: int | None = None):
    """The service's index, model and backend (and, given, its replicas'
    model threads), for work the benchmark does in its own process; no index
    refresh during the run."""
    from shardqa.services.service_config import settings_with

    return settings_with({"store": store, "model": str(model_dir), "backend": backend, "index_refresh_s": 3600,
                          "threads": threads})


def run_one_process(result: dict[str, Any], cold_questions: list, per_level: int, store: str, model_dir: str, backend: str,
                    threads: int | None = None) -> dict[str, Any]:
    """`shardqa eval-answers` over the reference level's questions (the cold
    levels ask ``per_level`` questions each, in order). Never fatal: a
    failure is reported in place of the figures."""
    from shardqa.services import bench as B
    from shardqa.services.evaluate import evaluate_answers

    ref = B.reference_level(result["levels"])  # always an uncached level, when there is one
    if ref is None:
        return {"error": "no uncached level to compare with"}
    i = [lv for lv in result["levels"] if lv["cache"] == "cold"].index(ref)
    questions = cold_questions[i * per_level : (i + 1) * per_level]
    try:
        settings = _reference_settings(store, model_dir, backend, threads)
        B._log(f"one process: shardqa eval-answers over the {len(questions)} questions of {B._load(ref)}")
        ev = evaluate_answers(settings, questions, progress=False).to_json()
    except Exception as exc:  # reported, never fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {**ev, "questions_from": B._load(ref), "backend": backend,
            "threads": settings.threads or "library default"}


def run_hop(ray_address: str, store: str, model_dir: str, backend: str, calls: int, threads: int | None = None) -> dict[str, Any]:
    """`bench_hop.measure_hops` on the service's cluster. Never fatal: a
    failure is reported in place of the figures."""
    from shardqa.services import bench as B
    from shardqa.services.bench_hop import measure_hops

    try:
        B._log(f"hop: {calls} calls per row to shard 0 over Ray at {ray_address}")
        return measure_hops(_reference_settings(store, model_dir, backend, threads), ray_address=ray_address, calls=calls)
    except Exception as exc:  # reported, never fatal
        return {"error": f"{type(exc).__name__}: {exc}"}


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        url: str = typer.Option("http://127.0.0.1:8000", "--url", help="base URL of a running shardqa service"),
        questions: Optional[Path] = typer.Option(None, "--questions", help="SQuAD-format JSON with gold answers [default: SQuAD v1.1 dev]"),
        limit: int = typer.Option(200, "--limit", min=1, help="distinct questions per load level"),
        concurrency: str = typer.Option("1,4,16", "--concurrency", help="closed-loop concurrency levels, comma-separated"),
        rates: str = typer.Option("", "--rates", help="open-loop request rates per second, comma-separated (e.g. 20,40,60)"),
        top_k: int = typer.Option(1, "--top-k", min=1, help="top_k sent with every question"),
        seed: int = typer.Option(0, "--seed", help="question shuffle seed; change it to get questions the service has not cached"),
        warmup: int = typer.Option(5, "--warmup", min=0, help="unmeasured warm-up questions (never reused)"),
        warm: bool = typer.Option(True, "--warm/--no-warm", help="replay each level's questions for a warm (cached) run"),
        baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="run the naive BM25 + torch baseline in the same run"),
        baseline_limit: Optional[int] = typer.Option(None, "--baseline-limit", min=1, help="questions for the baseline [default: --limit]"),
        model: Optional[str] = typer.Option(None, "--model", help="model for the baseline [default: the service's model]"),
        corpus: Optional[Path] = typer.Option(None, "--corpus", help="SQuAD-format JSON whose paragraphs the baseline searches [default: --questions]"),
        timeout: float = typer.Option(30.0, "--timeout", min=0.1, callback=finite, help="per-request timeout, seconds"),
        ready_timeout: float = typer.Option(60.0, "--ready-timeout", min=0, callback=finite, help="wait this long for /readyz"),
        out: Path = typer.Option(Path("benchmarks/results"), "--out", help="directory for bench.json, bench.md, bench.png"),
        as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    ) -> None:
        """Drive a running service over HTTP: latency, throughput, cache hits and EM/F1 per load level, cold and warm, against the naive baseline."""
        from shardqa.services import bench as B

        from shardqa.services.client import service_url

        url = service_url(url)
        conc = _ints(concurrency, "--concurrency")
        rts = _floats(rates, "--rates")
        _results_dir(out)
        qfile = questions or default_questions_file()
        result, _, _ = run_bench(url, qfile, limit=limit, concurrency=conc, rates=rts, top_k=top_k, seed=seed, warmup=warmup,
                           warm=warm, timeout_s=timeout, ready_timeout_s=ready_timeout, baseline=baseline,
                           baseline_limit=baseline_limit, model=model, corpus_file=corpus)
        paths = B.write_reports(result, out)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            typer.echo(B.levels_table(result["levels"]))
            typer.echo("")
            typer.echo(B.baseline_table(result))
            typer.echo("")
            typer.echo(B.targets_table(result["targets"]))
            typer.echo("")
            typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))

    @app.command("bench-reader")
    def bench_reader(
        model: Optional[str] = typer.Option(None, "--model", help="QA model directory [default: SHARDQA_MODEL, the shipped model unless set]"),
        backends: str = typer.Option("torch,onnx,onnx-int8", "--backends", help="backends, comma-separated"),
        lengths: str = typer.Option("32,64,128,256,384", "--lengths", help="passage lengths in tokens, comma-separated"),
        runs: int = typer.Option(200, "--runs", min=1, help="timed calls per backend and length"),
        questions: Optional[Path] = typer.Option(None, "--questions", help="SQuAD-format JSON [default: SQuAD v1.1 dev]"),
        f1_questions: int = typer.Option(200, "--f1-questions", min=0, help="questions for the gold-paragraph EM/F1 per backend (0: skip)"),
        threads: Optional[int] = typer.Option(None, "--threads", min=0, max=256, help="intra-op threads per backend [default: SHARDQA_THREADS]"),
        out: Path = typer.Option(Path("benchmarks/results"), "--out", help="directory for reader.json, reader.md, reader.png"),
        as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    ) -> None:
        """Reader-only latency per backend and passage length (median, p99), and gold-paragraph EM/F1 per backend."""
        from shardqa.services import bench as B
        from shardqa.services import bench_reader as R
        from shardqa.training.squad import load_squad

        names = tuple(b.strip() for b in backends.split(",") if b.strip())
        bad = [b for b in names if b not in R.BACKENDS]
        if bad or not names:
            raise B.BenchError(f"--backends: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(R.BACKENDS)}")
        lens = _ints(lengths, "--lengths")
        _results_dir(out)
        examples = load_squad(questions or default_questions_file())
        f1_ex = B.distinct_questions(examples)[:f1_questions] if f1_questions else None
        result = R.run_reader_bench(model, names, lens, runs, examples, f1_examples=f1_ex, threads=threads, log=B._log)
        result["command"] = command_line()
        result["machine"] = B.machine_description()
        out.mkdir(parents=True, exist_ok=True)
        (out / "reader.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "reader.md").write_text(R.reader_table(result) + "\n", encoding="utf-8")
        R.plot_reader(result, out / "reader.png")
        if as_json:
            typer.echo(json.dumps(result))
        else:
            typer.echo(R.reader_table(result))
            typer.echo(f"\nwrote {out / 'reader.json'}, {out / 'reader.md'}, {out / 'reader.png'}")

    @app.command("bench-all")
    def bench_all(
        url: str = typer.Option("http://127.0.0.1:8000", "--url", help="base URL of the running service to benchmark"),
        questions: Optional[Path] = typer.Option(None, "--questions", help="SQuAD-format JSON [default: SQuAD v1.1 dev]"),
        store: Optional[str] = typer.Option(None, "--store", help=f"the service's index store, for `shardqa eval-route` {setting_default('store')}"),
        limit: int = typer.Option(200, "--limit", min=1, help="distinct questions per load level"),
        # 2 as well: on a small machine the p99 <= 100 ms bound of the
        # throughput target falls between 1 and 4.
        concurrency: str = typer.Option("1,2,4,16", "--concurrency", help="closed-loop concurrency levels"),
        rates: str = typer.Option("20,40,60", "--rates", help="open-loop request rates per second"),
        seed: int = typer.Option(0, "--seed", help="question shuffle seed"),
        baseline_limit: Optional[int] = typer.Option(None, "--baseline-limit", min=1, help="questions for the naive baseline [default: --limit]"),
        model: Optional[str] = typer.Option(None, "--model", help="the service's model directory [default: as the service reports, else SHARDQA_MODEL]"),
        backend: Optional[str] = typer.Option(None, "--backend", help=f"the service's backend, for the gold-paragraph F1 {setting_default('backend')}"),
        reader_runs: int = typer.Option(200, "--reader-runs", min=1, help="timed reader calls per backend and length"),
        threads: Optional[int] = typer.Option(None, "--threads", min=0, max=256,
                                              help="model threads of the runs in this process (one-process answers, the hop's "
                                                   "in-process read, reader per backend); give the service's replicas' count to "
                                                   "compare like with like [default: SHARDQA_THREADS, else the library default]"),
        reader_lengths: str = typer.Option("32,64,128,256,384", "--reader-lengths", help="passage lengths for the reader benchmark"),
        reader_backends: str = typer.Option("torch,onnx,onnx-int8", "--reader-backends", help="backends for the reader benchmark"),
        route: bool = typer.Option(True, "--route/--no-route", help="run `shardqa eval-route --json`"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="the service's Ray cluster (`auto`: the one on this machine): also measure one shard call's hop (Serve handle vs bare Ray vs in-process read)"),
        hop_calls: int = typer.Option(200, "--hop-calls", min=1, help="timed calls per row of the hop measurement"),
        profile_pid: Optional[int] = typer.Option(None, "--profile-pid", help="the service's process id: py-spy profiles it when a target is missed"),
        profile_seconds: float = typer.Option(20.0, "--profile-seconds", min=1, callback=finite, help="how long to profile"),
        ready_timeout: float = typer.Option(300.0, "--ready-timeout", min=0, callback=finite, help="wait this long for the service's /readyz"),
        setup_command: Optional[list[str]] = typer.Option(None, "--setup-command", help="a command that prepared this run (index, serve), listed in BENCHMARKS.md; repeatable"),
        out: Optional[Path] = typer.Option(None, "--out", help="results directory [default: <repo>/benchmarks/results]"),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="the report to write [default: <repo>/BENCHMARKS.md]"),
        as_json: bool = typer.Option(False, "--json", help="print the end-to-end result as one JSON object"),
    ) -> None:
        """Run every benchmark (end to end with the baseline, reader per backend, routing, a profile when a target is missed) and write BENCHMARKS.md."""
        import asyncio
        import subprocess

        from shardqa.config import REPO_ROOT, get_settings
        from shardqa.services import bench as B
        from shardqa.services import bench_profile as P
        from shardqa.services import bench_reader as R
        from shardqa.services.bench_report import write_benchmarks_md
        from shardqa.training.squad import load_squad

        st = get_settings()
        out = out or REPO_ROOT / "benchmarks" / "results"
        markdown = markdown or REPO_ROOT / "BENCHMARKS.md"
        _results_dir(out)
        names = tuple(b.strip() for b in reader_backends.split(",") if b.strip())
        bad = [b for b in names if b not in R.BACKENDS]
        if bad:
            raise B.BenchError(f"--reader-backends: unknown {', '.join(bad)}; choose from {', '.join(R.BACKENDS)}")
        gold_backend = backend or st.backend
        if gold_backend not in R.BACKENDS:
            raise B.BenchError(f"--backend: unknown {gold_backend}; choose from {', '.join(R.BACKENDS)}")
        # Every argument is checked before anything runs or is deleted.
        from shardqa.services.client import service_url

        url = service_url(url)
        levels, load_rates, lengths = _ints(concurrency, "--concurrency"), _floats(rates, "--rates"), _ints(reader_lengths, "--reader-lengths")
        if profile_pid is not None and profile_pid <= 0:
            raise B.BenchError(f"--profile-pid: expected a process id, got {profile_pid}")
        qfile = questions or default_questions_file()
        run_info: dict[str, Any] = {"commands": [*(setup_command or []), command_line()]}

        # 1. End to end over HTTP, with the naive baseline.
        result, cold_questions, asked = run_bench(
            url, qfile, limit=limit, concurrency=levels, rates=load_rates,
            seed=seed, baseline_limit=baseline_limit, model=model, ready_timeout_s=ready_timeout, service_pid=profile_pid)
        model_dir = resolve_baseline_model(model, (result.get("service") or {}).get("index"))
        # Only now that this run has figures of its own: never report a
        # figure this run did not produce, and never lose the last run's to a
        # run that failed to start.
        for stale in ("profile.json", "route.json", "hop.json"):
            (out / stale).unlink(missing_ok=True)

        # 1b. The reference level's questions in one process: the model's share.
        result["one_process"] = run_one_process(result, cold_questions, limit, store or st.store, model_dir, gold_backend, threads)

        # 2. Reader only, per backend; gold-paragraph F1 on the same uncached questions.
        examples = load_squad(qfile)
        reader = R.run_reader_bench(model_dir, names if gold_backend in names else (*names, gold_backend),
                                    lengths, reader_runs, examples,
                                    f1_examples=cold_questions, threads=threads, log=B._log)
        reader["command"] = command_line()
        reader["started_at"] = result["meta"]["started_at"]
        reader["machine"] = result["machine"]
        (out / "reader.json").write_text(json.dumps(reader, indent=2) + "\n", encoding="utf-8")
        (out / "reader.md").write_text(R.reader_table(reader) + "\n", encoding="utf-8")
        R.plot_reader(reader, out / "reader.png")
        result["gold_paragraph"] = {"backend": gold_backend, **reader["gold_paragraph"][gold_backend]}
        result["targets"] = B.evaluate_targets(result)

        # 3. Routing figures.
        if route:
            cmd = [sys.executable, "-m", "shardqa.cli", "eval-route", str(qfile), "--store", store or st.store, "--json"]
            shown = "shardqa eval-route " + " ".join(_shown_arg(a) for a in cmd[4:])
            run_info["commands"].append(shown)
            B._log(f"routing: {shown}")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                try:
                    route_obj = {"command": shown, "result": json.loads(proc.stdout)}
                except ValueError:
                    route_obj = {"command": shown, "error": "output was not one JSON object"}
            else:
                route_obj = {"command": shown, "error": _last_message(proc.stderr) or f"exit {proc.returncode}"}
            (out / "route.json").write_text(json.dumps(route_obj, indent=2) + "\n", encoding="utf-8")

        # 4. What one call to a shard costs beyond its read, with the service idle.
        if ray_address:
            (out / "hop.json").write_text(json.dumps(run_hop(ray_address, store or st.store, model_dir, gold_backend, hop_calls, threads),
                                                     indent=2) + "\n", encoding="utf-8")

        # 5. A profile of the service when a target was missed.
        if any(t["met"] is False for t in result["targets"]) and profile_pid:
            fresh = [q for q in B.distinct_questions(examples) if B.question_key(q.question) not in asked]
            import random

            random.Random(seed + 1).shuffle(fresh)
            raw_path = out / "profile.txt"
            profile: dict[str, Any] = {"pid_profiled": True, "rate": 50, "seconds": profile_seconds, "raw": raw_path.name}
            try:
                B._log(f"profile: py-spy on the service's process tree for {profile_seconds:.0f} s under uncached load")
                rec = P.start_recording(profile_pid, profile_seconds, raw_path, rate=profile["rate"])
                time.sleep(2.0)  # py-spy attaches to every process first
                # Keep the load on past the recording window: py-spy's start-up
                # (reading each process's interpreter state) eats into it.
                samples = asyncio.run(B.drive_for(url, fresh, profile_seconds + 5.0))
                rec_out, _ = rec.communicate(timeout=profile_seconds + 120)
                if rec.returncode != 0 or not raw_path.exists():
                    raise RuntimeError((rec_out or "").strip().splitlines()[-1] if rec_out else f"py-spy exit {rec.returncode}")
                ok = [s for s in samples if s.ok]
                raw_path.write_text(P.sanitize_collapsed(raw_path.read_text(errors="replace")), encoding="utf-8")
                profile.update({"requests": len(samples), "p50_ms": B.latency_stats([s.latency_s for s in ok])["p50_ms"],
                                "summary": P.summarize(P.parse_collapsed(raw_path.read_text(encoding="utf-8")))})
            except Exception as exc:  # a failed profile is reported, never fatal
                profile["error"] = f"{type(exc).__name__}: {exc}"
            (out / "profile.json").write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")

        paths = B.write_reports(result, out)
        md = write_benchmarks_md(out, markdown, run_info)
        B._log(f"wrote {', '.join(str(p) for p in paths.values())}, {out / 'reader.json'} and {md}")
        if as_json:
            typer.echo(json.dumps(result))
        else:
            typer.echo(B.targets_table(result["targets"]))

    @app.command("bench-report")
    def bench_report(
        out: Optional[Path] = typer.Option(None, "--out", help="results directory [default: <repo>/benchmarks/results]"),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="the report to write [default: <repo>/BENCHMARKS.md]"),
    ) -> None:
        """Re-render BENCHMARKS.md from the saved results of the last `shardqa bench-all` run (runs nothing)."""
        from shardqa.config import REPO_ROOT
        from shardqa.services.bench import BenchError
        from shardqa.services.bench_report import write_benchmarks_md

        out = out or REPO_ROOT / "benchmarks" / "results"
        if not (out / "bench.json").exists() and not (out / "reader.json").exists():
            raise BenchError(f"no results in {out}: run `shardqa bench-all` first")
        target = markdown or REPO_ROOT / "BENCHMARKS.md"
        if target.is_dir() or not target.parent.is_dir():
            raise BenchError(f"--markdown {target}: not a file in an existing folder")
        try:
            written = write_benchmarks_md(out, target)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            # A hand-edited or older-version result file: say which folder,
            # not a traceback (a JSONDecodeError is a ValueError).
            raise BenchError(f"the results in {out} are not what `shardqa bench-all` writes "
                             f"({type(exc).__name__}: {exc}); run it again") from None
        typer.echo(f"wrote {written}")
