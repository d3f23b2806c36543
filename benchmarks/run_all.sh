#!/usr/bin/env bash
# Re-run every benchmark on this machine and rewrite BENCHMARKS.md.
#
#   benchmarks/run_all.sh                  # SQuAD v1.1 dev, 4 shards, the shipped model, full sizes
#   LIMIT=30 READER_RUNS=50 benchmarks/run_all.sh   # a quick run
#   benchmarks/run_all.sh --rates 20,40     # extra arguments go to `shardqa bench-all`
#
# Steps: fetch SQuAD v1.1 dev when missing; index its paragraphs into a fresh
# index version ($STORE, $SHARDS shards); start `shardqa serve` on a free
# loopback port (embedded Ray, in-process answer cache unless CACHE_URL is
# set); run `shardqa bench-all` against it (end to end with the naive
# baseline, reader per backend, eval-route, one shard call's hop over the
# service's Ray cluster, and a py-spy profile of the service when a target is
# missed); stop the service. BENCHMARKS.md and
# benchmarks/results/ are written by bench-all, never by hand.
#
# Environment: PYTHON (default .venv/bin/python), MODEL, BACKEND, SHARDS (4), NUM_CPUS (2), FAST_INGRESS (true),
# STORE (benchmarks/work/index), CACHE_URL, LIMIT, READER_RUNS, PORT,
# REINDEX (1: build a new index version first; 0: serve the current one).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
SHARDS="${SHARDS:-4}"
STORE="${STORE:-benchmarks/work/index}"
REINDEX="${REINDEX:-1}"
mkdir -p benchmarks/work

shardqa() { "$PY" -m shardqa.cli "$@"; }
quote() { printf '%q ' "$@" | sed 's/ $//'; }

SQUAD="${SQUAD:-$("$PY" -c 'from shardqa.services.bench_cli import default_questions_file; print(default_questions_file())')}"
PORT="${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
SQUAD_SHOWN="${SQUAD/#$HOME/\~}"
setup=(--setup-command "benchmarks/run_all.sh${*:+ $*}")

index_args=(index "$SQUAD" --store "$STORE" --shards "$SHARDS" --quiet)
[[ -n "${MODEL:-}" ]] && index_args+=(--model "$MODEL")
if [[ "$REINDEX" == "1" ]]; then
  echo "== shardqa ${index_args[*]}" >&2
  shardqa "${index_args[@]}"
  setup+=(--setup-command "shardqa $(quote "${index_args[@]}" | sed "s|$SQUAD|$SQUAD_SHOWN|")")
fi

# Each shard replica reserves NUM_CPUS logical CPUs and runs its model with
# that many threads: 2 uses both cores of a 2-core machine for the one
# question in flight at concurrency 1.
serve_args=(serve --store "$STORE" --host 127.0.0.1 --port "$PORT" --num-cpus "${NUM_CPUS:-2}")
[[ -n "${MODEL:-}" ]] && serve_args+=(--model "$MODEL")
[[ -n "${BACKEND:-}" ]] && serve_args+=(--backend "$BACKEND")
[[ -n "${CACHE_URL:-}" ]] && serve_args+=(--cache-url "$CACHE_URL")
setup+=(--setup-command "shardqa $(quote "${serve_args[@]}")")

# Serve's HAProxy ingress (docs/serving.md), the fastest HTTP path the service
# offers; FAST_INGRESS=false measures Serve's Python proxy instead (the
# service's own default, opt-in there because Serve once lost its HAProxy
# manager during start-up on a saturated machine).
export SHARDQA_FAST_INGRESS="${FAST_INGRESS:-true}"
setup+=(--setup-command "SHARDQA_FAST_INGRESS=$SHARDQA_FAST_INGRESS (environment of the service)")

# Job control on: the service gets its own process group and a working
# SIGINT, which is how `shardqa serve` shuts its embedded Ray down cleanly.
set -m
echo "== shardqa ${serve_args[*]}  (log: benchmarks/work/serve.log)" >&2
# Not through the shardqa function: $! must be the service's own process.
"$PY" -m shardqa.cli "${serve_args[@]}" >benchmarks/work/serve.log 2>&1 &
SERVE_PID=$!
set +m

stop_service() {
  if kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -INT "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 1 90); do
      kill -0 "$SERVE_PID" 2>/dev/null || return 0
      sleep 1
    done
    echo "the service did not stop after SIGINT; sending SIGTERM to its process group" >&2
    kill -TERM -- "-$SERVE_PID" 2>/dev/null || true
  fi
}
trap stop_service EXIT

# The benchmark's own in-process runs use the model threads of one shard
# replica (its whole CPUs, at least 1), so "in one process" compares like with like.
REPLICA_THREADS="${NUM_CPUS:-2}"
REPLICA_THREADS="${REPLICA_THREADS%%.*}"
[[ -z "$REPLICA_THREADS" || "$REPLICA_THREADS" == "0" ]] && REPLICA_THREADS=1
bench_args=(bench-all --url "http://127.0.0.1:$PORT" --questions "$SQUAD" --store "$STORE"
            --profile-pid "$SERVE_PID" --ray-address auto --ready-timeout 900 --threads "$REPLICA_THREADS")
[[ -n "${MODEL:-}" ]] && bench_args+=(--model "$MODEL")
[[ -n "${BACKEND:-}" ]] && bench_args+=(--backend "$BACKEND")
[[ -n "${LIMIT:-}" ]] && bench_args+=(--limit "$LIMIT")
[[ -n "${READER_RUNS:-}" ]] && bench_args+=(--reader-runs "$READER_RUNS")
echo "== shardqa ${bench_args[*]} $*" >&2
if ! shardqa "${bench_args[@]}" "${setup[@]}" "$@"; then
  echo "== the benchmark failed; the service's log ends with:" >&2
  tail -n 30 benchmarks/work/serve.log >&2
  exit 1
fi
