"""The HTTP API's contract for client mistakes, in-process (no Ray): every
error is `{"error": {"code", "message"}}` with the right 4xx, never a 5xx or a
stack trace, and the OpenAPI document describes the endpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shardqa.services.api import create_api
from shardqa.services.qa_service import QAService
from shardqa.services.service_config import settings_with
from shardqa.services.shard_client import LocalShards

TINY = Path(__file__).parent / "fixtures" / "tiny-bert-qa"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # A service over an empty store: requests that pass validation get 503.
    store = tmp_path_factory.mktemp("empty-store")
    settings = settings_with(
        {"model": str(TINY), "store": str(store), "max_body_bytes": 4096, "max_question_chars": 200, "max_batch_questions": 4}
    )
    service = QAService.create(settings, LocalShards([]))
    with TestClient(create_api(service, settings), raise_server_exceptions=False) as c:
        yield c


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text and body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"question": ""}, 400, "invalid_question"),
        ({"question": "   \n"}, 400, "invalid_question"),
        ({"question": "\x00\x01\u200b"}, 400, "invalid_question"),
        ({"question": "why? " * 100}, 400, "question_too_long"),
        ({"question": 42}, 422, "validation_error"),
        ({"question": None}, 422, "validation_error"),
        ({"question": ["a"]}, 422, "validation_error"),
        ({"question": "Who?", "top_k": "3"}, 422, "validation_error"),
        ({"question": "Who?", "top_k": 1.5}, 422, "validation_error"),
        ({"question": "Who?", "top_k": True}, 422, "validation_error"),
        ({"question": "Who?", "top_k": 0}, 422, "invalid_request"),
        ({"question": "Who?", "top_k": 11}, 422, "invalid_request"),
        ({"question": "Who?", "context": "x"}, 422, "validation_error"),
        ({}, 422, "validation_error"),
        ([], 422, "validation_error"),
        ("just a string", 422, "validation_error"),
    ],
)
def test_answer_refuses_client_mistakes(client, body, status, code):
    assert_error(client.post("/v1/answer", json=body), status, code)


def test_messages_name_the_field(client):
    assert "unknown field" in assert_error(client.post("/v1/answer", json={"question": "Who?", "contxt": 1}), 422, "validation_error")
    assert "contxt" in client.post("/v1/answer", json={"question": "Who?", "contxt": 1}).json()["error"]["message"]
    assert "top_k" in assert_error(client.post("/v1/answer", json={"question": "Who?", "top_k": "1"}), 422, "validation_error")
    assert "field required" in assert_error(client.post("/v1/answer", json={"top_k": 1}), 422, "validation_error")


def test_malformed_json_is_400(client):
    r = client.post("/v1/answer", content=b'{"question": "Who', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"])
def test_a_body_not_sent_as_json_is_415_naming_the_content_type(client, content_type):
    for path in ("/v1/answer", "/v1/answer:batch"):
        r = client.post(path, content=b'{"question": "Who ruled Normandy?"}', headers={"content-type": content_type})
        message = assert_error(r, 415, "unsupported_media_type")
        assert "application/json" in message and content_type.split(";")[0] in message


def test_other_methods_on_the_answer_routes_stay_405_whatever_their_body(client):
    r = client.put("/v1/answer", content=b"question=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 405, "method_not_allowed")
    r = client.put("/v1/answer", content=b'{"question": "a", "question": "b"}', headers={"content-type": "application/json"})
    assert_error(r, 405, "method_not_allowed")


def test_the_api_s_paths_are_read_below_serve_s_route_prefix():
    from shardqa.services.api import _app_path

    assert _app_path({"path": "/qa/v1/answer", "root_path": "/qa"}) == "/v1/answer"
    assert _app_path({"path": "/qa", "root_path": "/qa"}) == "/"
    assert _app_path({"path": "/v1/answer", "root_path": ""}) == "/v1/answer"


def test_json_media_types_and_none_at_all_are_read_as_json(client):
    for content_type in ("application/json; charset=utf-8", "application/problem+json", None):
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/v1/answer", content=b'{"question": "Who ruled Normandy?"}', headers=headers)
        assert_error(r, 503, "unavailable")  # past validation: this service has no index


@pytest.mark.parametrize("body", [b"[]", b'"Who?"', b"null", b"42"])
def test_a_body_that_is_not_a_json_object_says_so(client, body):
    message = assert_error(client.post("/v1/answer", content=body, headers={"content-type": "application/json"}), 422, "validation_error")
    assert "must be a JSON object" in message


def test_a_body_that_is_not_utf8_is_invalid_json_naming_the_encoding(client):
    r = client.post("/v1/answer", content=b'{"question": "Who \xff?"}', headers={"content-type": "application/json"})
    assert assert_error(r, 400, "invalid_json") == "the request body is not UTF-8 text (byte 0xff at offset 18); send JSON encoded as UTF-8"


def test_body_too_large_is_413(client):
    assert_error(client.post("/v1/answer", json={"question": "x" * 5000}), 413, "request_too_large")


def test_body_too_large_without_content_length_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_batch_refuses_bad_questions_with_their_position(client):
    msg = assert_error(client.post("/v1/answer:batch", json={"questions": ["Who?", ""]}), 400, "invalid_question")
    assert msg.startswith("questions[1]")
    assert_error(client.post("/v1/answer:batch", json={"questions": []}), 422, "invalid_request")
    assert_error(client.post("/v1/answer:batch", json={"questions": ["a?"] * 5}), 422, "invalid_request")
    assert_error(client.post("/v1/answer:batch", json={"questions": "Who?"}), 422, "validation_error")
    # The model's type checks name a position as the service's own checks do.
    msg = assert_error(client.post("/v1/answer:batch", json={"questions": ["Who?", 3]}), 422, "validation_error")
    assert msg == "questions[1]: Input should be a valid string"


def test_valid_requests_without_an_index_get_503(client):
    msg = assert_error(client.post("/v1/answer", json={"question": "Who gave their name to Normandy?"}), 503, "unavailable")
    assert "index" in msg
    assert_error(client.get("/v1/index"), 503, "unavailable")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False and "index" in r.json()["reason"]


def test_unknown_paths_and_methods(client):
    assert assert_error(client.get("/v2/answer"), 404, "not_found") == "nothing at /v2/answer (the endpoints are listed at /docs)"
    r = client.get("/v1/answer")
    assert assert_error(r, 405, "method_not_allowed") == "GET is not allowed on /v1/answer; use POST"
    assert r.headers["allow"] == "POST"
    r = client.post("/healthz", json={})
    assert assert_error(r, 405, "method_not_allowed") == "POST is not allowed on /healthz; use GET or HEAD"
    assert r.headers["allow"] == "GET, HEAD"


def test_an_empty_body_is_named_as_such(client):
    r = client.post("/v1/answer", content=b"", headers={"content-type": "application/json"})
    assert assert_error(r, 422, "validation_error") == 'the request body is empty: send a JSON object, like {"question": "..."}'
    r = client.post("/v1/answer:batch", content=b"", headers={"content-type": "application/json"})
    assert assert_error(r, 422, "validation_error").endswith('like {"questions": ["...", "..."]}')


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/metrics")
    assert r.status_code == 200 and "shardqa_requests_total" in r.text
    # Requests are counted by route, refused ones included.
    assert 'endpoint="/v1/answer"' in r.text and 'status="422"' in r.text


def test_openapi_describes_the_api(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/v1/answer", "/v1/answer:batch", "/v1/index", "/healthz", "/readyz", "/metrics"} <= set(paths)
    answer = paths["/v1/answer"]["post"]
    schema_ref = answer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request_schema = doc["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert set(request_schema["properties"]) == {"question", "top_k"}
    assert request_schema.get("additionalProperties") is False
    # The limits in force, from this app's settings (max_question_chars 200,
    # max_batch_questions 4, max_top_k default 10).
    assert request_schema["properties"]["top_k"]["minimum"] == 1
    assert request_schema["properties"]["top_k"]["maximum"] == 10
    assert request_schema["properties"]["question"]["maxLength"] == 200
    batch = doc["components"]["schemas"]["BatchAnswerRequest"]["properties"]
    assert batch["questions"]["maxItems"] == 4
    assert batch["questions"]["items"]["maxLength"] == 200
    assert batch["questions"]["items"]["minLength"] == 1
    assert {"200", "400", "413", "422", "503"} <= set(answer["responses"])
    ok = answer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(doc["components"]["schemas"][ok]["properties"]) == {"answers", "cached", "index_version"}
    item = doc["components"]["schemas"]["AnswerItem"]["properties"]
    assert set(item) == {"text", "score", "doc_id", "passage_id", "start", "end", "shard"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    json.dumps(doc)  # the document is plain JSON


def test_docs_page_loads_swagger_ui_from_the_app_not_a_cdn(client):
    import re

    page = client.get("/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    scripts_and_styles = [a for a in assets if a.endswith((".js", ".css"))]
    assert scripts_and_styles and all(a.startswith("/docs/assets/") for a in scripts_and_styles), assets
    assert "cdn." not in page
    for asset in scripts_and_styles:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    missing = client.get("/docs/assets/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_merge_ranks_on_span_logit_plus_route_prior_and_drops_repeated_texts():
    from shardqa.services.qa_service import merge_answers
    from shardqa.types import Answer, RoutedPassage, RouteResult

    route = RouteResult("q", [RoutedPassage("a", "d1", 0, "{s0}", 2.0), RoutedPassage("b", "d2", 1, "{s1}", 1.0)])
    answers = [
        # the second passage's span is a confident probability but a weak logit
        Answer("Paris", 0.99, 0, 5, passage_id="b", logit=9.0),
        Answer("France", 0.40, 0, 6, passage_id="a", logit=8.0),
        Answer("france", 0.30, 9, 15, passage_id="b", logit=7.5),
    ]
    assert [a.text for a in merge_answers(answers, route, 3, route_weight=0.0)] == ["Paris", "France"]
    ranked = merge_answers(answers, route, 3, route_weight=4.0)
    assert [a.text for a in ranked] == ["France", "Paris"]  # 8 + 4 = 12 > 9 + 2 = 11
    # scores: softmax of the ranking keys over the distinct candidates (12, 11)
    assert ranked[0].score == pytest.approx(1 / (1 + math.exp(-1)))
    assert ranked[1].score == pytest.approx(math.exp(-1) / (1 + math.exp(-1)))
    assert len(merge_answers(answers, route, 1, route_weight=4.0)) == 1


def test_merge_drops_the_zero_probability_padding_of_short_windows():
    """A window of a few tokens offers fewer real spans than asked for; the
    rest are probability-0 padding (reversed spans, the [CLS] position) with
    empty text and a margin near 0 that would outrank real spans."""
    from shardqa.services.qa_service import merge_answers
    from shardqa.types import Answer, RoutedPassage, RouteResult

    route = RouteResult("q", [RoutedPassage("a", "d1", 0, "{s0}", 1.0)])
    answers = [
        Answer("", 0.0, 0, 0, passage_id="a", logit=0.0),
        Answer("", 0.0, 19, 5, passage_id="a", logit=-8.9),
        Answer("Paris", 0.77, 0, 5, passage_id="a", logit=-1.5),
        Answer("Paris.", 0.2, 0, 6, passage_id="a", logit=-2.5),
    ]
    assert [a.text for a in merge_answers(answers, route, 5, route_weight=10.0)] == ["Paris", "Paris."]
    # The reader's deliberate null answer (no passage) is kept.
    null = Answer("", 0.6, 0, 0, logit=0.0)
    assert [a.text for a in merge_answers([null, answers[2]], route, 5, route_weight=0.0)] == ["", "Paris"]


def test_a_shards_own_error_crosses_the_handle_without_ray_s_traceback():
    import asyncio

    from ray.exceptions import RayTaskError

    from shardqa.errors import IndexNotFound
    from shardqa.services.shard_client import ServeShards

    original = IndexNotFound("shard 0 has no passage 'x' in index version v1")
    wrapped = RayTaskError("ServeReplica:shard-0", "Traceback (most recent call last):\n  File ...", original).as_instanceof_cause()

    class Method:
        def remote(self, *args):
            async def fail():
                raise wrapped

            return fail()

    class Handle:
        answer = Method()

        def options(self, **_):
            return self

    with pytest.raises(IndexNotFound) as info:
        asyncio.run(ServeShards([Handle()]).answer(0, None))
    assert type(info.value) is IndexNotFound and "Traceback" not in str(info.value)
    assert str(info.value) == str(original)
    # Anything else from Ray still surfaces as itself.
    wrapped_other = RayTaskError("f", "tb", ValueError("boom")).as_instanceof_cause()
    Method.remote = lambda self, *a: (_ for _ in ()).throw(wrapped_other)
    with pytest.raises(RayTaskError):
        asyncio.run(ServeShards([Handle()]).answer(0, None))


def test_a_shard_that_cannot_take_requests_is_a_503_and_a_lost_replica_is_retried():
    """Serve's own refusals (a deployment that failed to deploy, a full
    queue) are the service being unavailable, never an internal error; a
    replica that went away is asked again."""
    import asyncio

    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
    from ray.serve._private.common import DeploymentID

    from shardqa.errors import ServiceUnavailable
    from shardqa.services.shard_client import ServeShards

    raised = []

    class Method:
        def __init__(self, errors):
            self.errors = list(errors)

        def remote(self, *args):
            async def call():
                if self.errors:
                    raised.append(self.errors[0])
                    raise self.errors.pop(0)
                return ["answered"]

            return call()

    class Handle:
        def __init__(self, errors):
            self.answer = Method(errors)
            self.status = self.answer

        def options(self, **_):
            return self

    refused = DeploymentUnavailableError(DeploymentID(name="shard-0", app_name="shardqa"))
    with pytest.raises(ServiceUnavailable, match="shard 0 cannot take requests .*DeploymentUnavailableError.*failed to deploy"):
        asyncio.run(ServeShards([Handle([refused])]).answer(0, None))
    with pytest.raises(ServiceUnavailable, match="BackPressureError"):
        asyncio.run(ServeShards([Handle([BackPressureError(10, 10)])]).answer(0, None))
    assert asyncio.run(ServeShards([Handle([ReplicaUnavailableError("r1")])]).answer(0, None)) == ["answered"]
    assert [type(e).__name__ for e in raised][-1] == "ReplicaUnavailableError"
    # A timeout from inside Ray on a call without a timeout of its own.
    with pytest.raises(ServiceUnavailable, match=r"^shard 0 did not answer$"):
        asyncio.run(ServeShards([Handle([asyncio.TimeoutError()])]).answer(0, None))


def test_shard_handles_call_over_the_configured_transport():
    from shardqa.services.shard_client import ServeShards, transport_options

    class Handle:
        def __init__(self, opts=None):
            self.opts = opts or {}

        def options(self, **kw):
            return Handle(self.opts | kw)

    assert [h.opts for h in ServeShards([Handle(), Handle()]).handles] == [{"_by_reference": False}] * 2
    assert ServeShards([Handle()], transport="actor").handles[0].opts == {"_by_reference": True}
    with pytest.raises(ValueError, match="unknown shard transport 'http'"):
        transport_options(Handle(), "http")


def test_only_passages_near_the_best_route_score_are_read():
    from shardqa.services.qa_service import passages_to_read
    from shardqa.types import RoutedPassage

    ps = [RoutedPassage(f"p{i}", "d", i % 2, "{s0}", s) for i, s in enumerate([2.0, 1.9, 1.7, 0.5])]
    assert [p.passage_id for p in passages_to_read(ps, 0.9)] == ["p0", "p1"]
    assert [p.passage_id for p in passages_to_read(ps, 0.0)] == ["p0", "p1", "p2", "p3"]
    assert passages_to_read([], 0.9) == []
    # the best passage is always read
    assert [p.passage_id for p in passages_to_read(ps, 1.0)] == ["p0"]


class _FakeRouter:
    """A router whose route() is the given function of the question."""

    encoder = None

    def __init__(self, route):
        self._route = route

    def route(self, question, k):
        return self._route(question)


def _slow_route(question):
    import time

    from shardqa.types import RouteResult

    time.sleep(0.5)  # the dense encoder on a busy machine, or worse
    return RouteResult(question, [])


def _bare_service(route=None, **overrides):
    """A QAService serving a hand-made index view whose router calls `route`,
    for tests of the service's own logic."""
    from shardqa.services.qa_service import IndexView

    settings = settings_with({"model": str(TINY), "store": "unused", **overrides})
    service = QAService.create(settings, LocalShards([]))
    service.view = IndexView("v1", manifest=None, router=_FakeRouter(route) if route else None)
    return service


