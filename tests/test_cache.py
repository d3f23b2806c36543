"""The answer cache in one process: keys, expiry, single-flight, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardqa.services.answer_cache import AnswerCache, MemoryBackend, cache_key, canonical_question, normalise_question


def test_keys_hash_everything_that_decides_the_answer():
    q = normalise_question("Who gave their name to Normandy?", lowercase=True)
    key = cache_key("v1", q, 1)
    assert "normandy" not in key.lower() and "v1" not in key
    assert len(key) == 40 and all(c in "0123456789abcdef" for c in key)
    assert cache_key("v2", q, 1) != key  # a new index version never sees old answers
    assert cache_key("v1", q, 2) != key
    assert cache_key("v1", normalise_question("  Who gave their\tname to\n Normandy? ", lowercase=True), 1) == key
    # The model and the reading settings decide answers too.
    assert cache_key("v1", q, 1, scope="model-b") != key


def test_the_canonical_question_is_what_every_stage_reads():
    # A control character separates words (the tokenizer alone would drop it
    # and join them); invisible format characters vanish; NFD becomes NFC.
    assert canonical_question("In what country is\x1fNormandy\x1flocated?") == "In what country is Normandy located?"
    assert canonical_question("Nor\u200bmandy\u00ad?\ufeff") == "Normandy?"
    assert canonical_question("Who founded Citroe\u0308n?") == "Who founded Citro\u00ebn?"
    assert canonical_question("\u00a0Who\u2003won?\r\n") == "Who won?"
    assert canonical_question("\x00\x01") == ""


def test_case_folds_only_for_uncased_models():
    assert normalise_question("Who WON?", lowercase=True) == "who won?"
    assert normalise_question("Who WON?", lowercase=False) == "Who WON?"


def test_two_questions_share_a_key_only_when_every_stage_reads_them_alike():
    """Case folds only where both the uncased tokenizer and the router's
    analyzer fold it: for a word-final capital sigma, str.lower() (the
    analyzer) gives "ς" and the tokenizer "σ"."""
    from shardqa.preprocessing.terms import Analyzer
    from shardqa.tokenization import TextTokenizer

    tok = TextTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tiny-bert-qa")
    analyzer = Analyzer()
    questions = ["What is ΟΔΟΣ?", "What is οδος?", "What is οδοσ?", "What is ΟΔΟσ?", "Who WON?", "who won?"]
    for a in questions:
        for b in questions:
            if normalise_question(a, lowercase=True) == normalise_question(b, lowercase=True):
                assert tok.tokenize(a).ids.tolist() == tok.tokenize(b).ids.tolist(), (a, b)
                assert analyzer.terms(a) == analyzer.terms(b), (a, b)
    assert normalise_question("Who WON?", lowercase=True) == normalise_question("who won?", lowercase=True)


def test_memory_backend_expires_and_bounds_entries(monkeypatch):
    import shardqa.services.answer_cache as ac

    now = [1000.0]
    monkeypatch.setattr(ac.time, "monotonic", lambda: now[0])
    backend = MemoryBackend(max_entries=2)

    async def scenario():
        await backend.set("a", b"1", ttl_s=10)
        assert await backend.get("a") == b"1"
        now[0] += 11
        assert await backend.get("a") is None
        for k in "bcd":
            await backend.set(k, k.encode(), ttl_s=10)
        assert await backend.get("b") is None  # least recently used went first
        assert await backend.get("d") == b"d"

    asyncio.run(scenario())


class Counted:
    """An answer computation that takes a while and counts its runs."""

    def __init__(self, value: bytes, seconds: float = 0.05):
        self.value, self.seconds, self.calls = value, seconds, 0

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        return self.value


def test_concurrent_misses_compute_once():
    cache = AnswerCache(MemoryBackend(), ttl_s=60, timeout_s=0.05)
    compute = Counted(b'[{"text":"Normans"}]')

    async def scenario():
        results = await asyncio.gather(*(cache.get_or_compute("k", compute) for _ in range(20)))
        assert compute.calls == 1
        assert {r.value for r in results} == {b'[{"text":"Normans"}]'}
        assert sum(not r.shared for r in results) == 1  # exactly one request ran inference
        # The others waited as long as it did: shared, but not cache hits
        # (the metrics' `cached` label, which the cached-latency target reads).
        assert not any(r.hit for r in results)
        again = await cache.get_or_compute("k", compute)
        assert again.shared and again.hit and compute.calls == 1  # now a plain cache hit

    asyncio.run(scenario())


def test_a_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = AnswerCache(MemoryBackend(), ttl_s=60, timeout_s=0.05)
    calls = 0

    async def failing():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        raise ValueError("shard down")

    async def scenario():
        results = await asyncio.gather(*(cache.get_or_compute("k", failing) for _ in range(5)), return_exceptions=True)
        assert calls == 1 and all(isinstance(r, ValueError) for r in results)

        async def ok():
            return b"[]"

        assert (await cache.get_or_compute("k", ok)).shared is False

    asyncio.run(scenario())


def test_a_caller_that_joined_late_keeps_its_own_deadline():
    """The shared computation times out on its first caller's deadline; a
    caller that joined later computes once more in the time it has left,
    while the first caller gets its 503."""
    import time

    from shardqa.errors import AnswerTimedOut

    cache = AnswerCache(MemoryBackend(), ttl_s=60, timeout_s=0.05)
    started = []

    def computation(deadline):
        async def compute():
            started.append(deadline)
            if len(started) == 1:
                await asyncio.sleep(0.05)
                raise AnswerTimedOut("no answer within 1 s")
            return b"[late]"
        return compute

    async def scenario():
        now = time.monotonic()
        first = asyncio.ensure_future(cache.get_or_compute("k", computation(now + 0.05), now + 0.05))
        await asyncio.sleep(0.01)
        late = await cache.get_or_compute("k", computation(now + 60), now + 60)
        with pytest.raises(AnswerTimedOut):
            await first
        return late

    late = asyncio.run(scenario())
    assert late.value == b"[late]" and len(started) == 2
    assert started[1] > started[0]  # the second computation ran on the late caller's deadline
    # A caller whose own time is up gets the timeout as it is.
    started.clear()

    async def expired():
        gone = time.monotonic() - 1
        return await asyncio.gather(*(cache.get_or_compute("j", computation(gone), gone) for _ in range(2)),
                                    return_exceptions=True)

    assert [type(r) for r in asyncio.run(expired())] == [AnswerTimedOut, AnswerTimedOut] and len(started) == 1
    # Nor does one with less than half the time the failed computation had:
    # it would most likely time out too, on shards already too slow.
    started.clear()

    async def nearly_expired():
        now = time.monotonic()
        first = asyncio.ensure_future(cache.get_or_compute("i", computation(now + 0.05), now + 0.05))
        await asyncio.sleep(0.01)
        late = cache.get_or_compute("i", computation(now + 0.06), now + 0.06)
        return await asyncio.gather(first, late, return_exceptions=True)

    assert [type(r) for r in asyncio.run(nearly_expired())] == [AnswerTimedOut, AnswerTimedOut] and len(started) == 1


def test_a_caller_that_goes_away_does_not_fail_the_others():
    """The request that started a computation is cancelled (its client hung
    up): the computation goes on, the other callers get its value, and it is cached."""
    cache = AnswerCache(MemoryBackend(), ttl_s=60, timeout_s=0.05)
    compute = Counted(b"[1]")

    async def scenario():
        first = asyncio.ensure_future(cache.get_or_compute("k", compute))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(cache.get_or_compute("k", compute))
        await asyncio.sleep(0.01)
        first.cancel()
        result = await second
        assert first.cancelled()
        assert result.value == b"[1]" and result.shared
        again = await cache.get_or_compute("k", compute)
        assert again.value == b"[1]" and again.shared
        assert compute.calls == 1

    asyncio.run(scenario())


def test_a_computation_nobody_waits_for_any_more_still_fills_the_cache():
    cache = AnswerCache(MemoryBackend(), ttl_s=60, timeout_s=0.05)

    async def compute():
        await asyncio.sleep(0.02)
        return b"[2]"

    async def scenario():
        only = asyncio.ensure_future(cache.get_or_compute("k", compute))
        await asyncio.sleep(0.005)
        only.cancel()
        await asyncio.sleep(0.05)
        assert await cache.lookup("k") == b"[2]"
        assert not cache._inflight

    asyncio.run(scenario())


class BrokenBackend(MemoryBackend):
    """A cache whose every operation fails, as a Redis outage does."""

    shared = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    async def get(self, key):
        self.calls += 1
        raise ConnectionError("connection refused")

    async def set(self, key, value, ttl_s):
        self.calls += 1
        raise ConnectionError("connection refused")

    async def try_lock(self, key, ttl_ms):
        self.calls += 1
        raise ConnectionError("connection refused")


def test_a_broken_cache_degrades_to_uncached_answers_and_backs_off():
    from test_metrics import delta, scrape

    backend = BrokenBackend()
    cache = AnswerCache(backend, ttl_s=60, timeout_s=0.05, retry_after_s=30)
    computed = 0

    async def compute():
        nonlocal computed
        computed += 1
        return b"[]"

    async def scenario():
        for _ in range(5):
            result = await cache.get_or_compute("k", compute)
            assert result.value == b"[]" and not result.shared

    before = scrape()
    asyncio.run(scenario())
    after = scrape()
    assert computed == 5
    assert backend.calls == 1  # after the first failure the cache is left alone for retry_after_s
    assert delta(before, after, "shardqa_cache_requests_total", result="error") == 5
    assert not cache.available


def test_a_hung_cache_costs_at_most_its_timeout():
    gets = []

    class Hung(MemoryBackend):
        async def get(self, key):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                gets.append("cancelled")
                raise

    cache = AnswerCache(Hung(), ttl_s=60, timeout_s=0.05)
    # The hung get is given up at its timeout (else this would wait an hour),
    # the answer is computed, and the cache is left alone for a while.
    result = asyncio.run(cache.get_or_compute("k", lambda: asyncio.sleep(0, b"[]")))
    assert result.value == b"[]" and gets == ["cancelled"] and not cache.available


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_blank_questions_normalise_to_empty(bad):
    assert normalise_question(bad, lowercase=True) == ""
