"""Retrieval terms: the words the router matches questions against passages by.

These are not model tokens (``shardqa.tokenization.TextTokenizer`` owns those);
they are lower-cased word terms, English stop words removed, reduced to their
Snowball stems, so that "invented", "inventing" and "inventor" meet. The same
analyzer runs at index time and on every question, and its settings are
recorded in the index so a router can refuse an index analysed differently.
"""

from __future__ import annotations

import re
from functools import lru_cache

#: bm25s's default token pattern: runs of two or more word characters.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"

#: Words that carry the question's form rather than its content.
QUESTION_WORDS = frozenset(
    "what which who whom whose when where why how many much did does do was were is are "
    "name named called type kind year years".split()
)


class Analyzer:
    """Text -> list of stemmed terms. Cheap: a regex, a set lookup and a cached stem per word."""

    spec_version = 1

    def __init__(self, language: str = "english"):
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN_PLUS

        self.language = language
        self._split = re.compile(TOKEN_PATTERN).findall
        self._stop = frozenset(STOPWORDS_EN_PLUS) | QUESTION_WORDS
        stemmer = Stemmer.Stemmer(language)
        self._stem = lru_cache(maxsize=1 << 18)(stemmer.stemWord)

    @property
    def spec(self) -> dict:
        return {"pattern": TOKEN_PATTERN, "stopwords": "bm25s-en-plus+question-words", "stemmer": f"snowball-{self.language}", "v": self.spec_version}

    def terms(self, text: str) -> list[str]:
        stop = self._stop
        stem = self._stem
        return [stem(w) for w in self._split(text.lower()) if w not in stop]

    def terms_many(self, texts: list[str]) -> list[list[str]]:
        return [self.terms(t) for t in texts]