def test_cache_scope_names_the_model_and_the_reading_settings():
    service = _bare_service()
    service.answer_fingerprint = "model-a@123/onnx-int8"
    scope = service._scope(service.view)
    assert scope == service._scope(service.view)
    service.answer_fingerprint = "model-a@456/onnx-int8"  # retrained weights, same name
    assert service._scope(service.view) != scope
    other = _bare_service(merge_route_weight=3.0)
    other.answer_fingerprint = "model-a@123/onnx-int8"
    assert other._scope(other.view) != scope


def test_routing_runs_off_the_event_loop():
    """A slow route must not hold up cache hits that arrive meanwhile."""
    import asyncio

    from shardqa.services.answer_cache import cache_key

    service = _bare_service(_slow_route)

    async def scenario():
        await service.cache.backend.set(cache_key("v1", "Who won?", 1, ""), b"[]", 60)
        slow = asyncio.ensure_future(service.answer("Who lost the battle?"))
        await asyncio.sleep(0.05)
        hit = await service.answer("Who won?")
        routing_still_running = not slow.done()
        assert (await slow).answers_json == b"[]"
        await service.stop()
        return hit, routing_still_running

    hit, routing_still_running = asyncio.run(scenario())
    assert hit.cached and routing_still_running


def test_a_stuck_answer_is_a_503_after_answer_timeout_s():
    import asyncio

    from shardqa.errors import ServiceUnavailable

    service = _bare_service(_slow_route, answer_timeout_s=0.1)

    async def scenario():
        try:
            with pytest.raises(ServiceUnavailable, match="no answer within 0.1 s"):
                await service.answer("Who lost the battle?")
            assert not service.cache._inflight  # the question is free for the next request
        finally:
            await service.stop()

    asyncio.run(scenario())


