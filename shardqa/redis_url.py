"""Redis URLs, parsed once for the index store and the answer cache.

`redis://`, `rediss://` and `unix://` name one server (redis-py parses those
itself);
`redis+cluster://[user:password@]host:port[,host:port]` and `rediss+cluster://`
name a Redis Cluster by its seed nodes, a form redis-py has no parser for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from shardqa.errors import StoreError


@dataclass(frozen=True)
class RedisURL:
    url: str
    cluster: bool
    ssl: bool
    nodes: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def auth(self) -> dict:
        out = {}
        if self.username:
            out["username"] = self.username
        if self.password:
            out["password"] = self.password
        return out

    @property
    def tls_options(self) -> dict:
        """TLS settings from the URL's query for a Redis Cluster client, which
        (unlike ``from_url``) does not read them from a URL: the CA file of a
        server certificate signed by a private CA."""
        ca = self.query.get("ssl_ca_certs")
        return {"ssl_ca_certs": ca[0]} if self.ssl and ca else {}

    def single_server_url(self, without: tuple[str, ...] = ()) -> str:
        """The URL for redis-py's ``from_url``, less the query keys it would
        not know (shardqa's own, such as ``prefix``)."""
        parts = urlsplit(self.url)
        query = urlencode([(k, v) for k, vs in self.query.items() if k not in without for v in vs])
        # Rebuilt by hand: urlunsplit writes unix:///path as unix:/path.
        return f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


def redact_url(url: str) -> str:
    """The URL with its password (if any) shown as ***, fit for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable (e.g. an unclosed IPv6 bracket): hide any user info wholesale
        return re.sub(r"://[^/@]*@", "://***@", url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@")).geturl()
    return url


def parse_redis_url(url: str) -> RedisURL:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    from shardqa.config import REDIS_STORE_SCHEMES

    if scheme not in REDIS_STORE_SCHEMES:
        raise StoreError(f"not a Redis URL: {scheme}:// (use {', '.join(s + '://' for s in REDIS_STORE_SCHEMES)})")
    cluster = scheme.endswith("+cluster")
    nodes = []
    if cluster:
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.strip().rpartition(":")
            if not host:
                host, port = port, "6379"
            if not host:
                continue
            try:
                nodes.append((host.strip("[]"), int(port)))
            except ValueError:
                raise StoreError(f"bad port {port!r} in Redis cluster URL") from None
        if not nodes:
            raise StoreError("a Redis cluster URL needs host:port[,host:port]")
    elif scheme != "unix":
        try:
            parts.port  # urllib checks it only when asked; no host means localhost to redis-py
        except ValueError:
            raise StoreError(f"bad port in Redis URL {redact_url(url)!r}") from None
    return RedisURL(
        url=url,
        cluster=cluster,
        ssl=scheme.startswith("rediss"),
        nodes=nodes,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=parse_qs(parts.query),
    )
