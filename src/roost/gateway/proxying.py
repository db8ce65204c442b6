"""The reverse proxy ``ANY /agents/{name}/{path}``: wake the agent, hold, forward, stream.

Role: a raw ASGI layer in front of the admin API. ``GatewayMiddleware`` takes
every request whose path starts with ``/agents/`` (HTTP and WebSocket) and hands
everything else to the wrapped app, so the hot path skips FastAPI's routing and
validation. ``AgentProxy`` does the work over the engine's one agent client
(``engine.agent_client``: plain HTTP streamed both ways, and WebSockets).

A request for an agent that is not running wakes it (``ensure_running``) and is
held until the agent answers its health check, for at most the agent's
``hold_timeout``. Held longer than ``waking_notice_after``, the hold announces
``agent.waking`` (SSE and webhook) once.

Invariants:
- Answers Roost gives itself are JSON ``{"error": ..., "agent": ...}`` like the
  admin API's: 401 (token), 404 (unknown agent), 413 (body, declared or
  streamed, larger than ``server.max_body_size``), 503 + ``Retry-After`` (still waking after
  ``hold_timeout``, or Roost shutting down), 502 (the agent failed or could not
  start while the request was held, or its answer was refused, cut or not
  HTTP), 504 (the agent did not answer within ``answer_timeout``); the body
  names the agent and its ``state``.
- ``Expect: 100-continue`` goes through: the client's body is read (and the
  client told to continue) only once the agent asks for it; an agent that
  answers first (401, 413, ...) gets no body.
- Every proxied answer carries ``Roost-Cold-Start`` (the state the agent was
  woken from: ``paused``, ``stopped``, ``created``, ...; ``none`` when it was
  already running) and ``Roost-Wake-Ms`` (time spent waking it).
- Bodies stream both ways: the request body goes upstream as it arrives, the
  response goes back chunk by chunk; neither is buffered whole (a response that
  is complete on arrival is sent in one piece).
- Hop-by-hop headers (RFC 9110 7.6.1, plus any named in ``Connection``) are
  never forwarded, either way. ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` /
  ``-Prefix`` are set. Upstream ``Date`` and ``Server`` are replaced by Roost's
  own (as nginx does).
- With an API token, a proxied request must carry it as
  ``Authorization: Bearer <token>`` (then that header is not forwarded: it was
  Roost's) or as ``Roost-Token: <token>`` (then ``Authorization`` goes to the
  agent untouched). ``Roost-Token`` is never forwarded. Comparison is constant-time.
- Activity: a proxied request, stream or WebSocket holds ``actor.busy()`` for its
  whole life, so idling never pauses or stops an agent in the middle of one.
- Every task is owned: waking notices are tracked and awaited by ``close``; a
  streaming response's disconnect watcher ends with the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from roost import errors
from roost.config import ResolvedAgent
from roost.core.states import ACTIVE_STATES, AgentState
from roost.ports.agent_http import AgentStream, AgentWebSocket, RequestBody

if TYPE_CHECKING:
    from roost.engine import Engine
    from roost.reactor.supervising import AgentActor

__all__ = [
    "DEFAULT_HOLD_TIMEOUT",
    "DEFAULT_WAKING_NOTICE_AFTER",
    "PREFIX",
    "AgentProxy",
    "GatewayMiddleware",
]

log = logging.getLogger("roost.gateway.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Every path under this prefix is proxied: ``/agents/{name}/{path}``.
PREFIX = "/agents/"
#: Used when an agent's spec does not say (specs not built from roost.toml).
DEFAULT_HOLD_TIMEOUT = 60.0
DEFAULT_WAKING_NOTICE_AFTER = 1.0
#: Largest WebSocket message relayed (uvicorn's default limit, both ways).
WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024
#: Retry-After for a request that was still waking when its hold ran out.
RETRY_AFTER_SECONDS = 1
#: Longest wait for the agent's answer once the request is sent (then 504): agents may
#: think for minutes before their first byte, as delivery allows.
ANSWER_TIMEOUT = 300.0

_PREFIX_BYTES = PREFIX.encode()

# RFC 9110 7.6.1 hop-by-hop fields, and ``proxy-connection`` (a pre-standard one).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not forwarded upstream: hop-by-hop, the client's Host (aiohttp sets the agent's),
# forwarding headers Roost rewrites itself, and Roost's own token header.
_REQUEST_DROP = _HOP_BY_HOP | {
    b"host",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
    b"roost-token",
}
# Plain HTTP: the body framing is the agent client's (Content-Length or chunked), and
# ``Expect: 100-continue`` is sent again only with a body read when the agent asks.
_HTTP_DROP = _REQUEST_DROP | {b"content-length", b"expect"}
# A WebSocket handshake is made anew by aiohttp: the client's handshake fields go.
_WEBSOCKET_DROP = _REQUEST_DROP | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"content-length",
}
# Not returned to the client: hop-by-hop, and Date/Server (uvicorn adds its own).
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
_VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


class _Refusal(Exception):
    """An answer Roost gives itself instead of the agent's (JSON error body)."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(body.get("error", ""))
        self.status = status
        self.body = body
        self.headers = tuple(headers)