def test_a_timeout_inside_the_answer_is_not_reported_as_the_answer_deadline():
    import asyncio

    def broken(question):
        raise TimeoutError("a bug's own timeout")

    service = _bare_service(broken, answer_timeout_s=30)

    async def scenario():
        try:
            with pytest.raises(TimeoutError, match="a bug's own timeout"):
                await service.answer("Who lost the battle?")
        finally:
            await service.stop()

    asyncio.run(scenario())


def test_unknown_fields_are_named_even_when_empty_or_huge(client):
    message = assert_error(client.post("/v1/answer", json={"": 1, "question": "Who?"}), 422, "validation_error")
    assert message == '"": unknown field'
    long_key = "k" * 3_000  # within the fixture's 4,096-byte body limit
    message = assert_error(client.post("/v1/answer", json={long_key: 1, "question": "Who?"}), 422, "validation_error")
    assert message.startswith("k" * 57 + "...: unknown field") and len(message) < 200


@pytest.mark.parametrize("path, body, key", [
    ("/v1/answer", '{"question": "Who lost?", "question": "Who won?"}', '"question"'),
    ("/v1/answer", '{"question": "Who?", "top_k": 1, "top_k": 5}', '"top_k"'),
    ("/v1/answer:batch", '{"questions": ["Who?"], "top_k": 1, "top_k": 2}', '"top_k"'),
    ("/v1/answer", '{"question": "Who?", "x": {"a": 1, "a": 2}}', '"a"'),
])
def test_a_key_sent_twice_is_refused_not_silently_overwritten(client, path, body, key):
    message = assert_error(client.post(path, content=body, headers={"content-type": "application/json"}), 422, "validation_error")
    assert message == f"the request body names {key} more than once; send each field once"


