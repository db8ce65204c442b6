"""The edge as one ASGI app: token, body limit, proxy, then the admin API.

Role: every HTTP and WebSocket request passes here first, in this order:

1. **token** — with ``server.token_file`` set, every path but the public ones
   (``/healthz``, the dashboard page ``/`` and its files, the API docs) needs the
   token, as ``Authorization: Bearer <token>`` or ``Roost-Token: <token>``
   (constant-time comparison); 401 otherwise. ``GET /api/events`` also takes it
   from the ``roost_token`` cookie: a browser's ``EventSource`` cannot send
   headers, and a read-only stream that other origins cannot read (no CORS) is no
   CSRF target. Roost's own credentials are then removed from the request, so the
   proxy never forwards them to an agent (an ``Authorization`` header that is not
   Roost's token goes to the agent untouched);
2. **body limit** — a declared ``Content-Length`` over ``server.max_body_size``
   is 413 before anything is read; a streamed body is counted as it is read and
   cut at the limit with the same 413;
3. ``/agents/{name}/...`` goes to the reverse proxy (:mod:`roost.edge.proxy`),
   everything else to the admin API (:mod:`roost.api.app`), through its message
   door (``roost.api.messages.MessageDoor``: a plain ``POST .../messages`` is
   served without FastAPI's per-request machinery, the rest by FastAPI).

Invariants:
- Every refusal is one :class:`roost.errors.Refusal` rendered in the one error
  shape (``roost.api.errors.render``); a refused WebSocket handshake gets the
  same JSON when the server supports handshake responses.
- The edge decides nothing about agents: it never touches the engine.
"""

from __future__ import annotations

import http.cookies
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from roost import errors
from roost.api.app import PUBLIC_PATHS, create_api
from roost.api.errors import refuse
from roost.api.messages import MessageDoor
from roost.edge.proxy import PREFIX, AgentProxy
from roost.engine import Engine

__all__ = ["EVENTS_PATH", "TOKEN_COOKIE", "Edge", "create_app", "limited"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Path prefixes anyone may read: the API docs' and the dashboard's files.
_PUBLIC_PREFIXES = ("/docs/", "/redoc/", "/static/")
#: The event stream also takes the token from this cookie (see the module docstring).
EVENTS_PATH = "/api/events"
TOKEN_COOKIE = "roost_token"


class Edge:
    """The ASGI app Roost serves (see the module docstring)."""

    def __init__(
        self,
        api: FastAPI,
        proxy: AgentProxy,
        *,
        token: str | None,
        max_body: int,
        door: MessageDoor | None = None,
    ) -> None:
        self.api = api
        #: what the API's requests go through: the message door, then FastAPI.
        self.api_door: MessageDoor | FastAPI = door if door is not None else api
        self.proxy = proxy
        self._token = token.encode("utf-8") if token else None
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.api(scope, receive, send)  # lifespan
            return
        path: str = scope["path"]
        try:
            if self._token is not None and not _is_public(path):
                scope = self._authorize(scope)
            if scope["type"] == "http":
                receive = self._limited(scope, receive)
        except errors.Refusal as refusal:
            await refuse(scope, send, refusal)
            return
        if path.startswith(PREFIX):
            await self.proxy(scope, receive, send)
        else:
            await self.api_door(scope, receive, send)

    def _authorize(self, scope: Scope) -> Scope:
        """Refusal 401 unless the request carries the token; the scope without
        Roost's own credentials otherwise."""
        assert self._token is not None
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        bearer = b""
        roost_token = b""
        cookies_allowed = scope["path"] == EVENTS_PATH and scope.get("method") == "GET"
        for key, value in headers:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    bearer = credentials.strip()
            elif key == b"roost-token":
                roost_token = value.strip()
            elif key == b"cookie" and cookies_allowed and not roost_token:
                roost_token = _cookie_token(value)
        # Always compare both (absent headers are empty tokens): timing tells nothing.
        bearer_ok = secrets.compare_digest(bearer, self._token)
        header_ok = secrets.compare_digest(roost_token, self._token)
        if not (bearer_ok or header_ok):
            raise errors.Refusal(
                401,
                "missing or wrong API token: send 'Authorization: Bearer <token>' "
                "(or 'Roost-Token: <token>') with the token from server.token_file",
                headers={"WWW-Authenticate": "Bearer"},
            )
        kept = [
            (key, value)
            for key, value in headers
            if key != b"roost-token" and not (key == b"authorization" and bearer_ok)
        ]
        return {**scope, "headers": kept}

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        return limited(scope, receive, self._max_body)


def limited(scope: Scope, receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body over ``limit`` bytes (declared or streamed)
    with 413, and a malformed Content-Length with 400."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise errors.Refusal(
                    400, f"invalid Content-Length header {value.decode('latin-1')!r}"
                ) from None
            if declared > limit:
                raise errors.Refusal(
                    413,
                    f"request body of {declared} bytes is larger than "
                    f"server.max_body_size ({limit} bytes)",
                )
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise errors.Refusal(
                    413,
                    f"request body is larger than server.max_body_size ({limit} bytes)",
                )
        return message

    return counted


def _cookie_token(header: bytes) -> bytes:
    """The ``roost_token`` cookie's value (URL-decoded), or empty."""
    cookies = http.cookies.SimpleCookie()
    try:
        cookies.load(header.decode("latin-1"))
    except http.cookies.CookieError:
        return b""
    morsel = cookies.get(TOKEN_COOKIE)
    return urllib.parse.unquote(morsel.value).encode("utf-8") if morsel else b""


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


def create_app(engine: Engine, *, token: str | None) -> Edge:
    """Roost's whole HTTP surface over ``engine`` (which the caller starts and stops)."""
    api = create_api(engine)
    door = MessageDoor(  # the busiest route without FastAPI's per-request machinery
        engine, api, on_store_error=lambda exc: engine.health.fail("store", str(exc))
    )
    metrics = api.state.metrics
    proxy = AgentProxy(engine, observer=metrics)
    metrics.open_streams = lambda: proxy.open_streams
    engine.add_closer(proxy.close)
    return Edge(api, proxy, token=token, max_body=engine.settings.server.max_body_size, door=door)
