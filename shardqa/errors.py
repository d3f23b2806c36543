"""Typed errors for user mistakes. The CLI prints them as one line; the API maps them to 4xx."""

from __future__ import annotations


def one_line(text: object, limit: int = 300) -> str:
    """`text` as one line of at most `limit` characters: a third-party
    message often spans several, and a CLI error or a log field is one."""
    return " ".join(str(text).split())[:limit]


def validator_message(text: str) -> str:
    """A pydantic validation message without the "Value error, " pydantic
    puts before a validator's own words."""
    return text.replace("Value error, ", "")


#: What walking a JSON file of the wrong shape raises (a string where an
#: object belongs, a missing key, a number that is not one).
SHAPE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def not_squad_shape(where: str, exc: BaseException) -> str:
    """One line naming the place in a SQuAD file and what is wrong there."""
    detail = f"missing {exc}" if isinstance(exc, KeyError) else one_line(str(exc).split("\n", 1)[0])
    return f"{where}: not in SQuAD v1.1 shape ({detail})"


class ShardQAError(Exception):
    """Base of every error caused by input or configuration rather than a bug."""

    code = "bad_request"
    http_status = 400


class InvalidQuestion(ShardQAError):
    code = "invalid_question"


class QuestionTooLong(InvalidQuestion):
    code = "question_too_long"


class InvalidContext(ShardQAError):
    code = "invalid_context"


class InvalidText(ShardQAError):
    """Text that is not Unicode: a lone surrogate, from JSON's \\ud800 or from
    bytes that were not UTF-8 on a command line."""

    code = "invalid_text"


class ModelNotFound(ShardQAError):
    code = "model_not_found"


class NotAQAModel(ShardQAError):
    code = "not_a_qa_model"


class BackendUnavailable(ShardQAError):
    code = "backend_unavailable"


class CorpusError(ShardQAError):
    code = "invalid_corpus"


class StoreError(ShardQAError):
    code = "store_error"
    http_status = 503


class StoreUnreachable(StoreError):
    """The store did not answer (connection refused, timed out): worth trying again."""


class IndexNotFound(StoreError):
    code = "index_not_found"


class TokenizerMismatch(StoreError):
    code = "tokenizer_mismatch"


class InvalidRequest(ShardQAError):
    """A well-formed API request whose values are out of range (e.g. top_k)."""

    code = "invalid_request"
    http_status = 422


class RequestTooLarge(ShardQAError):
    code = "request_too_large"
    http_status = 413


class ServiceUnavailable(ShardQAError):
    """The service cannot answer right now (no index loaded, a shard without replicas)."""

    code = "unavailable"
    http_status = 503


class AnswerTimedOut(ServiceUnavailable):
    """An answer's computation ran out of its request's time."""
