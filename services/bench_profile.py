"""Where the time goes: a py-spy profile of the running service under load.

`shardqa bench-all --profile-pid PID` samples the service's process tree
(the `shardqa serve` process and, with ``--subprocesses``, the embedded Ray's
replicas under it) with py-spy while the harness sends uncached questions,
then reduces py-spy's collapsed stacks to tables: busy samples per process,
the functions that are on CPU themselves (self time), and the project's own
functions by inclusive time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_RECORD = re.compile(r"(.*?) (\d+)\n", re.S)
_LINE = re.compile(r":\d+\)$")
#: Folders that hold the project's own code (py-spy shows paths relative to
#: the working directory when it can, absolute otherwise).
OWN_DIRS = frozenset({"services", "router", "preprocessing", "monitoring", "shardqa", "training"})


def py_spy() -> str | None:
    """The py-spy executable: next to this Python first (a venv), then on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("py-spy")


def start_recording(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen:
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--duration", str(max(1, int(round(seconds)))),
           "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking"]
    # On-CPU only: with idle threads included, the dozens of threads Ray keeps
    # waiting in every process filled the tables and hid the work. Waiting
    # (handle hops, queues) shows in the benchmark's stage table instead.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


_PROCESS_START = re.compile(r'process \d+:"')
_PROCESS_FRAME = re.compile(r'process (\d+):"(.*)"$', re.S)
_NEXT_FRAME = re.compile(r'process \d+:"|[^;]* \([^;]*\)(;|$)', re.S)


def split_stack(stack: str) -> list[str]:
    """Frames of one stack. Process frames (``process PID:"cmdline"``) come
    first and their command lines may hold ``;`` and newlines, so each ends at
    the first ``";`` followed by another process frame or a ``func (file:line)``."""
    frames = []
    rest = stack
    while _PROCESS_START.match(rest):
        pos = 0
        while True:
            end = rest.find('";', pos)
            if end < 0:
                return [*frames, rest]
            if _NEXT_FRAME.match(rest, end + 2):
                frames.append(rest[: end + 1])
                rest = rest[end + 2 :]
                break
            pos = end + 1
    return frames + (rest.split(";") if rest else [])


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy raw output: one record per stack, ``frame;frame;... count``."""
    if text and not text.endswith("\n"):
        text += "\n"
    return [(split_stack(m.group(1)), int(m.group(2))) for m in _RECORD.finditer(text) if m.group(1)]


def _is_process(frame: str) -> bool:
    return frame.startswith("process ")


def _short_command(cmdline: str) -> str:
    """A process's command line without machine details (paths, addresses,
    session folders): its executable or script by name, then its first few
    arguments that are not options."""
    words, module = [], False
    for tok in cmdline.split():
        if tok == "-m" and len(words) == 1:
            module = True  # python -m package.module names the program
        elif tok.startswith("-"):
            break  # options carry socket paths, node IPs and session names
        elif module:
            words.append(f"-m {tok}")
            module = False
        else:
            words.append(Path(tok).name if "/" in tok else tok)
    cmd = " ".join(words)
    return f"{cmd[:70]}{'…' if len(cmd) > 70 else ''}"


def _process_label(frame: str) -> str:
    m = _PROCESS_FRAME.match(frame)
    if not m:
        return frame
    return f"{m.group(1)}: {_short_command(m.group(2))}"


def sanitize_collapsed(text: str) -> str:
    """py-spy's raw output with each process frame's command line shortened
    (``_short_command``): the saved profile is published with the results."""
    lines = []
    for stack, n in parse_collapsed(text):
        frames = []
        for f in stack:
            m = _PROCESS_FRAME.match(f)
            frames.append(f'process {m.group(1)}:"{_short_command(m.group(2))}"' if m else f)
        lines.append(f"{';'.join(frames)} {n}")
    return "\n".join(lines) + ("\n" if lines else "")


def _strip(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``: one row per function."""
    frame = _LINE.sub(")", frame)
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def _own(frame: str) -> bool:
    m = re.match(r".* \((.*)\)$", frame)
    if not m:
        return False
    parts = Path(m.group(1)).parts[:-1]
    return bool(OWN_DIRS.intersection(parts)) and "site-packages" not in parts and "dist-packages" not in parts


def summarize(records: list[tuple[list[str], int]], top: int = 15) -> dict[str, Any]:
    total = sum(n for _, n in records)
    by_process: Counter = Counter()
    self_time: Counter = Counter()
    own_inclusive: Counter = Counter()
    for frames, n in records:
        procs = [f for f in frames if _is_process(f)]
        code = [f for f in frames if not _is_process(f)]
        by_process[_process_label(procs[-1]) if procs else "(this process)"] += n
        if code:
            self_time[_strip(code[-1])] += n
        for f in {_strip(f) for f in code if _own(f)}:
            own_inclusive[f] += n

    def rows(counter: Counter) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "share": round(v / total, 4) if total else 0.0} for k, v in counter.most_common(top)]

    return {"samples": total, "processes": rows(by_process), "self": rows(self_time), "own_inclusive": rows(own_inclusive)}


def profile_table(summary: dict[str, Any]) -> str:
    def table(title: str, key: str) -> list[str]:
        out = [f"**{title}**", "", "| share of busy samples | samples | |", "|---:|---:|---|"]
        for r in summary[key]:
            frame = r["frame"].replace("|", "\\|")
            out.append(f"| {100 * r['share']:.1f}% | {r['samples']} | `{frame}` |")
        return out + [""]

    lines = [f"{summary['samples']} busy samples (threads py-spy judged idle excluded). Ray's own loops "
             "(`Worker.main_loop`, `Thread.run`, selector waits) block inside native code, which py-spy cannot always "
             "tell from work, so their share is an upper bound on their cost.", ""]
    lines += table("shardqa's own functions, inclusive time", "own_inclusive")
    lines += table("By process", "processes")
    lines += table("Self time (the innermost Python function)", "self")
    return "\n".join(lines)
