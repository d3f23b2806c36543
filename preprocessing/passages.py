"""Passages: overlapping windows of whole sentences.

A window holds up to ``window`` sentences and the next one starts ``stride``
sentences later, so consecutive windows share ``window - stride`` sentences and
every sentence boundary inside a document lies inside some passage — an answer
that spans two sentences is still wholly inside one passage. A window also
stops growing before it would pass ``max_tokens``; a single sentence longer
than that is cut into overlapping pieces at word boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PassageSpan:
    sent_start: int  # first sentence (index within the document)
    sent_end: int  # one past the last sentence
    char_start: int
    char_end: int
    tokens: int  # approximate: counted on the document's tokenisation


def sentence_token_counts(spans: list[tuple[int, int]], token_offsets: np.ndarray) -> list[int]:
    """Tokens whose start falls inside each sentence span (document tokenisation)."""
    starts = token_offsets[:, 0] if len(token_offsets) else np.zeros(0, dtype=np.int32)
    return [int(np.searchsorted(starts, j, "left") - np.searchsorted(starts, i, "left")) for i, j in spans]


def form_passages(
    spans: list[tuple[int, int]],
    sent_tokens: list[int],
    token_offsets: np.ndarray,
    word_ids: np.ndarray,
    window: int = 3,
    stride: int = 2,
    max_tokens: int = 128,
) -> list[PassageSpan]:
    window = max(1, window)
    stride = max(1, min(stride, window))
    n = len(spans)
    out: list[PassageSpan] = []
    a = 0
    while a < n:
        if sent_tokens[a] > max_tokens:
            out += _split_long_sentence(a, spans[a], token_offsets, word_ids, max_tokens)
            a += 1
            continue
        b, tokens = a, 0
        while b < n and b - a < window and tokens + sent_tokens[b] <= max_tokens:
            tokens += sent_tokens[b]
            b += 1
        out.append(PassageSpan(a, b, spans[a][0], spans[b - 1][1], tokens))
        if b >= n:
            break
        a = a + stride if b - a > stride else b
    return out


def _split_long_sentence(k, span, offsets, word_ids, max_tokens) -> list[PassageSpan]:
    i, j = span
    starts = offsets[:, 0]
    lo, hi = int(np.searchsorted(starts, i, "left")), int(np.searchsorted(starts, j, "left"))
    pieces = []
    step = max(1, (3 * max_tokens) // 4)
    t = lo
    while t < hi:
        e = min(hi, t + max_tokens)
        # end on a word boundary (never split a word's pieces across passages)
        while hi > e > t + 1 and word_ids[e] == word_ids[e - 1]:
            e -= 1
        cs = i if t == lo else int(offsets[t, 0])
        ce = j if e >= hi else int(offsets[e - 1, 1])
        pieces.append(PassageSpan(k, k + 1, cs, ce, e - t))
        if e >= hi:
            break
        nt = t + step
        while nt < e and nt > t and word_ids[nt] == word_ids[nt - 1]:
            nt -= 1
        t = nt if nt > t else e
    return pieces