class _BodyTooLarge(Exception):
    """The request body grew past ``server.max_body_size`` while it was read."""


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _hold_settings(actor: AgentActor) -> tuple[float, float]:
    spec = actor.spec
    if isinstance(spec, ResolvedAgent):
        return spec.hold_timeout, spec.waking_notice_after
    return DEFAULT_HOLD_TIMEOUT, DEFAULT_WAKING_NOTICE_AFTER


def _split_target(scope: Scope) -> tuple[str, bytes]:
    """(agent name, upstream path with its original percent-encoding) of a proxied path."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    rest = raw[len(_PREFIX_BYTES) :] if raw.startswith(_PREFIX_BYTES) else b""
    name, _, tail = rest.partition(b"/")
    return name.decode("latin-1"), b"/" + tail


def _declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_chunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(key == b"transfer-encoding" for key, _ in headers)


def _expects_continue(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)


def _connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class AgentProxy:
    """Forwards HTTP and WebSocket traffic to agents, waking them first.

    Talks to agents through ``engine.agent_client`` (the engine owns and closes it).
    """

    def __init__(
        self, engine: Engine, *, token: str | None, answer_timeout: float = ANSWER_TIMEOUT
    ) -> None:
        self._engine = engine
        self._supervisor = engine.supervisor
        self._token = token.encode("utf-8") if token else None
        self._max_body = engine.settings.server.max_body_size
        self._client = engine.agent_client
        #: seconds to wait for an agent's answer once the request is sent (then 504).
        self.answer_timeout = answer_timeout
        #: agent.waking announcements in flight (awaited by ``close``).
        self._notices: set[asyncio.Task[None]] = set()
        #: WebSockets and streaming responses open right now.
        self.open_streams = 0
        self.closed = False

    # -- resources --------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for waking notices in flight (the agent client is the engine's)."""
        self.closed = True
        if self._notices:
            await asyncio.gather(*self._notices, return_exceptions=True)

    # -- entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ``/agents/...`` request (``scope["type"]`` http or websocket)."""
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self._http(scope, receive, send)

    # -- checks shared by HTTP and WebSocket --------------------------------------------

    def _authorize(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Check the token (``_Refusal`` 401 when wrong); True when ``Authorization``
        held Roost's token, so it must not be forwarded."""
        if self._token is None:
            return False
        bearer = b""
        roost_token = b""
        for key, value in headers:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    bearer = credentials.strip()
            elif key == b"roost-token":
                roost_token = value.strip()
        # Always compare both (absent headers are empty tokens): timing tells nothing.
        bearer_ok = secrets.compare_digest(bearer, self._token)
        header_ok = secrets.compare_digest(roost_token, self._token)
        if not (bearer_ok or header_ok):
            raise _Refusal(
                401,
                {
                    "error": "missing or wrong API token: send 'Authorization: Bearer <token>' "
                    "(or 'Roost-Token: <token>') with the token from server.token_file"
                },
                [(b"www-authenticate", b"Bearer")],
            )
        return bearer_ok

    def _actor(self, name: str) -> AgentActor:
        actor = self._supervisor.actors.get(name)
        if actor is None:
            raise _Refusal(404, {"error": f"no agent named {name!r}", "agent": name})
        return actor

    async def _awake_url(self, actor: AgentActor) -> tuple[str, bytes, bytes]:
        """(agent URL, Roost-Cold-Start, Roost-Wake-Ms): wake and hold when asleep."""
        record = actor.record
        if record.url is not None and record.state in ACTIVE_STATES:
            return record.url, b"none", b"0"
        name = actor.name
        woken_from = record.state.value
        if record.state is AgentState.FAILED:
            raise _Refusal(
                502,
                {
                    "error": f"agent {name!r} is failed; reset it first",
                    "agent": name,
                    "state": woken_from,
                },
            )
        hold_timeout, notice_after = _hold_settings(actor)
        clock = self._engine.clock
        started = clock.monotonic()
        notice = asyncio.get_running_loop().call_later(
            notice_after, self._announce_waking, name, woken_from, started
        )
        try:
            record = await self._supervisor.ensure_running(
                name, timeout=hold_timeout, reason="proxied request"
            )
        except errors.StartupTimeout as exc:
            raise _Refusal(
                503,
                {
                    "error": f"agent {name!r} is still {actor.record.state.value} after "
                    f"holding the request {hold_timeout:g}s (hold_timeout); retry",
                    "agent": name,
                    "state": actor.record.state.value,
                    "detail": str(exc),
                },
                [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())],
            ) from exc
        except errors.StateError as exc:
            state = actor.record.state
            if actor.closed or state is not AgentState.FAILED:
                raise _Refusal(
                    503,
                    {"error": str(exc), "agent": name, "state": state.value},
                    [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())],
                ) from exc
            raise _Refusal(502, {"error": str(exc), "agent": name, "state": state.value}) from exc
        except errors.RoostError as exc:
            raise _Refusal(
                502,
                {
                    "error": f"agent {name!r} could not be woken: {exc}",
                    "agent": name,
                    "state": actor.record.state.value,
                },
            ) from exc
        finally:
            notice.cancel()
        waited = clock.monotonic() - started
        url = record.url
        assert url is not None  # ensure_running returns only a running record with a URL
        return url, woken_from.encode(), str(math.ceil(waited * 1000)).encode()

    def _announce_waking(self, name: str, woken_from: str, started: float) -> None:
        waited_ms = round((self._engine.clock.monotonic() - started) * 1000)
        data = {"agent": name, "state": woken_from, "waited_ms": waited_ms}

        async def announce() -> None:
            try:
                await self._engine.announce("agent.waking", data)
            except Exception:
                log.exception("agent %s: announcing agent.waking failed", name)

        task = asyncio.create_task(announce(), name=f"roost.proxy.waking[{name}]")
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    def _forward_headers(
        self, scope: Scope, name: str, drop: frozenset[bytes], drop_authorization: bool
    ) -> list[tuple[bytes, bytes]]:
        """The client's headers minus ``drop`` (and any it names in ``Connection``),
        plus the ``X-Forwarded-*`` ones."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        dropped = drop
        for key, value in headers:
            if key == b"connection":
                dropped = dropped | _connection_tokens(value)
        forwarded: list[tuple[bytes, bytes]] = []
        host = b""
        prior_for = b""
        for key, value in headers:
            if key in dropped:
                if key == b"host":
                    host = value
                continue
            if key == b"authorization" and drop_authorization:
                continue
            if key == b"x-forwarded-for":
                prior_for = value
                continue
            forwarded.append((key, value))
        client = scope.get("client")
        client_ip = client[0].encode() if client else b""
        forwarded.append(
            (b"x-forwarded-for", prior_for + b", " + client_ip if prior_for else client_ip)
        )
        secure = scope.get("scheme") in ("https", "wss")
        forwarded.append((b"x-forwarded-proto", b"https" if secure else b"http"))
        if host:
            forwarded.append((b"x-forwarded-host", host))
        forwarded.append((b"x-forwarded-prefix", _PREFIX_BYTES + name.encode()))
        return forwarded

    # -- HTTP -------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        name, path = _split_target(scope)
        try:
            drop_authorization = self._authorize(scope["headers"])
            actor = self._actor(name)
            declared = _declared_length(scope["headers"])
            if declared is not None and declared > self._max_body:
                raise _Refusal(
                    413,
                    {
                        "error": f"request body of {declared} bytes is larger than "
                        f"server.max_body_size ({self._max_body} bytes)",
                        "agent": name,
                    },
                )
        except _Refusal as refusal:
            await _send_refusal(send, refusal)
            return
        async with actor.busy():
            try:
                url, cold, wake_ms = await self._awake_url(actor)
            except _Refusal as refusal:
                await _send_refusal(send, refusal)
                return
            query: bytes = scope.get("query_string", b"")
            target = path + b"?" + query if query else path
            await self._forward_http(
                scope, receive, send, actor, url, target, (cold, wake_ms), drop_authorization
            )

    async def _forward_http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        actor: AgentActor,
        url: str,
        target: bytes,
        wake: tuple[bytes, bytes],
        drop_authorization: bool,
    ) -> None:
        name = actor.name
        request_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers = self._forward_headers(scope, name, _HTTP_DROP, drop_authorization)
        declared = _declared_length(request_headers)
        body = _RequestBody(receive, self._max_body)
        data: RequestBody = None
        if declared is not None or _is_chunked(request_headers):
            if _expects_continue(request_headers):
                # Read only when the agent asks: the server tells the client to continue
                # at the first receive(), so the agent's 100 (or its refusal) decides.
                data = body.stream()
                headers.append((b"expect", b"100-continue"))
            else:
                try:
                    data = await body.start()
                except _ClientGone:
                    return
                except _BodyTooLarge:
                    await _send_refusal(send, body.refusal(name))
                    return
            if declared is not None and not isinstance(data, bytes):
                headers.append((b"content-length", str(declared).encode()))
        answered = False
        try:
            async with self._client.stream(
                scope["method"],
                url,
                target,
                headers=headers,
                body=data,
                answer_timeout=self.answer_timeout,
            ) as response:
                answered = True
                await self._relay(response, receive, send, body, wake)
        except _ClientGone:
            return
        except _BodyTooLarge:
            if answered:
                raise
            await _send_refusal(send, body.refusal(name))
        except errors.AgentHTTPError as exc:
            if answered:
                raise  # mid-answer: the client's connection is cut, nothing else to say
            await self._upstream_failed(send, actor, exc)

    async def _upstream_failed(
        self, send: Send, actor: AgentActor, exc: errors.AgentHTTPError
    ) -> None:
        name = actor.name
        detail = str(exc) or type(exc).__name__
        log.info("agent %s: proxied request failed upstream: %s", name, detail)
        await _send_refusal(
            send,
            _Refusal(
                504 if isinstance(exc, errors.AgentTimeout) else 502,
                {
                    "error": f"agent {name!r} did not answer: {detail}",
                    "agent": name,
                    "state": actor.record.state.value,
                },
            ),
        )

    async def _relay(
        self,
        response: AgentStream,
        receive: Receive,
        send: Send,
        body: _RequestBody,
        wake: tuple[bytes, bytes],
    ) -> None:
        """Send the agent's answer to the client."""
        dropped = _RESPONSE_DROP
        raw_headers = response.headers
        for key, value in raw_headers:
            if key == b"connection":
                dropped = dropped | _connection_tokens(value)
        headers = [(k, v) for k, v in raw_headers if k not in dropped]
        headers.append((b"roost-cold-start", wake[0]))
        headers.append((b"roost-wake-ms", wake[1]))
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        if response.complete:
            # The whole answer is already here: no streaming machinery.
            await send(start)
            await send({"type": "http.response.body", "body": await response.read()})
            return
        await send(start)
        self.open_streams += 1
        try:
            await self._stream(response, receive, send, body)
        finally:
            self.open_streams -= 1

    async def _stream(
        self, response: AgentStream, receive: Receive, send: Send, body: _RequestBody
    ) -> None:
        """Relay the body as it comes, until its end or until the client leaves."""

        async def pump() -> None:
            while True:
                chunk = await response.read()
                ended = response.complete  # read() returned all there was: the last piece
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                if ended:
                    return

        if not body.consumed:
            # The agent answers before reading the whole upload: nothing to watch yet.
            await pump()
            return

        async def client_gone() -> None:
            # After the request body, the server's receive() only returns on disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.create_task(pump(), name="roost.proxy.stream")
        watching = asyncio.create_task(client_gone(), name="roost.proxy.disconnect")
        try:
            await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
        if pumping.done() and not pumping.cancelled():
            pumping.result()  # re-raise an upstream failure mid-stream
        # else the client left mid-answer: the exchange closes the agent's connection

    # -- WebSocket --------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        name, path = _split_target(scope)
        try:
            drop_authorization = self._authorize(scope["headers"])
            actor = self._actor(name)
        except _Refusal as refusal:
            await _deny_websocket(scope, send, refusal)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        async with actor.busy():
            try:
                url, cold, wake_ms = await self._awake_url(actor)
            except _Refusal as refusal:
                await _deny_websocket(scope, send, refusal)
                return
            query: bytes = scope.get("query_string", b"")
            target = path + b"?" + query if query else path
            try:
                upstream = await self._client.websocket(
                    url,
                    target,
                    headers=self._forward_headers(scope, name, _WEBSOCKET_DROP, drop_authorization),
                    protocols=tuple(scope.get("subprotocols") or ()),
                    max_message_size=WEBSOCKET_MAX_MESSAGE,
                )
            except errors.AgentHTTPError as exc:
                if exc.status is not None:
                    error = f"agent {name!r} refused the WebSocket upgrade (HTTP {exc.status})"
                else:
                    error = f"agent {name!r} did not answer: {exc or type(exc).__name__}"
                await _deny_websocket(
                    scope,
                    send,
                    _Refusal(
                        504 if isinstance(exc, errors.AgentTimeout) else 502,
                        {"error": error, "agent": name, "state": actor.record.state.value},
                    ),
                )
                return
            self.open_streams += 1
            try:
                await send(
                    {
                        "type": "websocket.accept",
                        "subprotocol": upstream.subprotocol,
                        "headers": [(b"roost-cold-start", cold), (b"roost-wake-ms", wake_ms)],
                    }
                )
                await _relay_websocket(receive, send, upstream, actor)
            finally:
                self.open_streams -= 1
                await upstream.close()


