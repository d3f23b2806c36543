"""The REST API's request and response bodies (the OpenAPI schema's source).

Requests are strict: unknown fields and wrong JSON types are refused rather
than coerced ("3" is not a top_k), so client mistakes surface as 4xx.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)


class AnswerRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"question": "Who gave their name to Normandy?", "top_k": 1}]}
    )

    question: str = Field(description="The question, in plain text.")
    top_k: int = Field(1, description="How many answers to return, best first (1 .. max_top_k).")


class BatchAnswerRequest(BaseModel):
    model_config = _STRICT

    questions: list[str] = Field(description="Questions to answer in one call (1 .. max_batch_questions).")
    top_k: int = Field(1, description="Answers per question, best first (1 .. max_top_k).")


class AnswerItem(BaseModel):
    text: str = Field(description="The answer, a substring of the document.")
    score: float = Field(description="Softmax of the ranking key (span logit + merge_route_weight x route score) over the distinct candidates read, 0..1: it orders this response's answers; it is not a calibrated probability that the answer is right.")
    doc_id: str
    passage_id: str
    start: int = Field(description="Character offset of the answer in the document text.")
    end: int = Field(description="Character offset one past the answer's end in the document text.")
    shard: int = Field(description="The shard whose replica found the answer.")


class AnswerResponse(BaseModel):
    answers: list[AnswerItem]
    cached: bool = Field(description="True when no inference ran for this request (cache hit or shared computation).")
    index_version: str = Field(description="The index version every answer comes from.")


class BatchAnswerResponse(BaseModel):
    results: list[AnswerResponse] = Field(description="One result per question, in request order.")


class IndexInfo(BaseModel):
    version: str
    shards: int
    num_documents: int
    num_passages: int
    passages_per_shard: list[int]
    tokens_per_shard: list[int]
    index_model: str = Field(description="The model whose tokenizer the index was built with.")
    created_at: str
    model: str = Field(description="The model the shard replicas run.")


class Health(BaseModel):
    status: str


class ShardReadiness(BaseModel):
    shard: int
    ready: bool
    versions: list[str] = Field(default_factory=list, description="Index versions the answering replica holds.")
    passages: int = 0
    detail: str = ""


class Readiness(BaseModel):
    ready: bool
    reason: str
    index_version: str | None
    shards: list[ShardReadiness]
    not_served: str | None = Field(None, description="Why the store's current index version is not the one served "
                                   "(another shard count, another tokenizer, a router that fails to load); null when it is.")


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code, e.g. invalid_question, validation_error.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
