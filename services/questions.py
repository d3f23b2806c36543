"""Question validation and tokenisation in the ingress, without a model.

The ingress tokenises each question once and sends token ids to the shards,
so it must refuse exactly the questions the reader would refuse, with the
reader's limits, while loading only the tokenizer.
"""

from __future__ import annotations

from shardqa.config import Settings
from shardqa.errors import InvalidQuestion, InvalidRequest, QuestionTooLong
from shardqa.services.answer_cache import canonical_question
from shardqa.tokenization import TextTokenizer, not_unicode_at
from shardqa.types import TokenizedText


def window_stride(doc_stride: int | None, max_seq_len: int) -> int:
    """The overlap between a long passage's windows, picked as the reference
    pipeline picks it: a stride given is used as is, none gives
    min(max_seq_len // 2, 128)."""
    return min(max_seq_len // 2, 128) if doc_stride is None else doc_stride


def max_question_tokens(settings: Settings, tokenizer: TextTokenizer, max_seq_len: int | None = None, doc_stride: int | None = None) -> int:
    """The longest question the reader takes: the configured maximum, and
    never so long that a window keeps no more passage tokens than the stride."""
    seq = min(max_seq_len or settings.max_seq_len, tokenizer.model_max_length)
    stride = window_stride(settings.doc_stride if doc_stride is None else doc_stride, seq)
    room = seq - tokenizer.template.num_special - stride - 1
    if room < 1:
        # Else every question would be refused as too long, one by one.
        raise InvalidRequest(f"doc_stride {stride} leaves no room for a question in a window of {seq} tokens")
    return min(settings.max_question_len, room)


def check_question_text(question: str, max_chars: int | None) -> str:
    """A question's checks that need no tokenizer (type, blank, length,
    Unicode); the question as every stage reads it (``canonical_question``).
    ``max_chars`` None leaves the length to whoever answers (a remote service)."""
    if not isinstance(question, str):
        raise InvalidQuestion("the question must be a string")
    if not question.strip():
        raise InvalidQuestion("the question is empty")
    if max_chars is not None and len(question) > max_chars:
        raise QuestionTooLong(f"the question has {len(question)} characters; the limit is {max_chars}")
    at = not_unicode_at(question)
    if at is not None:
        raise InvalidQuestion(f"the question is not valid Unicode text (lone surrogate at character {at})")
    text = canonical_question(question)
    if not text:
        raise InvalidQuestion("the question is empty (it has only control or invisible characters)")
    return text


class QuestionChecker:
    def __init__(self, tokenizer: TextTokenizer, max_chars: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        # An uncased tokenizer lets the answer cache fold case; a cased one must not.
        self.case_insensitive = tokenizer.folds_case

    @classmethod
    def for_settings(cls, settings: Settings, tokenizer: TextTokenizer | None = None) -> "QuestionChecker":
        """The service's checks under `settings`; without `tokenizer`, with
        the serving model's (what the commands that route outside the
        service use, so they refuse what it refuses)."""
        if tokenizer is None:
            from shardqa.services.reader import resolve_model_dir

            tokenizer = TextTokenizer.from_pretrained(resolve_model_dir(settings.model, settings.cache_dir))
        return cls(tokenizer, settings.max_question_chars, max_question_tokens(settings, tokenizer))

    def check_text(self, question: str) -> str:
        """The checks that need no tokenizer, so a cache hit skips tokenising;
        the canonical question."""
        return check_question_text(question, self.max_chars)

    def tokenize(self, question: str) -> TokenizedText:
        tokens = self.tokenizer.tokenize(question)
        if len(tokens) > self.max_tokens:
            raise QuestionTooLong(f"the question has {len(tokens)} tokens; this model allows {self.max_tokens}")
        if len(tokens) == 0:
            raise InvalidQuestion("the question has no tokens the model knows")
        if not self.tokenizer.has_known_word(question, tokens):
            # Emoji or a script outside the vocabulary become [UNK]: the model
            # would answer something with confidence, about nothing.
            raise InvalidQuestion("the question has no word the model knows (only unknown symbols or punctuation)")
        return tokens