class _RequestBody:
    """The client's request body, read from ASGI ``receive`` as upstream wants it."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._size = 0
        #: every byte of the request body has been read (or there was none).
        self.consumed = True
        #: the body is held whole in memory, so the request can be sent again.
        self.replayable = True
        self.too_large = False

    async def start(self) -> bytes | AsyncIterator[bytes]:
        """The body whole when it came in one piece, else a stream of its chunks."""
        self.consumed = False
        first = await self._receive()
        if first["type"] != "http.request":
            raise _ClientGone
        chunk: bytes = first.get("body", b"")
        self._count(chunk)
        if not first.get("more_body", False):
            self.consumed = True
            return chunk
        self.replayable = False
        return self._stream(chunk)

    def stream(self) -> AsyncIterator[bytes]:
        """The body as a stream that reads nothing until iterated (``Expect: 100-continue``)."""
        self.consumed = False
        self.replayable = False
        return self._stream(b"")

    def _count(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            self.too_large = True
            raise _BodyTooLarge

    async def _stream(self, first: bytes) -> AsyncIterator[bytes]:
        if first:
            yield first
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone  # disconnected while sending its body
            chunk: bytes = message.get("body", b"")
            self._count(chunk)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.consumed = True
                return

    def refusal(self, name: str) -> _Refusal:
        return _Refusal(
            413,
            {
                "error": f"request body is larger than server.max_body_size ({self._limit} bytes)",
                "agent": name,
            },
        )


async def _relay_websocket(
    receive: Receive, send: Send, upstream: AgentWebSocket, actor: AgentActor
) -> None:
    """Pump messages both ways until either side closes; then close the other."""

    async def client_to_agent() -> int:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                actor.touch()
                text: str | None = message.get("text")
                await upstream.send(text if text is not None else message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                code: int = message.get("code", 1000)
                return code

    async def agent_to_client() -> int:
        # An agent's failed WebSocket raises here: the client is closed with 1011.
        while (data := await upstream.receive()) is not None:
            actor.touch()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
        return upstream.close_code or 1000

    from_client = asyncio.create_task(client_to_agent(), name=f"roost.ws.in[{actor.name}]")
    from_agent = asyncio.create_task(agent_to_client(), name=f"roost.ws.out[{actor.name}]")
    try:
        done, _ = await asyncio.wait((from_client, from_agent), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (from_client, from_agent):
            task.cancel()
        await asyncio.gather(from_client, from_agent, return_exceptions=True)
    if from_client in done and not from_client.cancelled() and from_client.exception() is None:
        await upstream.close(code=_close_code(from_client.result()))
        return
    code = 1011
    if from_agent in done and not from_agent.cancelled() and from_agent.exception() is None:
        code = from_agent.result()
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": _close_code(code)})


def _close_code(code: int) -> int:
    """A close code that may be sent on the wire (1005/1006 are only ever reported)."""
    return code if code in _VALID_CLOSE_CODES or 3000 <= code <= 4999 else 1000


async def _send_refusal(send: Send, refusal: _Refusal) -> None:
    payload = _json_bytes(refusal.body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *refusal.headers,
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _deny_websocket(scope: Scope, send: Send, refusal: _Refusal) -> None:
    """Refuse a WebSocket handshake: with the JSON answer when the server can send one."""
    if "websocket.http.response" in scope.get("extensions", {}):
        payload = _json_bytes(refusal.body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *refusal.headers,
        ]
        await send(
            {
                "type": "websocket.http.response.start",
                "status": refusal.status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": payload})
        return
    await send({"type": "websocket.close", "code": 1008 if refusal.status in (401, 404) else 1011})


_App = TypeVar("_App", bound=ASGIApp)


class GatewayMiddleware(Generic[_App]):
    """ASGI: ``/agents/...`` goes to the proxy, everything else to the wrapped app."""

    def __init__(self, app: _App, *, proxy: AgentProxy) -> None:
        self.app = app
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith(PREFIX):
            await self.proxy(scope, receive, send)
            return
        await self.app(scope, receive, send)
