"""The HTTP API: a FastAPI app over a QAService.

Every error is JSON `{"error": {"code", "message"}}`: client mistakes get
the right 4xx (FastAPI's own validation errors included), a service that
cannot answer yet gets 503, and a bug gets a bare 500 — never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardqa.config import Settings
from shardqa.errors import ShardQAError
from shardqa.monitoring import metrics
from shardqa.services.api_models import (
    AnswerRequest,
    AnswerResponse,
    BatchAnswerRequest,
    BatchAnswerResponse,
    ErrorResponse,
    Health,
    IndexInfo,
    Readiness,
)
from shardqa.services.qa_service import QAService

log = logging.getLogger(__name__)

JSON = "application/json"
ENDPOINTS = frozenset({"/v1/answer", "/v1/answer:batch", "/v1/index", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
#: Where /docs loads Swagger UI's script and stylesheet from: the app itself,
#: not a CDN, so the page works on a cluster without internet access.
DOCS_ASSETS = "/docs/assets"
#: The status recorded for a request whose client went away before the
#: answer (nginx's convention; never sent, since nobody is listening).
CLIENT_CLOSED = 499
#: Endpoints whose body is JSON.
JSON_BODIES = frozenset({"/v1/answer", "/v1/answer:batch"})
#: FastAPI's detail when it cannot decode a body it was told is JSON (invalid UTF-8, for one).
_UNDECODABLE_BODY = "There was an error parsing the body"
#: Python's JSON parser recurses once per level, up to the interpreter's
#: recursion limit (1,000, less the stack already in use).
TOO_DEEP = "the request body's JSON is nested deeper than the parser allows (about a thousand levels)"
_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}

ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid question or malformed JSON"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    415: {"model": ErrorResponse, "description": "The body is not sent as JSON (Content-Type must be application/json)"},
    422: {"model": ErrorResponse, "description": "Wrong field types, unknown fields, or values out of range"},
    503: {"model": ErrorResponse, "description": "No index loaded yet, a shard has no live replica, or no answer within answer_timeout_s"},
}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    metrics.record_error(code)
    return Response(json.dumps({"error": {"code": code, "message": message}}).encode(), status_code=status,
                    media_type=JSON, headers=headers)


def _describe_validation(exc: RequestValidationError, path: str = "") -> tuple[int, str, str]:
    errors = exc.errors()
    like = '{"questions": ["...", "..."]}' if path.endswith(":batch") else '{"question": "..."}'
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    if any(e.get("loc") == ("body",) and e.get("type") == "missing" for e in errors):
        return 422, "validation_error", f"the request body is empty: send a JSON object, like {like}"
    if any(e.get("loc") == ("body",) and e.get("type") in ("model_attributes_type", "dict_type") for e in errors):
        return 422, "validation_error", f"the request body must be a JSON object, like {like}"
    parts = []
    for e in errors[:5]:
        # A field named "" is named as such; a 30,000-character one is not echoed whole.
        where = tuple(e.get("loc", ()))
        loc = _location(where[1:] if where[:1] == ("body",) else where)
        msg = e.get("msg", "invalid value")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}")
    return 422, "validation_error", "; ".join(parts)


def _location(parts) -> str:
    """A field's place as the service's own checks write it: questions[1].x."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + _field_name(part)
    return out or "body"


