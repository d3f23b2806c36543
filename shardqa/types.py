"""Small typed records that cross the boundaries between stages.

preprocessing --(Passage)--> store --(Passage)--> services.reader
router --(RoutedPassage / RouteResult)--> services.ingress
services.reader --(Answer)--> services.ingress --> HTTP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TokenizedText:
    """Text tokenised once with the serving tokenizer, without special tokens.

    ``offsets[i]`` is the (start, end) character span of token i in the text;
    ``word_ids[i]`` the pre-tokenizer word it belongs to, which the reader needs
    to widen answers to whole words exactly as the reference pipeline does.
    """

    ids: np.ndarray  # int32 [n]
    offsets: np.ndarray  # int32 [n, 2]
    word_ids: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Passage:
    """A unit of text the reader reads, pre-tokenised, living on one shard.

    ``doc_start`` is where ``text`` starts in its document, so answer offsets
    can be reported in document coordinates.
    """

    passage_id: str
    doc_id: str
    shard: int
    text: str
    doc_start: int
    tokens: TokenizedText


@dataclass(frozen=True)
class Answer:
    """One extracted answer. ``start``/``end`` are character offsets into the
    passage text (reader) or, once the ingress has placed it, the document."""

    text: str
    score: float
    start: int
    end: int
    passage_id: str = ""
    doc_id: str = ""
    shard: int = -1
    #: start + end logit of the span minus those of the window's null position
    #: ([CLS]): unlike ``score`` (a probability within one window), comparable
    #: across passages, so the ingress merges on it.
    logit: float = 0.0


@dataclass(frozen=True)
class RoutedPassage:
    passage_id: str
    doc_id: str
    shard: int
    shard_tag: str  # the Redis Cluster hash tag, e.g. "{s2}"
    score: float


@dataclass(frozen=True)
class RouteResult:
    question: str
    passages: list[RoutedPassage]
    by_shard: dict[int, list[str]] = field(default_factory=dict)  # shard -> passage ids, best first
    dense: bool = False  # the dense question encoder took part (else lexical blend only)
