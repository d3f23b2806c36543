"""BENCHMARKS.md, written from the result files of the last run.

Nothing in BENCHMARKS.md is typed by hand: `shardqa bench-all` runs every
benchmark, saves the results under ``benchmarks/results/`` and calls
``write_benchmarks_md``; `shardqa bench-report` re-renders the file from
those results without running anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shardqa.services import bench as B

RESULT_FILES = {"bench": "bench.json", "reader": "reader.json", "route": "route.json", "profile": "profile.json", "hop": "hop.json"}


def load_results(results_dir: Path) -> dict[str, Any]:
    """Every results file of a run; a broken or empty one is refused before
    any report is overwritten from it."""
    from shardqa.errors import one_line
    from shardqa.services.bench import BenchError

    out: dict[str, Any] = {}
    for key, name in RESULT_FILES.items():
        path = results_dir / name
        if path.exists():
            try:
                out[key] = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BenchError(f"{path}: not a results file ({one_line(exc, 200)})") from None
    if "bench" in out and not (isinstance(out["bench"], dict) and out["bench"].get("levels")):
        raise BenchError(f"{results_dir / RESULT_FILES['bench']}: holds no load levels; run `shardqa bench-all` first")
    return out


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def machine_table(machine: dict[str, Any]) -> str:
    v = machine.get("versions") or {}
    rows = [
        ("CPU", f"{machine.get('cpu')} — {machine.get('usable_cpus')} usable of {machine.get('logical_cpus')} logical CPUs"),
        ("GPU", machine.get("gpu") or "none"),
        ("memory", f"{machine.get('memory_gb')} GB"),
        ("OS", machine.get("os")),
        ("Python", machine.get("python")),
        ("libraries", ", ".join(f"{k} {val}" for k, val in v.items() if val)),
        ("load average (1/5/15 min) at start / end", f"{machine.get('loadavg_at_start')} / {machine.get('loadavg_at_end')}"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {val} |" for k, val in rows)])


def route_section(route: dict[str, Any] | None) -> list[str]:
    if not route:
        return ["_Not run in the last benchmark run._", ""]
    if route.get("error"):
        return [f"`shardqa eval-route` did not produce figures in the last run: `{route['error']}`", ""]
    data = route.get("result") or {}
    lines = []
    if route.get("command"):
        lines += ["```", route["command"], "```", ""]
    recall = data.get("recall") or {}
    base = (data.get("baseline") or {}).get("recall") or {}
    if recall:
        ks = sorted(recall, key=lambda k: int(k))
        lines += ["| retriever | " + " | ".join(f"recall@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        lines.append("| shardqa router | " + " | ".join(f"{float(recall[k]):.3f}" for k in ks) + " |")
        if base:
            lines.append("| BM25 baseline, same passages | " + " | ".join(
                f"{float(base[k]):.3f}" if k in base else "–" for k in ks) + " |")
        lines.append("")
    scalars = [(k, v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if scalars:
        lines += ["| measure | value |", "|---|---:|", *(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                      for k, v in scalars), ""]
    lines += ["<details><summary>Full <code>eval-route --json</code> output</summary>", "", "```json",
              json.dumps(data, indent=2), "```", "", "</details>", ""]
    return lines


def hop_section(hop: dict[str, Any] | None) -> list[str]:
    if not hop:
        return ["_One shard call's hop was not measured in the last run_ (`shardqa bench-all --ray-address`, which "
                "`benchmarks/run_all.sh` passes).", ""]
    if hop.get("error"):
        return [f"**The hop measurement failed:** `{hop['error']}`", ""]
    from shardqa.services.bench_hop import hop_table

    return [
        f"One call to a shard, {hop['calls']} timed calls per row after the HTTP levels, with the service otherwise idle "
        f"(`services/bench_hop.py`). The ingress makes at least one such call per uncached question, over Serve's "
        f"{hop.get('transport', 'actor')} transport (`shard_transport`); the difference "
        f"between the last two rows is what the call adds to a read ({hop['backend']}, the passages of shard "
        f"{hop['shard']} in turn; the answers of the two differed for {hop['answers_differing']} of them).",
        "",
        hop_table(hop),
        "",
    ]


def profile_section(bench: dict[str, Any] | None, profile: dict[str, Any] | None, md_dir: Path, results_dir: Path) -> list[str]:
    missed = [t for t in (bench or {}).get("targets", []) if t["met"] is False]
    if not missed:
        return ["Every measured target was met in the last run; no profile was needed.", ""]
    lines = ["Missed: " + "; ".join(t["target"] for t in missed) + ".", ""]
    if not profile:
        return lines + ["**No profile was taken in the last run** (`shardqa bench-all` needs `--profile-pid`, the "
                        "service's process id, which `benchmarks/run_all.sh` passes).", ""]
    if profile.get("error"):
        return lines + [f"**The profile failed:** `{profile['error']}`", ""]
    lines += [
        f"py-spy sampled the service's process tree (the serve process and its Ray workers) at {profile['rate']} Hz for "
        f"{profile['seconds']:.0f} s while the harness sent {profile['requests']} uncached questions at concurrency 1 "
        f"(p50 {B._fmt(profile.get('p50_ms'))} ms while profiled: the profiler's own cost is in that figure, "
        "which is why it is not a benchmark result). Raw stacks: "
        f"[`{_rel(results_dir / profile['raw'], md_dir)}`]({_rel(results_dir / profile['raw'], md_dir)}).",
        "",
    ]
    from shardqa.services.bench_profile import profile_table

    lines += [profile_table(profile["summary"]), ""]
    return lines


def render(results: dict[str, Any], md_dir: Path, results_dir: Path) -> str:
    bench = results.get("bench")
    reader = results.get("reader")
    meta = (bench or {}).get("meta", {})
    when = meta.get("started_at") or (reader or {}).get("started_at") or "unknown"
    parts = [
        "# Benchmarks",
        "",
        f"Written by `shardqa bench-all` from the results of its last run ({when}); "
        "the numbers are never edited by hand. `benchmarks/run_all.sh` re-runs everything (index, service, benchmarks, "
        "profile) and rewrites this file; `shardqa bench-report` re-renders it from `benchmarks/results/`.",
        "",
    ]
    if results.get("run"):
        parts += ["## Commands", "", "```", *results["run"].get("commands", []), "```", ""]

    parts += ["## Targets", ""]
    if bench and bench.get("targets"):
        missed = sum(1 for t in bench["targets"] if t["met"] is False)
        measured = sum(1 for t in bench["targets"] if t["met"] is not None)
        verdict = (f"**{missed} of {measured} measured targets missed.**" if missed
                   else f"All {measured} measured targets met.")
        parts += [verdict, "", B.targets_table(bench["targets"]), ""]
    else:
        parts += ["_No end-to-end run recorded._", ""]

    machine = (bench or {}).get("machine") or (reader or {}).get("machine")
    if machine:
        parts += ["## Machine", "", machine_table(machine), "",
                  "The load generator, the service (all its Ray replicas) and the baseline share this machine.", ""]

    parts += ["## End to end, over HTTP", ""]
    if bench:
        parts += [
            "Method: " + meta.get("client", "") + ". Every load level asks its own slice of distinct SQuAD questions "
            "(cold: first time asked; the service's `cached` flag is counted, so a level that was not really cold "
            "shows a non-zero hit ratio), then the same slice again (warm). Closed loop: `c` clients, each sending its "
            "next question when the previous answer arrives. Open loop: " + meta.get("arrivals", "") + ", latency from "
            "the scheduled send time. Percentiles: numpy linear interpolation over successful requests; failed "
            "requests count as errors and as empty answers in EM/F1 (official SQuAD v1.1 metric).",
            "",
        ]
        plot = results_dir / "bench.png"
        shown = {**bench, "meta": {k: v for k, v in meta.items() if k != "command"}}  # commands are listed once, above
        parts += [B.render_markdown(shown, plot_name=_rel(plot, md_dir) if plot.exists() else None).split("#### Targets")[0].rstrip(), ""]
        gold = bench.get("gold_paragraph")
        if gold:
            parts += [f"End-to-end F1 over all {gold['n']} uncached questions: **{B._fmt(bench.get('end_to_end_f1'))}**; "
                      f"the reader ({gold.get('backend')}) given each question's gold paragraph: **{B._fmt(gold['f1'])}** "
                      f"(EM {B._fmt(gold['exact_match'])}).", ""]
    else:
        parts += ["_Not run._", ""]

    parts += ["## Reader only, per backend", ""]
    if reader:
        from shardqa.services.bench_reader import reader_table

        parts += [
            f"`{reader['model']}`, one question against one pre-tokenised passage of exactly N tokens, "
            f"{reader['runs']} timed calls per cell (backends interleaved in blocks of 10), in-process, "
            f"max_seq_len {reader['max_seq_len']}, doc_stride {reader['doc_stride']}, "
            f"threads {reader['threads'] or 'library default'}. Gold-paragraph EM/F1: each backend given the question's "
            "own paragraph.",
            "",
        ]
        if reader.get("command") and reader["command"] not in (results.get("run") or {}).get("commands", []):
            parts += ["```", reader["command"], "```", ""]
        parts += [reader_table(reader), ""]
        plot = results_dir / "reader.png"
        if plot.exists():
            parts += [f"![reader latency vs passage length]({_rel(plot, md_dir)})", ""]
    else:
        parts += ["_Not run._", ""]

    parts += ["## Routing (`shardqa eval-route`)", ""]
    parts += route_section(results.get("route"))

    parts += ["## Where the time goes", ""]
    parts += hop_section(results.get("hop"))
    parts += profile_section(bench, results.get("profile"), md_dir, results_dir)
    return "\n".join(parts).rstrip() + "\n"


def write_benchmarks_md(results_dir: Path, md_path: Path, run: dict[str, Any] | None = None) -> Path:
    results = load_results(results_dir)
    run_file = results_dir / "run.json"
    if run is not None:
        run_file.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    if run_file.exists():
        results["run"] = json.loads(run_file.read_text(encoding="utf-8"))
    md_path.write_text(render(results, md_path.parent.resolve(), results_dir.resolve()), encoding="utf-8")
    return md_path