def _shorten(text: str, limit: int = 60) -> str:
    """User text echoed in a message, cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _field_name(part) -> str:
    name = str(part)
    return _shorten(name) if name else '""'


class RequestGate:
    """A plain ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware):
    refuses bodies over the limit with 413 before anything parses them, and
    records every request's latency and status."""

    def __init__(self, app, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = _app_path(scope)
        status_holder: list[int | None] = [None]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                if scope.get("method") == "POST" and path in JSON_BODIES and not _is_json(scope):
                    # Without this, `curl -d '{...}'` (a form content type)
                    # gets a validation error that never names the cause.
                    media = _content_type(scope)
                    await error_response(
                        415, "unsupported_media_type",
                        f"the request body must be JSON, sent with Content-Type: application/json (got {media!r})",
                    )(scope, receive, send_recording)
                    return
                encoding = _header(scope, b"content-encoding").strip().lower()
                if scope.get("method") == "POST" and path in JSON_BODIES and encoding not in ("", "identity"):
                    # Nothing here inflates bodies: gzip bytes would be read
                    # as JSON and refused as not UTF-8, a misleading reason.
                    await error_response(
                        415, "unsupported_media_type",
                        f"the request body is sent with Content-Encoding: {encoding[:40]}; send it uncompressed",
                    )(scope, receive, send_recording)
                    return
                body = await self._read_body(scope, receive, send_recording)
                if body is None:
                    return
                if scope.get("method") == "POST" and path in JSON_BODIES and (problem := body_problem(body)) is not None:
                    await error_response(*problem)(scope, receive, send_recording)
                    return
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        except asyncio.CancelledError:
            # The client hung up mid-answer (Serve cancels the request): not
            # an error of the service's, and no 5xx for the error-ratio alert.
            if status_holder[0] is None:
                status_holder[0] = CLIENT_CLOSED
            raise
        except BaseException:
            if status_holder[0] is None:
                status_holder[0] = 500
            raise
        finally:
            state = scope.get("state") or {}
            # No response and no exception: the client went away while its body was read.
            status = status_holder[0] if status_holder[0] is not None else CLIENT_CLOSED
            metrics.record_request(
                _endpoint_label(path), status, time.perf_counter() - t0, bool(state.get("cached", False))
            )

    async def _read_body(self, scope, receive, send) -> bytes | None:
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body_bytes
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return None
            if too_big:
                await self._too_large(scope, receive, send)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send) -> None:
        await error_response(413, "request_too_large", f"the request body is larger than {self.max_body_bytes} bytes")(scope, receive, send)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str):
    # Python's json takes NaN, Infinity and -Infinity; JSON has no such values.
    raise _NotJSON(name)


