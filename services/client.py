"""A small HTTP client of the service (`shardqa query`, the demo, tests)."""

from __future__ import annotations

import httpx

from shardqa.errors import ShardQAError, one_line
from shardqa.redis_url import redact_url


class ServiceRequestFailed(ShardQAError):
    code = "service_error"
    http_status = 502


#: What every answer in a response carries (docs/serving.md).
ANSWER_FIELDS = ("text", "score", "doc_id", "passage_id", "start", "end", "shard")


def _error_message(response: httpx.Response) -> str:
    try:
        err = response.json()["error"]
        return f"{one_line(err['message'], 200)} ({err['code']}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        # Not shardqa's error body: an HTML page, a proxy's message.
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        return f"HTTP {response.status_code} from {redact_url(str(response.url))} ({kind}; is it a shardqa service?)"


def _answer_body(response: httpx.Response) -> dict:
    """The response as shardqa's answer object, or a one-line error saying
    the server is something else."""
    try:
        body = response.json()
    except ValueError:
        body = None
    ok = (isinstance(body, dict) and isinstance(body.get("answers"), list)
          and all(isinstance(a, dict) and all(f in a for f in ANSWER_FIELDS) for a in body["answers"]))
    if not ok:
        raise ServiceRequestFailed(f"{redact_url(str(response.url))} answered HTTP 200 with something that is not a shardqa answer; is it a shardqa service?")
    return body


def service_url(url: str) -> str:
    """``url`` as a service's base URL (no trailing slash), or a one-line error
    before anything waits on it."""
    # A base URL copied with its trailing slash would otherwise ask //v1/answer
    # (404), and so would the endpoint's own URL, copied from a curl line.
    given = url
    url = url.rstrip("/")
    for endpoint in ("/v1/answer", "/v1/answer:batch"):
        if url.endswith(endpoint):
            url = url[: -len(endpoint)]
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ServiceRequestFailed(f"not a valid URL: {redact_url(given)!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ServiceRequestFailed(f"not a service URL: {redact_url(given)!r}; expected http://host:port")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ServiceRequestFailed(f"not a valid port in {redact_url(given)!r}: {parsed.port} (1-65535)")
    return url


def ask(url: str, question: str, top_k: int = 1, timeout_s: float = 30.0, client: httpx.Client | None = None) -> dict:
    """POST /v1/answer; the response body, or a one-line error."""
    url = service_url(url)
    shown = redact_url(url)  # a password in the URL stays out of messages
    try:
        if client is not None:
            r = client.post(f"{url}/v1/answer", json={"question": question, "top_k": top_k}, timeout=timeout_s)
        else:
            r = httpx.post(f"{url}/v1/answer", json={"question": question, "top_k": top_k}, timeout=timeout_s)
    except httpx.ConnectError:
        raise ServiceRequestFailed(f"cannot reach a shardqa service at {shown} (is `shardqa serve` or `shardqa demo` running?)") from None
    except httpx.TimeoutException:
        raise ServiceRequestFailed(f"no answer from {shown} within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ServiceRequestFailed(f"request to {shown} failed: {exc}") from None
    if r.status_code != 200:
        raise ServiceRequestFailed(_error_message(r))
    return _answer_body(r)