def test_the_same_key_in_different_objects_is_not_a_duplicate(client):
    body = '{"question": "Who?", "x": {"question": 1}}'
    message = assert_error(client.post("/v1/answer", content=body, headers={"content-type": "application/json"}), 422, "validation_error")
    assert message == "x: unknown field"


def test_json_nested_too_deep_is_named_as_such(client):
    body = "[" * 2000 + "]" * 2000  # valid JSON, deeper than the parser's recursion limit
    message = assert_error(client.post("/v1/answer", content=body, headers={"content-type": "application/json"}), 400, "invalid_json")
    assert message == "the request body's JSON is nested deeper than the parser allows (about a thousand levels)"


def test_a_number_too_long_to_parse_is_named_as_such():
    # (Beyond the test app's 4,096-byte body limit, so asked of the check itself.)
    from shardqa.services.api import body_problem

    body = b'{"question": "Who?", "top_k": ' + b"9" * 5000 + b"}"
    assert body_problem(body) == (400, "invalid_json", "the request body holds a number of over 4,300 digits")
    assert body_problem(b'{"question": "Who?", "top_k": 3}') is None
    assert body_problem(b'{"question": ') is None  # malformed: FastAPI's own parse names where


def test_a_compressed_body_is_named_as_such(client):
    import gzip

    r = client.post("/v1/answer", content=gzip.compress(b'{"question": "Who?"}'),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert assert_error(r, 415, "unsupported_media_type") == "the request body is sent with Content-Encoding: gzip; send it uncompressed"
    r = client.post("/v1/answer", json={"question": "Who?"}, headers={"content-encoding": "identity"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"  # accepted; this app has no index


def test_a_body_in_utf16_is_refused_as_not_utf8(client):
    r = client.post("/v1/answer", content='{"question": "Who?"}'.encode("utf-16"), headers={"content-type": "application/json"})
    assert assert_error(r, 400, "invalid_json").startswith("the request body is not UTF-8 text (byte 0xff at offset 0)")


def test_a_404_under_a_route_prefix_points_at_the_prefixed_docs(client):
    assert assert_error(client.get("/v2/x"), 404, "not_found") == "nothing at /v2/x (the endpoints are listed at /docs)"
    # Serve mounts the app under its route prefix as the ASGI root_path.
    prefixed = TestClient(client.app, root_path="/qa", raise_server_exceptions=False)
    r = prefixed.get("/qa/v2/x")
    assert assert_error(r, 404, "not_found") == "nothing at /qa/v2/x (the endpoints are listed at /qa/docs)"
    # Under the mount that serves Swagger UI's files, the link is still the app's /docs.
    r = prefixed.get("/qa/docs/assets/nope.js")
    assert assert_error(r, 404, "not_found") == "nothing at /qa/docs/assets/nope.js (the endpoints are listed at /qa/docs)"
    r = client.get("/docs/assets/nope.js")
    assert assert_error(r, 404, "not_found") == "nothing at /docs/assets/nope.js (the endpoints are listed at /docs)"


def test_swagger_ui_pages_count_as_the_docs_endpoint():
    from shardqa.services.api import _endpoint_label

    assert _endpoint_label("/docs/oauth2-redirect") == _endpoint_label("/docs/assets/swagger-ui.css") == "/docs"
    assert _endpoint_label("/v1/answer") == "/v1/answer" and _endpoint_label("/v2/x") == "unmatched"


def test_a_trailing_slash_is_a_404_not_a_redirect(client):
    r = client.get("/v1/index/", follow_redirects=False)
    assert assert_error(r, 404, "not_found") == "nothing at /v1/index/ (the endpoints are listed at /docs)"
    r = client.post("/v1/answer/", json={"question": "Who?"}, follow_redirects=False)
    assert assert_error(r, 404, "not_found") == "nothing at /v1/answer/ (the endpoints are listed at /docs)"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(client, constant):
    r = client.post("/v1/answer", content='{"question": "Who?", "top_k": %s}' % constant, headers={"content-type": "application/json"})
    assert assert_error(r, 400, "invalid_json") == f"the request body is not valid JSON: {constant} is not a JSON value"


def test_a_405_on_swagger_ui_files_names_the_method(client):
    r = client.post("/docs/assets/swagger-ui.css", content=b"{}")
    assert assert_error(r, 405, "method_not_allowed").startswith("POST is not allowed on /docs/assets/swagger-ui.css")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/index", "/metrics"])
def test_head_is_answered_like_get_without_a_body(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert "head" not in client.get("/openapi.json").json()["paths"][path]


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_head_on_the_api_documents(client, path):
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200 and head.content == b""


def test_a_failed_shard_read_cancels_the_other_shards_reads():
    import asyncio

    from shardqa.errors import ServiceUnavailable
    from shardqa.types import RoutedPassage, RouteResult

    def two_shards(question):
        return RouteResult(question, [RoutedPassage("a", "d", 0, "{s0}", 1.0), RoutedPassage("b", "d", 1, "{s1}", 1.0)])

    service = _bare_service(two_shards, read_first_stop_logit=float("inf"), route_min_relative_score=0.0)
    cancelled = []

    class Shards:
        num_shards = 2

        async def answer(self, shard, query):
            if shard == 0:
                await asyncio.sleep(0.05)
                raise ServiceUnavailable("shard 0 has no live replica")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(shard)
                raise

    service.shards = Shards()

    async def scenario():
        try:
            with pytest.raises(ServiceUnavailable, match="shard 0"):
                await service.answer("Who lost the battle?")
            await asyncio.sleep(0.01)  # let the cancellation land
            assert cancelled == [1]  # at once, not when the loop closes
        finally:
            await service.stop()

    asyncio.run(scenario())
