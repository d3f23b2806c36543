"""A small HTTP client of the service (`shardqa query`, the demo, tests)."""

from __future__ import annotations

import httpx

from shardqa.errors import ShardQAError


class ServiceRequestFailed(ShardQAError):
    code = "service_error"
    http_status = 502


def _error_message(response: httpx.Response) -> str:
    try:
        err = response.json()["error"]
        return f"{err['message']} ({err['code']}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def ask(url: str, question: str, top_k: int = 1, timeout_s: float = 30.0, client: httpx.Client | None = None) -> dict:
    """POST /v1/answer; the response body, or a one-line error."""
    # A base URL copied with its trailing slash would otherwise ask //v1/answer (404).
    url = url.rstrip("/")
    try:
        if client is not None:
            r = client.post(f"{url}/v1/answer", json={"question": question, "top_k": top_k}, timeout=timeout_s)
        else:
            r = httpx.post(f"{url}/v1/answer", json={"question": question, "top_k": top_k}, timeout=timeout_s)
    except httpx.ConnectError:
        raise ServiceRequestFailed(f"cannot reach a shardqa service at {url} (is `shardqa serve` or `shardqa demo` running?)") from None
    except httpx.TimeoutException:
        raise ServiceRequestFailed(f"no answer from {url} within {timeout_s:.0f}s") from None
    except httpx.HTTPError as exc:
        raise ServiceRequestFailed(f"request to {url} failed: {exc}") from None
    if r.status_code != 200:
        raise ServiceRequestFailed(_error_message(r))
    return r.json()
