"""Answering a question across shards: validate, cache lookup, tokenise once,
route, read the best passage (then, unless it was confident, fan out to the
other chosen shards concurrently), merge by score, cache fill.

Index versions: the service answers from one `IndexView` (version, manifest,
router) at a time and every request pins the view it started with, so the
router, the shards' passages (each request names its version), the cache key
and the reported `index_version` always agree. A new version found in the
store is loaded beside the old one, the shards are told to load it, and only
then does the view switch — in one assignment, so no request ever mixes two.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain

from shardqa.config import Settings
from shardqa.errors import AnswerTimedOut, InvalidRequest, ServiceUnavailable, ShardQAError, TokenizerMismatch
from shardqa.monitoring import metrics
from shardqa.services.answer_cache import AnswerCache, cache_key, normalise_question
from shardqa.services.questions import QuestionChecker
from shardqa.services.shard_client import ShardClient
from shardqa.services.shard_worker import ShardQuery
from shardqa.types import Answer

log = logging.getLogger(__name__)

#: How long every shard may take to load a new index version before the
#: ingress gives up this attempt (and tries again next tick): a replica whose
#: store read hangs must not hold the ingress's switch, and with it every later
#: version, forever. It does not unstick that replica's own load.
PREPARE_TIMEOUT_S = 600.0
#: The longest wait between attempts at a version whose router failed to load.
RETRY_BACKOFF_MAX_S = 60.0
_clock = time.monotonic  # the retry waits' clock (tests move it)

#: The settings that decide which passages are read and how answers are ranked.
READING_SETTINGS = ("route_k", "route_min_relative_score", "read_first_stop_logit", "merge_route_weight", "route_dense_skip_gap")


@dataclass(frozen=True)
class IndexView:
    version: str
    manifest: object  # shardqa.preprocessing.store.IndexManifest
    router: object  # shardqa.router.Router
    #: What besides the index version decides an answer (the readers' model
    #: and window settings, the router's encoder, the reading settings),
    #: hashed into cache keys:
    #: ingress replicas sharing one Redis across a redeploy never serve the
    #: old configuration's answers.
    scope: str = ""
    #: Whether every stage that reads a question ignores case, so cache keys may fold it.
    folds_case: bool = False


@dataclass(frozen=True)
class Outcome:
    answers_json: bytes  # a JSON array of answer objects, as cached
    cached: bool  # the response's flag: no inference ran for this request
    index_version: str
    hit: bool = False  # answered by a cache hit (the metrics' `cached` label)

    def body(self) -> bytes:
        return b'{"answers":%s,"cached":%s,"index_version":%s}' % (
            self.answers_json,
            b"true" if self.cached else b"false",
            json.dumps(self.index_version).encode(),
        )


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    index_version: str | None
    shards: list[dict]
    #: why the store's current version is not the one served (None: it is)
    not_served: str | None = None


def encode_answers(answers: list[Answer]) -> bytes:
    return json.dumps(
        [
            {"text": a.text, "score": a.score, "doc_id": a.doc_id, "passage_id": a.passage_id, "start": a.start, "end": a.end, "shard": a.shard}
            for a in answers
        ],
        separators=(",", ":"),
    ).encode()


class QAService:
    def __init__(self, settings: Settings, store, shards: ShardClient, checker: QuestionChecker, cache: AnswerCache,
                 answer_fingerprint: str = ""):
        self.settings = settings
        #: services.reader.answer_fingerprint of the shards' settings (cache keys).
        self.answer_fingerprint = answer_fingerprint
        self.store = store
        self.shards = shards
        self.checker = checker
        self.cache = cache
        #: The model the shards run, as they report it.
        self.model_id = ""
        self.view: IndexView | None = None
        self.view_problem = "no index loaded yet"
        self._refresher: asyncio.Task | None = None
        self._refresh_lock = asyncio.Lock()
        self._first_attempt = asyncio.Event()  # set when the first load attempt ends, either way
        #: A version found unservable (other shard count or tokenizer) and why;
        #: not retried until the store's current version changes.
        self._refused: tuple[str, str] | None = None
        #: the store's current version when last looked at
        self._latest: str | None = None
        #: A version whose load failed otherwise: (version, failures, next
        #: attempt on the monotonic clock, problem). Tried again with a
        #: doubling wait, as the failure may pass (a store briefly
        #: unreachable) or not (vectors from another encoder), and each
        #: attempt loads the router on the cores that answer requests.
        self._failed: tuple[str, int, float, str] | None = None
        #: A version's built view whose shards have not all loaded it yet.
        self._pending: IndexView | None = None
        # Tokenising and routing (BM25, PageRank, the dense encoder: ms of
        # CPU) run here, not on the event loop, which keeps serving cache
        # hits, /readyz and /metrics meanwhile.
        self._route_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="route")
        #: Questions this ingress replica is inferring now (cache misses past
        #: the cache's single-flight); more than one tells the shards the
        #: cores are shared (`_busy`). Other ingress replicas' questions are
        #: not seen, and a question that timed out leaves the count while
        #: its shard pass may still run: a hint, never a limit.
        self._inferring = 0

    @classmethod
    def create(cls, settings: Settings, shards: ShardClient) -> "QAService":
        from shardqa.preprocessing.store import open_store
        from shardqa.services.reader import answer_fingerprint, resolve_model_dir
        from shardqa.tokenization import TextTokenizer

        # The folder the shards' reader loads (a hub id resolves into cache_dir once).
        tokenizer = TextTokenizer.from_pretrained(resolve_model_dir(str(settings.model), settings.cache_dir))
        checker = QuestionChecker.for_settings(settings, tokenizer)
        cache = AnswerCache.from_url(settings.cache_url, settings.cache_ttl_s, settings.cache_timeout_s,
                                     peer_wait_s=settings.answer_timeout_s)
        return cls(settings, open_store(settings.store), shards, checker, cache, answer_fingerprint(settings))

    # --- index versions -----------------------------------------------------------

    async def start(self, wait_s: float = 0.0) -> bool:
        """Start watching the store, and wait up to `wait_s` for the first
        attempt to load its current index version; True if one is loaded.

        The wait matters to an ingress replica that joins under traffic (a
        restart, a scale-up, a redeploy): Serve and HAProxy send it requests
        as soon as start-up returns, and without an index it could only
        refuse them. Only the first attempt is awaited: when the store has
        no index yet (its build still running) or the shards are still
        starting, the service comes up unready at once, /readyz says why,
        and the index loads in the background when it can."""
        await self.cache.warm_up()
        self._refresher = asyncio.create_task(self._refresh_loop())
        if wait_s > 0:
            try:
                await asyncio.wait_for(self._first_attempt.wait(), wait_s)
            except asyncio.TimeoutError:
                log.warning("no index version loaded within %.0f s of start-up; serving unready", wait_s)
        return self.view is not None

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.cache.close()
        self._route_pool.shutdown(wait=False)

    async def _refresh_loop(self) -> None:
        last_problem = ""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the current view; try again next tick
                problem = str(exc)
                if self.view is None:
                    self.view_problem = problem
                if problem != last_problem:  # once per distinct problem, not every tick
                    log.warning("index refresh failed: %s", problem)
                last_problem = problem
            else:
                last_problem = ""
            if self.view is not None:
                metrics.set_index_not_served(self.not_served() is not None)
            self._first_attempt.set()
            await asyncio.sleep(self.settings.index_refresh_s)

    async def refresh(self) -> bool:
        """Switch to the store's current version if it changed; True if switched."""
        async with self._refresh_lock:
            version = await asyncio.to_thread(self.store.current_version)
            self._latest = version
            if self.view is not None and self.view.version == version:
                return False
            if self._refused is not None and self._refused[0] == version:
                raise ServiceUnavailable(self._refused[1])
            failed = self._failed if self._failed is not None and self._failed[0] == version else None
            if failed is not None and _clock() < failed[2]:
                raise ServiceUnavailable(failed[3])
            pending = self._pending if self._pending is not None and self._pending.version == version else None
            try:
                view = pending or await asyncio.to_thread(self._build_view, version)
            except TokenizerMismatch as exc:
                self._refused = (version, str(exc))
                raise
            except Exception as exc:
                failures = failed[1] + 1 if failed is not None else 1
                wait = min(self.settings.index_refresh_s * 2 ** failures, RETRY_BACKOFF_MAX_S)
                self._failed = (version, failures, _clock() + wait, str(exc))
                raise
            self._failed = None
            # Kept until the shards hold the version too: their side is tried
            # again every tick (cheap for the ingress, and a replica that was
            # restarting is back within seconds) without rebuilding the router.
            self._pending = view
            switched = await self._switch(version, view)
            self._pending = None
            return switched

    async def _switch(self, version: str, view: IndexView) -> bool:
        shards = view.manifest.shards
        if shards != self.shards.num_shards:
            problem = (
                f"index version {version} has {shards} shards but the service was deployed with "
                f"{self.shards.num_shards}; redeploy to serve it"
            )
            self._refused, self._pending = (version, problem), None
            raise ServiceUnavailable(problem)
        # Every shard holds the new version before any request uses it.
        try:
            statuses = await asyncio.wait_for(
                asyncio.gather(*(self.shards.prepare(s, version) for s in range(shards))), PREPARE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"the shards did not load index version {version} within "
                                     f"{PREPARE_TIMEOUT_S:.0f} s; trying again later") from None
        self.model_id = statuses[0].model_id
        view = replace(view, scope=self._scope(view))
        old, self.view = self.view, view
        self.view_problem = ""
        metrics.set_index_info(version, self.model_id, shards)
        log.info("serving index version %s (was %s)", version, old.version if old else "none")
        return True

    def _build_view(self, version: str) -> IndexView:
        from shardqa.router import Router

        # The router refuses an index tokenised with another tokenizer than
        # the one the ingress tokenises questions with.
        router = Router.from_store(self.store, version, tokenizer=self.checker.tokenizer, settings=self.settings)
        encoder = getattr(router, "encoder", None)
        # The router's terms are lower-cased; the reader's and the encoder's
        # tokenizers say for themselves.
        folds_case = self.checker.case_insensitive and (encoder is None or encoder.tokenizer.folds_case)
        return IndexView(version, self.store.manifest(version), router, folds_case=folds_case)

    def _scope(self, view: IndexView) -> str:
        encoder = getattr(view.router, "encoder", None)
        parts = [self.answer_fingerprint, encoder.fingerprint if encoder is not None else "lexical"]
        parts += [f"{name}={getattr(self.settings, name)!r}" for name in READING_SETTINGS]
        return hashlib.blake2b("\x00".join(parts).encode(), digest_size=12).hexdigest()

    def current_view(self) -> IndexView:
        view = self.view
        if view is None:
            raise ServiceUnavailable(f"not ready: {self.view_problem}")
        return view

    # --- answering -------------------------------------------------------------------

    def _check_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be between 1 and {self.settings.max_top_k}")

    def _canonical(self, question: str) -> str:
        """The checked question as every stage reads it (answer_cache.canonical_question)."""
        return self.checker.check_text(question)

    async def answer(self, question: str, top_k: int = 1) -> Outcome:
        t0 = time.perf_counter()
        text = self._canonical(question)
        self._check_top_k(top_k)
        view = self.current_view()
        metrics.record_stage("validate", time.perf_counter() - t0)
        return await self._answer_checked(view, text, top_k)

    async def answer_many(self, questions: list[str], top_k: int = 1) -> list[Outcome]:
        t0 = time.perf_counter()
        if not questions:
            raise InvalidRequest("questions must not be empty")
        if len(questions) > self.settings.max_batch_questions:
            raise InvalidRequest(f"at most {self.settings.max_batch_questions} questions per batch call")
        texts = []
        for i, q in enumerate(questions):
            try:
                texts.append(self._canonical(q))
            except ShardQAError as exc:
                raise _at_position(exc, i) from None
        self._check_top_k(top_k)

        def tokenize_all() -> list:
            tokens = []
            for i, text in enumerate(texts):
                try:
                    tokens.append(self.checker.tokenize(text))
                except ShardQAError as exc:
                    raise _at_position(exc, i) from None
            return tokens

        # Tokens too, before any question starts: one refused later would
        # fail the call after the others had begun their inference. Off the
        # event loop, as routing is (64 questions take milliseconds); an
        # uncached question then routes with these tokens, not new ones.
        tokens = await asyncio.get_running_loop().run_in_executor(self._route_pool, tokenize_all)
        view = self.current_view()
        metrics.record_stage("validate", time.perf_counter() - t0)
        # Each question takes the single-question path; the shards' dynamic
        # batching turns the concurrent calls into batched forward passes.
        return list(await asyncio.gather(*(self._answer_checked(view, q, top_k, i, tokens[i]) for i, q in enumerate(texts))))

    async def _answer_checked(self, view: IndexView, text: str, top_k: int, position: int | None = None,
                              tokens=None) -> Outcome:
        """`text` is canonical: the key is made from exactly what the stages
        read; ``tokens``: its tokens, when the caller has them already."""
        key = cache_key(view.version, normalise_question(text, view.folds_case), top_k, view.scope)
        # One deadline for the whole request: a wait for a peer replica's
        # computation and a computation of its own after that peer failed
        # together take no longer than answer_timeout_s.
        deadline = time.monotonic() + self.settings.answer_timeout_s
        try:
            result = await self.cache.get_or_compute(key, lambda: self._infer_in_time(view, text, top_k, deadline, tokens), deadline)
        except ShardQAError as exc:
            if position is None:
                raise
            raise _at_position(exc, position) from None
        return Outcome(result.value, result.shared, view.version, result.hit)

    async def _infer_in_time(self, view: IndexView, question: str, top_k: int, deadline: float, tokens=None) -> bytes:
        limit = self.settings.answer_timeout_s
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())) as timer:
                return await self._infer(view, question, top_k, tokens)
        except TimeoutError:
            if not timer.expired():
                raise  # a timeout of something inside, not the answer's deadline
            raise AnswerTimedOut(f"no answer within {limit:g} s: the shards are overloaded or stuck") from None

    def _tokenize_and_route(self, view: IndexView, question: str, tokens=None):
        t0 = time.perf_counter()
        if tokens is None:
            tokens = self.checker.tokenize(question)
            metrics.record_stage("tokenize", time.perf_counter() - t0)
        t1 = time.perf_counter()
        route = view.router.route(question, self.settings.route_k)
        metrics.record_stage("route", time.perf_counter() - t1)
        return tokens, route

    async def _infer(self, view: IndexView, question: str, top_k: int, tokens=None) -> bytes:
        self._inferring += 1
        try:
            return await self._route_read_merge(view, question, top_k, tokens)
        finally:
            self._inferring -= 1

    def _busy(self, shards_at_once: int = 1) -> bool:
        """Whether shards should read on their ``threads_under_load``: other
        questions are being inferred, or this one is read on several shards
        at once (either way the replicas share the cores)."""
        return self._inferring > 1 or shards_at_once > 1

    async def _route_read_merge(self, view: IndexView, question: str, top_k: int, tokens=None) -> bytes:
        loop = asyncio.get_running_loop()
        # In the request's context, as on the loop: Serve's metrics read the
        # request's route from it.
        work = partial(contextvars.copy_context().run, self._tokenize_and_route, view, question, tokens)
        tokens, route = await loop.run_in_executor(self._route_pool, work)
        t2 = time.perf_counter()
        metrics.record_route(route.dense)
        if route.passages:
            metrics.record_route_score(route.passages[0].score)
        to_read = passages_to_read(route.passages, self.settings.route_min_relative_score)
        if not to_read:
            metrics.record_shards_touched(0)
            return b"[]"

        async def read(passages) -> list[list[Answer]]:
            groups = _group_by_shard(passages)
            busy = self._busy(shards_at_once=len(groups))
            calls = [asyncio.ensure_future(self._ask(shard, ShardQuery(view.version, tokens, tuple(pids), top_k, under_load=busy)))
                     for shard, pids in groups.items()]
            try:
                return await asyncio.gather(*calls)
            except BaseException:
                # The request has failed: the other shards' reads would only
                # take cores from the requests that can still succeed.
                for call in calls:
                    call.cancel()
                raise

        stop_logit = self.settings.read_first_stop_logit
        if stop_logit < math.inf and top_k == 1 and len(to_read) > 1:
            # Most questions are answered confidently by the best-routed
            # passage alone; reading the others only when it is not saves
            # compute on the 2-core critical path (read_first_stop_logit).
            # The best passage's shard applies the rule to the read-set
            # passages it holds (93% of read sets of more than one passage
            # lie on one shard), so a second round costs a second hop only
            # for passages on other shards.
            first_shard = to_read[0].shard
            here = [p for p in to_read if p.shard == first_shard]
            query = ShardQuery(view.version, tokens, tuple(p.passage_id for p in here), top_k, stop_logit, under_load=self._busy())
            results = [await self._ask(first_shard, query)]
            if query.first_is_confident(results[0]):
                to_read = to_read[:1]
                rounds = 1
            else:
                elsewhere = [p for p in to_read if p.shard != first_shard]
                if elsewhere:
                    results += await read(elsewhere)
                rounds = 2
        else:
            results = await read(to_read)
            rounds = 1
        metrics.record_read_rounds(rounds)
        metrics.record_shards_touched(len({p.shard for p in to_read}))
        t3 = time.perf_counter()
        metrics.record_stage("shard_inference", t3 - t2)

        merged = merge_answers(chain.from_iterable(results), route, top_k, self.settings.merge_route_weight)
        body = encode_answers(merged)
        metrics.record_stage("merge", time.perf_counter() - t3)
        return body

    async def _ask(self, shard: int, query: ShardQuery) -> list[Answer]:
        with metrics.shard_inflight(shard):
            return await self.shards.answer(shard, query)

    # --- status ------------------------------------------------------------------------

    async def readiness(self, timeout_s: float = 2.0) -> Readiness:
        view = self.view
        shard_states: list[dict] = []

        async def one(shard: int) -> dict:
            try:
                st = await self.shards.status(shard, timeout_s, view.version if view is not None else None)
            except Exception as exc:
                detail = str(exc) if isinstance(exc, ShardQAError) else f"no live replica ({type(exc).__name__})"
                return {"shard": shard, "ready": False, "detail": detail}
            ok = view is not None and view.version in st.versions
            return {"shard": shard, "ready": ok, "versions": list(st.versions), "passages": st.passages}

        shard_states = list(await asyncio.gather(*(one(s) for s in range(self.shards.num_shards))))
        if view is None:
            return Readiness(False, self.view_problem or "no index loaded", None, shard_states)
        # Ready (the version served still answers), but an operator who just
        # published a version the service will not switch to must see why.
        not_served = self.not_served()
        missing = [s["shard"] for s in shard_states if not s["ready"]]
        if missing:
            return Readiness(False, f"shard(s) {missing} not ready", view.version, shard_states, not_served)
        return Readiness(True, "ok", view.version, shard_states, not_served)

    def not_served(self) -> str | None:
        """Why the store's current version is not the one served, or None."""
        view = self.view
        newer = next((p for p in (self._refused, self._failed)
                      if p is not None and p[0] == self._latest and (view is None or p[0] != view.version)), None)
        return f"index version {newer[0]} is not served: {newer[-1]}" if newer is not None else None

    def index_info(self) -> dict:
        view = self.current_view()
        m = view.manifest
        return {
            "version": view.version,
            "shards": m.shards,
            "num_documents": m.num_documents,
            "num_passages": m.num_passages,
            "passages_per_shard": list(m.passages_per_shard),
            "tokens_per_shard": list(m.tokens_per_shard),
            "index_model": m.model,
            "created_at": m.created_at,
            "model": self.model_id,
        }


