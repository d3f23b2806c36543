"""Fuzzing the REST API over real HTTP on loopback.

The service here is the real ingress app (`create_api` over a `QAService`)
with a real index of the shipped sample corpus, the real router, reader
(tiny model) and in-process answer cache — the shards run in-process instead
of in Ray Serve replicas, behind the same FastAPI app — served by uvicorn on
127.0.0.1. Two kinds of cases:

* schemathesis, generating positive and negative requests from the service's
  own /openapi.json (bounded examples per operation);
* hand-written hostile requests: huge bodies, deeply nested JSON, invalid
  UTF-8, control characters and lone surrogates, 10k-character questions,
  wrong types and media types, concurrent duplicate questions.

Every response must be a status the OpenAPI document lists for that
operation, never a 5xx, always the JSON error shape for 4xx; the service
must still answer afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-bert-qa"
SAMPLE = ROOT / "samples" / "squad-dev-sample.json"
MAX_BODY = 16 * 1024
KNOWN_QUESTION = "In what country is Normandy located?"


class LoopbackServer:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    from shardqa.preprocessing.build import build_index
    from shardqa.preprocessing.store import open_store
    from shardqa.services.api import create_api
    from shardqa.services.qa_service import QAService
    from shardqa.services.reader import Reader
    from shardqa.services.service_config import settings_with
    from shardqa.services.shard_client import LocalShards
    from shardqa.services.shard_worker import ShardWorker

    store_dir = tmp_path_factory.mktemp("fuzz-index")
    build_index(SAMPLE, str(store_dir), 2, str(TINY))
    settings = settings_with({"model": str(TINY), "store": str(store_dir), "backend": "torch", "route_k": 3,
                              "max_body_bytes": MAX_BODY})
    reader = Reader.load(settings=settings, threads=1)
    store = open_store(str(store_dir))
    service = QAService.create(settings, LocalShards([ShardWorker(s, reader, store) for s in range(2)]))
    server = LoopbackServer(create_api(service, settings))
    server.start()
    try:
        deadline = time.monotonic() + 120
        while httpx.get(server.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(server.url + "/readyz").text
            time.sleep(0.2)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def openapi(service_url) -> dict:
    return httpx.get(service_url + "/openapi.json").json()


def documented(openapi: dict, method: str, path: str) -> set[int]:
    op = openapi["paths"][path][method.lower()]
    return {int(code) for code in op["responses"] if code.isdigit()}


def check(openapi: dict, method: str, path: str, resp: httpx.Response) -> None:
    """A documented status, never 5xx, and the JSON error shape for every 4xx."""
    allowed = documented(openapi, method, path)
    assert resp.status_code < 500, f"{method} {path} -> {resp.status_code}: {resp.text[:300]}"
    assert resp.status_code in allowed, f"{method} {path} -> {resp.status_code} not in {sorted(allowed)}: {resp.text[:300]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert "Traceback" not in resp.text


def assert_alive(url: str) -> None:
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    r = httpx.post(url + "/v1/answer", json={"question": KNOWN_QUESTION})
    assert r.status_code == 200 and r.json()["answers"], r.text


# --- schemathesis from the service's own OpenAPI document ----------------------------------

SCHEMATHESIS_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
                       "response_schema_conformance", "negative_data_rejection")


def test_schemathesis_against_the_openapi_document(service_url, tmp_path):
    """schemathesis's own runner (its CLI), positive and negative data for every
    operation of /openapi.json, bounded in examples and time."""
    st = Path(sys.executable).with_name("st")
    # A body over max_body_bytes is refused with 413 before it is parsed: a
    # rejection too (schemathesis expects 400/422 and the like of invalid data
    # such as a list longer than the document's maxItems).
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "404", "405", "413", "415", "422"]\n')
    cmd = [str(st), "--config-file", str(config), "run", service_url + "/openapi.json", "--checks", ",".join(SCHEMATHESIS_CHECKS),
           "--mode", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--max-time", "180",
           "--request-timeout", "30", "--seed", "7", "--generation-database", "none", "--workers", "2",
           "--no-color", "--report", "junit", "--report-junit-path", str(tmp_path / "schemathesis.xml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    report = (tmp_path / "schemathesis.xml").read_text()
    # Every operation was exercised: one test case element per operation in the report.
    for operation in ("POST /v1/answer", "POST /v1/answer:batch", "GET /v1/index", "GET /healthz", "GET /readyz", "GET /metrics"):
        assert operation in report, operation


def test_alive_after_schemathesis(service_url):
    assert_alive(service_url)


# --- hand-written hostile requests --------------------------------------------------------------

def post_raw(url: str, path: str, body: bytes, content_type: str = "application/json", headers=None) -> httpx.Response:
    h = {"content-type": content_type, **(headers or {})}
    return httpx.post(url + path, content=body, headers=h, timeout=30)


@pytest.mark.parametrize("path", ["/v1/answer", "/v1/answer:batch"])
@pytest.mark.parametrize(
    "name, body",
    [
        ("huge body (1 MB)", b'{"question": "' + b"a" * (1 << 20) + b'"}'),
        ("just over the limit", b'{"question": "' + b"a" * MAX_BODY + b'"}'),
        ("nested arrays 20k deep", b"[" * 7000 + b"]" * 7000),
        ("nested objects in the question", b'{"question": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}"),
        ("nested arrays in top_k", b'{"question": "who?", "top_k": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("invalid UTF-8", b'{"question": "Who \xff\xfe ruled \xc3\x28 Normandy?"}'),
        ("truncated UTF-8", b'{"question": "Norman\xe2\x82"}'),
        ("UTF-16 with BOM", '{"question": "Who ruled Normandy?"}'.encode("utf-16")),
        ("lone surrogate escape", b'{"question": "Who ruled \\ud800 Normandy?"}'),
        ("reversed surrogate pair", b'{"question": "\\udc00\\ud800"}'),
        ("NUL and control characters", json.dumps({"question": "Who\x00 ruled\x01\x02\x1b[31m Normandy\x7f?\r\n\t"}).encode()),
        ("only control characters", json.dumps({"question": "\x00\x01\x02\x03"}).encode()),
        ("only zero-width characters", json.dumps({"question": "\u200b\u200c\u200d\ufeff"}).encode()),
        ("only punctuation", json.dumps({"question": "?!?..."}).encode()),
        ("bidi overrides", json.dumps({"question": "\u202eWho ruled Normandy?\u202c"}).encode()),
        ("10k-character question", json.dumps({"question": "Who ruled Normandy? " * 500}).encode()),
        ("1000 characters, many tokens", json.dumps({"question": "\U0001f600" * 999 + "?"}).encode()),
        ("question is a number", b'{"question": 12345}'),
        ("question is null", b'{"question": null}'),
        ("question is a list", b'{"question": ["Who", "ruled"]}'),
        ("top_k huge", b'{"question": "Who ruled Normandy?", "top_k": 1e308}'),
        ("top_k negative", b'{"question": "Who ruled Normandy?", "top_k": -1}'),
        ("top_k big integer", b'{"question": "Who ruled Normandy?", "top_k": ' + b"9" * 4000 + b"}"),
        ("top_k NaN", b'{"question": "Who ruled Normandy?", "top_k": NaN}'),
        ("top_k Infinity", b'{"question": "Who ruled Normandy?", "top_k": Infinity}'),
        ("top_k string", b'{"question": "Who ruled Normandy?", "top_k": "3"}'),
        ("top_k bool", b'{"question": "Who ruled Normandy?", "top_k": true}'),
        ("unknown field", b'{"question": "Who ruled Normandy?", "debug": true}'),
        ("duplicate keys", b'{"question": "Who ruled Normandy?", "question": ""}'),
        ("top-level array", b'["Who ruled Normandy?"]'),
        ("top-level string", b'"Who ruled Normandy?"'),
        ("JSON null", b"null"),
        ("empty body", b""),
        ("whitespace body", b" \n\t "),
        ("garbage", b"\x00\x01\x02\xff" * 100),
        ("trailing garbage", b'{"question": "Who ruled Normandy?"} {"x": 1}'),
        ("batch of 10k questions", json.dumps({"questions": ["q?"] * 10000}).encode()[:MAX_BODY - 10] + b'"]}'),
        ("batch of 100 questions", json.dumps({"questions": [f"Who ruled Normandy {i}?" for i in range(100)]}).encode()),
        ("batch empty", b'{"questions": []}'),
        ("batch with hostile members", json.dumps({"questions": ["ok?", "", "\x00", 5, None, "a" * 5000]}).encode()),
    ],
)
def test_hostile_bodies(service_url, openapi, path, name, body):
    resp = post_raw(service_url, path, body)
    check(openapi, "POST", path, resp)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", "application/xml", ""])
def test_wrong_media_types(service_url, openapi, content_type):
    body = b'{"question": "Who ruled Normandy?"}' if "json" in content_type else b"question=Who+ruled+Normandy%3F"
    resp = post_raw(service_url, "/v1/answer", body, content_type=content_type)
    check(openapi, "POST", "/v1/answer", resp)


def test_chunked_body_over_the_limit_without_content_length(service_url, openapi):
    def chunks():
        yield b'{"question": "'
        for _ in range(64):
            yield b"a" * 4096
        yield b'"}'

    resp = httpx.post(service_url + "/v1/answer", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    check(openapi, "POST", "/v1/answer", resp)
    assert resp.status_code == 413


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", str(10**30)])
def test_lying_content_length(service_url, openapi, value):
    """A Content-Length that is not a small non-negative integer, over a raw socket."""
    body = b'{"question": "Who ruled Normandy?"}'
    request = (f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {value}\r\nConnection: close\r\n\r\n").encode() + body
    port = int(service_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if data:  # the HTTP layer may also just drop a request it cannot parse; never a 5xx
        status = int(data.split(b" ", 2)[1])
        assert status < 500, data[:300]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_methods_and_paths(service_url, method):
    for path in ("/v1/answer", "/v1/answer:batch", "/v1/nothing", "/v1/answer/../index", "/%ff%fe", "/" + "a" * 4000):
        resp = httpx.request(method, service_url + path, timeout=30)
        assert 400 <= resp.status_code < 500 or (method == "GET" and resp.status_code == 200), (method, path, resp.status_code)
        if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
            assert "error" in resp.json()


def test_hostile_query_strings_on_gets(service_url, openapi):
    for path in ("/healthz", "/readyz", "/v1/index", "/metrics"):
        resp = httpx.get(service_url + path, params={"x": "\x00" * 10, "y": "a" * 4000, "\ud7ff": "\U0001f600"}, timeout=30)
        assert resp.status_code in documented(openapi, "GET", path), (path, resp.status_code)
        assert resp.status_code < 500


def test_concurrent_duplicate_questions_run_inference_once(service_url, openapi):
    question = "When were the Normans in Normandy, asked many times at once?"

    async def go():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(service_url + "/v1/answer", json={"question": question})
                                          for _ in range(48)))

    responses = asyncio.run(go())
    for r in responses:
        check(openapi, "POST", "/v1/answer", r)
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert len({json.dumps(b["answers"], sort_keys=True) for b in bodies}) == 1  # one answer for everyone
    assert sum(not b["cached"] for b in bodies) == 1  # single-flight: one request ran inference


def test_concurrent_mixed_hostile_traffic(service_url, openapi):
    """Valid and hostile requests interleaved from many connections at once."""
    bodies = [
        json.dumps({"question": KNOWN_QUESTION}).encode(),
        b'{"question": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"question": "x" * 10000}).encode(),
        b'{"question": "Who ruled \\ud800?"}',
        json.dumps({"question": f"Who ruled Normandy in year {1000}?", "top_k": 3}).encode(),
    ]

    async def go():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post(service_url + "/v1/answer", content=bodies[i % len(bodies)],
                                                      headers={"content-type": "application/json"}) for i in range(60)))

    for r in asyncio.run(go()):
        check(openapi, "POST", "/v1/answer", r)


def test_alive_after_hostile_requests(service_url):
    assert_alive(service_url)
