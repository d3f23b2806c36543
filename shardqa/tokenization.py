"""The one place where text becomes token ids.

Preprocessing pre-tokenises passages with it, the ingress tokenises questions
with it, and the reader assembles model inputs from both with its
``pair_template``. Tests prove the assembled inputs equal the Hugging Face
tokenizer's ``tokenizer(question, passage, truncation='only_second', ...)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardqa.errors import InvalidText, ModelNotFound, one_line
from shardqa.types import TokenizedText


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around (question, passage), read off the tokenizer's own
    post-processor rather than assumed. Proven equal to the reference
    tokenizer for BERT's WordPiece template (the tests' fixture and the
    shipped model); other templates are read the same way but untested."""

    prefix: np.ndarray  # ids before the question
    middle: np.ndarray  # ids between question and passage
    suffix: np.ndarray  # ids after the passage
    type_prefix: np.ndarray
    type_question: int
    type_middle: np.ndarray
    type_passage: int
    type_suffix: np.ndarray

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def not_unicode_at(text: str) -> int | None:
    """Where `text` stops being Unicode text, else None: a lone surrogate, as
    JSON's \\ud800 escapes or bytes of a command line that were not UTF-8 give.
    The tokenizer cannot read such a string."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _text(text: str) -> str:
    """`text`, if the tokenizer can read it: a string of Unicode text."""
    if not isinstance(text, str):
        raise InvalidText(f"expected text, got {type(text).__name__}")
    at = not_unicode_at(text)
    if at is not None:
        snippet = text[max(0, at - 20):at].encode("utf-8", "replace").decode()
        raise InvalidText(f"the text is not valid Unicode (a byte that is not UTF-8, or a lone surrogate, at character "
                          f"{at}, after {snippet!r})")
    return text


#: Files one of which a model folder's tokenizer is loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class TextTokenizer:
    """A fast (Rust) tokenizer with truncation and padding switched off.

    Shipped ``tokenizer.json`` files sometimes carry truncation or padding
    settings (one widely used MiniLM copy truncates to 128 tokens); loaded raw,
    they would silently cut passages, so both are always disabled here.
    """

    def __init__(self, hf_tokenizer):
        from tokenizers import Tokenizer

        if not getattr(hf_tokenizer, "is_fast", False):
            raise ModelNotFound("the model has no fast tokenizer (tokenizer.json); shardqa needs one for offsets")
        self.hf = hf_tokenizer
        self.backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0)
        self.cls_id = hf_tokenizer.cls_token_id
        if hf_tokenizer.padding_side != "right":
            # The reference pipeline puts the passage first for such models
            # (XLNet); the reader's windows are (question, passage) only.
            raise ModelNotFound("the model's tokenizer pads on the left (passage first), which shardqa does not support")
        self.model_max_length = int(min(getattr(hf_tokenizer, "model_max_length", 512) or 512, 10**6))
        self.unk_id = hf_tokenizer.unk_token_id
        self.template = self._read_template()
        self.fingerprint = self._fingerprint()
        # An uncased tokenizer maps "Who" and "who" to the same ids.
        self.folds_case = bool(np.array_equal(self.tokenize("Who Paris").ids, self.tokenize("who paris").ids))

    @classmethod
    def from_pretrained(cls, model: str | Path) -> "TextTokenizer":
        from transformers import AutoTokenizer

        folder = Path(str(model)).expanduser()
        if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
            # transformers would go on to suggest installing sentencepiece.
            raise ModelNotFound(f"{model!s} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): is it a model folder?")
        try:
            hf = AutoTokenizer.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            # transformers' messages run over several lines (and one breaks
            # off after its first): all of it, on one line.
            raise ModelNotFound(f"cannot load a tokenizer from {model!s}: {one_line(exc)}") from None
        return cls(hf)

    def tokenize(self, text: str) -> TokenizedText:
        enc = self.backend.encode(_text(text), add_special_tokens=False)
        return _to_tokenized(enc)

    def has_known_word(self, text: str, tokens: TokenizedText) -> bool:
        """Whether any token of ``text`` is a vocabulary word: not the unknown
        token, and spelling a letter or digit (punctuation alone says nothing
        a passage could answer)."""
        for tid, (a, b) in zip(tokens.ids.tolist(), tokens.offsets.tolist()):
            if tid != self.unk_id and any(c.isalnum() for c in text[a:b]):
                return True
        return False

    def tokenize_many(self, texts: list[str]) -> list[TokenizedText]:
        return [_to_tokenized(e) for e in self.backend.encode_batch([_text(t) for t in texts], add_special_tokens=False)]

    def _read_template(self) -> PairTemplate:
        # Probe the post-processor with one-token sequences of distinguishable ids.
        q = self.backend.encode("a", add_special_tokens=False)
        p = self.backend.encode("b", add_special_tokens=False)
        pair = self.backend.post_process(q, p, add_special_tokens=True)
        ids = np.asarray(pair.ids, dtype=np.int64)
        types = np.asarray(pair.type_ids, dtype=np.int64)
        # post_process does not keep sequence ids of raw encodings; the probe
        # tokens are distinct non-special ids, so find them by value.
        qi = int(np.flatnonzero(ids == q.ids[0])[0])
        pi = int(np.flatnonzero(ids == p.ids[0])[-1])
        return PairTemplate(
            prefix=ids[:qi],
            middle=ids[qi + 1 : pi],
            suffix=ids[pi + 1 :],
            type_prefix=types[:qi],
            type_question=int(types[qi]),
            type_middle=types[qi + 1 : pi],
            type_passage=int(types[pi]),
            type_suffix=types[pi + 1 :],
        )

    def _fingerprint(self) -> str:
        spec = json.loads(self.backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        blob = json.dumps(spec, sort_keys=True).encode() + self.hf.padding_side.encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _to_tokenized(enc) -> TokenizedText:
    n = len(enc.ids)
    offsets = np.asarray(enc.offsets, dtype=np.int32).reshape(n, 2)
    words = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int32)
    return TokenizedText(ids=np.asarray(enc.ids, dtype=np.int32), offsets=offsets, word_ids=words)