def merge_answers(answers, route, top_k: int, route_weight: float) -> list[Answer]:
    """The best ``top_k`` answers over all passages, distinct by text.

    A reader's ``score`` is a probability within one window, so every passage
    is confident about its own best span: ranking on it picks distractors
    (705 SQuAD dev questions, 3 routed passages: F1 54.5). The span logit
    compares across passages (62.7), and the router's relative score adds
    what the reader cannot see, how well the passage matched the question
    (66.3 at weight 8; the default 10 sits where F1 is flat, 8 to 16). The
    logit is the span's margin over the window's null position
    (docs/serving.md has the later measurements)."""
    best = max((p.score for p in route.passages), default=0.0)
    prior = {p.passage_id: (p.score / best if best > 0 else 0.0) for p in route.passages}
    # A short window's candidate list is padded, as the reference pads it,
    # with spans of probability 0 (reversed or the [CLS] position, empty
    # text); their margin of about 0 would outrank every real span with a
    # negative one. The null answer ([CLS], no passage) stays when the reader
    # offers it on purpose (handle_impossible_answer).
    answers = [a for a in answers if not a.passage_id or (a.score > 0 and a.text.strip())]
    keyed = sorted(((a.logit + route_weight * prior.get(a.passage_id, 0.0), a) for a in answers),
                   key=lambda ka: ka[0], reverse=True)
    distinct, seen = [], set()
    for k, a in keyed:
        text = a.text.strip().lower()
        if text not in seen:
            seen.add(text)
            distinct.append((k, a))
    if not distinct:
        return []
    # The response's score is the softmax of the ranking key over every
    # distinct candidate read, so answers come best first by score too.
    top = distinct[0][0]
    weights = [math.exp(k - top) for k, _ in distinct]
    total = sum(weights)
    return [replace(a, score=w / total) for (_, a), w in zip(distinct[:top_k], weights)]


def _at_position(exc: ShardQAError, position: int) -> ShardQAError:
    """The same error, its message naming the batch item it came from."""
    return type(exc)(f"questions[{position}]: {exc}")


def passages_to_read(passages, min_relative_score: float):
    """The routed passages worth reading: those within ``min_relative_score``
    of the best. With answers ranked on logit + route prior, a passage far
    below the best rarely wins (the setting's default and its measurements:
    shardqa/config.py, docs/serving.md)."""
    if not passages:
        return []
    best = passages[0].score
    if best <= 0:
        return list(passages)
    return [p for p in passages if p.score >= min_relative_score * best]


def _group_by_shard(passages) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p in passages:
        out.setdefault(p.shard, []).append(p.passage_id)
    return out