def body_problem(body: bytes) -> tuple[int, str, str] | None:
    """(status, code, message) for a JSON body the API refuses before
    validation, naming what is wrong with it; None for a body to validate
    (malformed JSON included: FastAPI's parse names where)."""
    try:
        # Decoded here, not by json.loads, which would also take UTF-16 and
        # UTF-32: JSON between systems is UTF-8 (RFC 8259), and a BOM is
        # left for FastAPI's parse.
        json.loads(body.decode("utf-8"), object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except _NotJSON as exc:
        return 400, "invalid_json", f"the request body is not valid JSON: {exc.args[0]} is not a JSON value"
    except _DuplicateKey as exc:
        # json.loads keeps the last of two equal keys: the answer would
        # silently be to a question the client may not have meant.
        shown = json.dumps(_shorten(exc.args[0]), ensure_ascii=False)
        return 422, "validation_error", f"the request body names {shown} more than once; send each field once"
    except UnicodeDecodeError as exc:
        return 400, "invalid_json", (f"the request body is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                                     f"offset {exc.start}); send JSON encoded as UTF-8")
    except RecursionError:
        return 400, "invalid_json", TOO_DEEP
    except ValueError as exc:
        if "digits" in str(exc):  # Python's limit on integer digits (CVE-2020-10735)
            return 400, "invalid_json", "the request body holds a number of over 4,300 digits"
    return None


def _endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    # Swagger UI's own pages and files count as the docs.
    return "/docs" if path.startswith(DOCS_ASSETS + "/") or path == "/docs/oauth2-redirect" else "unmatched"


def _app_path(scope) -> str:
    """The path within the app: Serve (under a route prefix) keeps the
    prefix in `path` and puts it in `root_path` too."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _header(scope, name: bytes) -> str:
    return dict(scope.get("headers") or ()).get(name, b"").decode("latin-1")


def _content_type(scope) -> str:
    return _header(scope, b"content-type").split(";", 1)[0].strip().lower()


def _is_json(scope) -> bool:
    """A JSON media type, or none at all (clients that send none mean JSON here)."""
    media = _content_type(scope)
    return media in ("", "application/json") or media.endswith("+json")


def create_api(service: QAService, settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Runs on the serving event loop (Serve runs it in each ingress
        # replica), where the service's background index watcher must live.
        await service.start(settings.startup_index_wait_s)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPIOffline(
        redoc_url=None,
        static_url=DOCS_ASSETS,
        lifespan=lifespan,
        title="shardqa",
        version="1",
        description="Extractive question answering over a sharded, pre-tokenised index.",
        # A body without a Content-Type is read as JSON (RequestGate refuses
        # every other non-JSON type with 415 first).
        strict_content_type=False,
        # /v1/index/ is not an endpoint: a JSON 404 naming it, not an empty
        # 307 to an absolute URL that may be wrong behind a proxy.
        redirect_slashes=False,
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, code, message = _describe_validation(exc, request.url.path)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == _UNDECODABLE_BODY:
            # body_problem names these before FastAPI parses; a body nested
            # right at the parser's depth limit can still end here.
            return error_response(400, "invalid_json", TOO_DEEP)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        # Starlette's own headers, such as a 405's Allow, which HTTP requires.
        headers = dict(getattr(exc, "headers", None) or {})
        message = str(exc.detail)
        path = _shorten(request.url.path, 100)
        if exc.status_code == 404 and message == "Not Found":
            # A mount (Swagger UI's files) extends root_path; app_root_path is the app's own.
            root = request.scope.get("app_root_path", request.scope.get("root_path", ""))
            message = f"nothing at {path} (the endpoints are listed at {root}/docs)"
        elif exc.status_code == 405:
            # Starlette's Allow names the first route of the path only (GET,
            # not the HEAD beside it); Swagger UI's files have no route.
            allowed = sorted({m for r in app.routes if getattr(r, "path", None) == _app_path(request.scope)
                              for m in getattr(r, "methods", None) or ()})
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            allowed = allowed or [m.strip() for m in headers.get("Allow", headers.get("allow", "")).split(",") if m.strip()]
            message = f"{request.method} is not allowed on {path}" + (f"; use {' or '.join(allowed)}" if allowed else "")
        return error_response(exc.status_code, code, message, headers=headers or None)

    @app.exception_handler(ShardQAError)
    async def on_shardqa_error(request: Request, exc: ShardQAError):
        # Errors from shard replicas arrive unwrapped (services/shard_client.py),
        # so the message is the error's own, never Ray's remote traceback.
        return error_response(exc.http_status, exc.code, str(exc))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s", request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")

    @app.post("/v1/answer", response_model=AnswerResponse, responses=ERRORS, summary="Answer one question")
    async def answer(body: AnswerRequest, request: Request):
        outcome = await service.answer(body.question, body.top_k)
        # The metrics' `cached` label: only real hits, so a request that
        # waited on an identical computation does not count as a fast one.
        request.state.cached = outcome.hit
        return Response(outcome.body(), media_type=JSON)

    @app.post("/v1/answer:batch", response_model=BatchAnswerResponse, responses=ERRORS, summary="Answer many questions")
    async def answer_batch(body: BatchAnswerRequest):
        outcomes = await service.answer_many(body.questions, body.top_k)
        return Response(b'{"results":[%s]}' % b",".join(o.body() for o in outcomes), media_type=JSON)

    @app.get("/v1/index", response_model=IndexInfo, responses={503: ERRORS[503]}, summary="The index being served")
    async def index():
        return service.index_info()

    @app.get("/healthz", response_model=Health, summary="Liveness: the ingress is up")
    async def healthz():
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready"}},
        summary="Readiness: the index is loaded and every shard has a live replica holding it",
    )
    async def readyz():
        r = await service.readiness()
        body = {"ready": r.ready, "reason": r.reason, "index_version": r.index_version, "shards": r.shards,
                "not_served": r.not_served}
        return Response(json.dumps(body).encode(), status_code=200 if r.ready else 503, media_type=JSON)

    @app.get("/metrics", summary="Prometheus metrics of this ingress replica", response_class=Response)
    async def prometheus_metrics():
        body, content_type = metrics.metrics_response()
        return Response(body, media_type=content_type)

    # HEAD as the same GET (the server sends no body): uptime checkers and
    # load balancers probe with it. Left out of the OpenAPI document.
    for path, endpoint in (("/v1/index", index), ("/healthz", healthz), ("/readyz", readyz), ("/metrics", prometheus_metrics)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    for route in app.routes:  # the Swagger UI page, as /openapi.json already is
        if getattr(route, "path", None) == "/docs" and "GET" in getattr(route, "methods", ()):
            route.methods.add("HEAD")

    app.add_middleware(RequestGate, max_body_bytes=settings.max_body_bytes)
    document_limits(app, settings)
    return app


def document_limits(app: FastAPI, settings: Settings) -> None:
    """The request limits in force, in the OpenAPI document: they are
    settings, so the models cannot state them, and a client generated from
    the document (or a fuzzer) should know them without reading the README."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            schemas = doc["components"]["schemas"]
            question = {"minLength": 1, "maxLength": settings.max_question_chars}
            top_k = {"minimum": 1, "maximum": settings.max_top_k}
            one = schemas["AnswerRequest"]["properties"]
            one["question"].update(question)
            one["top_k"].update(top_k)
            many = schemas["BatchAnswerRequest"]["properties"]
            many["questions"].update(minItems=1, maxItems=settings.max_batch_questions)
            many["questions"]["items"].update(question)
            many["top_k"].update(top_k)
        return app.openapi_schema

    app.openapi = openapi
