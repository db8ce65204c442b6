"""The reverse proxy ``ANY /agents/{name}/{path}``: wake the agent, hold, forward, stream.

Role: the edge (``roost.edge``) hands every request whose path starts with
``/agents/`` (HTTP and WebSocket) to ``AgentProxy``, after its token check and
body limit, so the hot path skips FastAPI's routing and validation. It talks to
agents through the engine's one agent client (``engine.agent_client``: plain
HTTP streamed both ways, and WebSockets).

A request for an agent that is not running wakes it (``Agents.wake``) and is
held until the agent answers its health check, for at most the agent's
``hold_timeout`` (the facade announces ``agent.waking`` once per wake). With the
agent's ``waiting_page`` on, a browser's page request is held only briefly and
then answered with the waiting page (``roost.edge.waiting``), which reloads
itself until the agent is up.

Invariants:
- Answers Roost gives itself are ``Refusal``s in the API's one JSON shape
  ``{"error": ..., "agent": ...}``: 404 (unknown agent), 413 (body, declared or
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
- Roost's own credentials never reach the agent: the edge removes them before
  the request gets here.
- Activity: a proxied request, stream or WebSocket holds ``Agents.busy`` for its
  whole life, so idling never pauses or stops an agent in the middle of one.
- Every task is owned: a streaming response's disconnect watcher ends with the
  response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol

from roost import errors
from roost.api.errors import refuse
from roost.core.records import AgentRecord
from roost.core.states import AgentState
from roost.edge import waiting
from roost.engine import Engine
from roost.ports.agent_http import AgentStream, AgentWebSocket, RequestBody

__all__ = ["PREFIX", "AgentProxy", "ProxyObserver"]

log = logging.getLogger("roost.edge.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Every path under this prefix is proxied: ``/agents/{name}/{path}``.
PREFIX = "/agents/"
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
# Not forwarded upstream: hop-by-hop, the client's Host (the agent client sets the agent's),
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
# A WebSocket handshake is made anew by the agent client: the client's handshake fields go.
_WEBSOCKET_DROP = _REQUEST_DROP | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"content-length",
}
# Not returned to the client: hop-by-hop, and Date/Server (uvicorn adds its own).
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
#: Roost-Cold-Start and Roost-Wake-Ms of a request for an agent that was awake.
_NOT_WOKEN = (b"none", b"0")
_VALID_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


class ProxyObserver(Protocol):
    """Told of every proxied request (``roost.api.metrics.Metrics`` counts them)."""

    def proxy_started(self, agent: str) -> bool:
        """A request for ``agent`` begins; False: do not report its end."""
        ...

    def proxy_finished(self, agent: str, status: int, seconds: float) -> None:
        """It ended: ``status`` of the answer (101: WebSocket accepted; 0: none)."""
        ...

    def waiting_page_served(self, agent: str) -> None:
        """A browser got the waiting page instead of a held request."""
        ...


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


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


class AgentProxy:
    """Forwards HTTP and WebSocket traffic to agents, waking them first.

    Talks to agents through ``engine.agent_client`` (the engine owns and closes it).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        answer_timeout: float = ANSWER_TIMEOUT,
        observer: ProxyObserver | None = None,
    ) -> None:
        self._agents = engine.agents
        #: told of every proxied request (metrics); None: nobody is.
        self.observer = observer
        self._clock = engine.clock
        self._client = engine.agent_client
        #: seconds to wait for an agent's answer once the request is sent (then 504).
        self.answer_timeout = answer_timeout
        #: WebSockets and streaming responses open right now.
        self.open_streams = 0
        self.closed = False

    # -- resources --------------------------------------------------------------------

    async def close(self) -> None:
        """Refuse new requests (the agent client is the engine's to close)."""
        self.closed = True

    # -- entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ``/agents/...`` request (``scope["type"]`` http or websocket)."""
        name, path = _split_target(scope)
        serve = self._websocket if scope["type"] == "websocket" else self._http
        observer = self.observer
        if observer is None or not observer.proxy_started(name):
            await serve(scope, receive, send, name, path)
            return
        status = 0

        def observed(message: Message) -> Awaitable[None]:
            # A plain function handing back send's awaitable: no coroutine of its own.
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            return send(message)

        started = self._clock.monotonic()
        try:
            await serve(scope, receive, observed, name, path)
        finally:
            observer.proxy_finished(name, status, self._clock.monotonic() - started)

    # -- checks shared by HTTP and WebSocket --------------------------------------------

    def _record(self, name: str) -> AgentRecord:
        """The agent's record; Refusal 404 when there is no such agent."""
        try:
            return self._agents.get(name)
        except errors.NotFound:
            raise errors.Refusal(404, f"no agent named {name!r}", agent=name) from None

    async def _woken_url(
        self, name: str, record: AgentRecord, *, timeout: float | None = None
    ) -> tuple[str, bytes, bytes]:
        """(agent URL, Roost-Cold-Start, Roost-Wake-Ms) of an agent that is not awake
        (``record``): wake it and hold, for at most ``timeout`` (default: the agent's
        ``hold_timeout``)."""
        woken_from = record.state.value
        if record.state is AgentState.FAILED:
            raise errors.Refusal(
                502, f"agent {name!r} is failed; reset it first", agent=name, state=woken_from
            )
        hold_timeout = self._agents.spec(name).hold_timeout if timeout is None else timeout
        retry_after = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        started = self._clock.monotonic()
        try:
            record = await self._agents.wake(name, reason="proxied request", timeout=timeout)
        except errors.StartupTimeout as exc:
            state = self._state(name)
            raise errors.Refusal(
                503,
                f"agent {name!r} is still {state} after holding the request "
                f"{hold_timeout:g}s" + (" (hold_timeout)" if timeout is None else "") + "; retry",
                headers=retry_after,
                agent=name,
                state=state,
                detail=str(exc),
            ) from exc
        except errors.StateError as exc:
            state = self._state(name)
            if state != AgentState.FAILED.value:  # shutting down, or deleted meanwhile
                raise errors.Refusal(
                    503, str(exc), headers=retry_after, agent=name, state=state
                ) from exc
            raise errors.Refusal(502, str(exc), agent=name, state=state) from exc
        except errors.RoostError as exc:
            raise errors.Refusal(
                502,
                f"agent {name!r} could not be woken: {exc}",
                agent=name,
                state=self._state(name),
            ) from exc
        waited = self._clock.monotonic() - started
        url = record.url
        assert url is not None  # wake returns only a running record with a URL
        return url, woken_from.encode(), str(math.ceil(waited * 1000)).encode()

    def _state(self, name: str) -> str:
        """The agent's state now ("deleted" when it is gone)."""
        try:
            return self._agents.get(name).state.value
        except errors.NotFound:
            return "deleted"

    def _forward_headers(
        self, scope: Scope, name: str, drop: frozenset[bytes]
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

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, name: str, path: bytes
    ) -> None:
        try:
            record = self._record(name)
        except errors.Refusal as refusal:
            await refuse(scope, send, refusal)
            return
        async with self._agents.busy(name):
            if record.awake:  # the hot path: one look at the record, nothing to wait for
                url = record.url
                assert url is not None
                wake = _NOT_WOKEN
            else:
                # A browser asking for a sleeping agent that shows a waiting page waits
                # briefly, then gets the page.
                page = self._agents.spec(name).waiting_page and waiting.wants_page(
                    scope["method"], scope["headers"]
                )
                hold: float | None = None  # the agent's hold_timeout
                if page:
                    hold = min(waiting.WAIT_BEFORE_PAGE, self._agents.spec(name).hold_timeout)
                try:
                    url, cold, wake_ms = await self._woken_url(name, record, timeout=hold)
                except errors.Refusal as refusal:
                    if page and refusal.status in (502, 503):
                        await self._waiting_page(scope, send, name, refusal)
                    else:
                        await refuse(scope, send, refusal)
                    return
                wake = (cold, wake_ms)
            query: bytes = scope.get("query_string", b"")
            target = path + b"?" + query if query else path
            await self._forward_http(scope, receive, send, name, url, target, wake)

    async def _waiting_page(
        self, scope: Scope, send: Send, name: str, refusal: errors.Refusal
    ) -> None:
        state = str(refusal.extra.get("state") or self._state(name))
        detail = str(refusal) if refusal.status == 502 else ""
        body = waiting.waiting_page(name, state, detail)
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"retry-after", str(waiting.REFRESH_SECONDS).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else body})
        if self.observer is not None:
            self.observer.waiting_page_served(name)

    async def _forward_http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        name: str,
        url: str,
        target: bytes,
        wake: tuple[bytes, bytes],
    ) -> None:
        request_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers = self._forward_headers(scope, name, _HTTP_DROP)
        declared = _declared_length(request_headers)
        body = _RequestBody(receive)
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
                except errors.Refusal as refusal:  # the edge's body limit, on the first chunk
                    await refuse(scope, send, refusal)
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
        except errors.Refusal as refusal:  # the edge's body limit, while uploading
            if answered:
                raise
            await refuse(scope, send, refusal)
        except errors.AgentHTTPError as exc:
            if answered:
                raise  # mid-answer: the client's connection is cut, nothing else to say
            await self._upstream_failed(scope, send, name, exc)

    async def _upstream_failed(
        self, scope: Scope, send: Send, name: str, exc: errors.AgentHTTPError
    ) -> None:
        detail = str(exc) or type(exc).__name__
        log.info("agent %s: proxied request failed upstream: %s", name, detail)
        await refuse(
            scope,
            send,
            errors.Refusal(
                504 if isinstance(exc, errors.AgentTimeout) else 502,
                f"agent {name!r} did not answer: {detail}",
                agent=name,
                state=self._state(name),
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
        """Send the agent's answer to the client (header names arrive lower-case)."""
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

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, name: str, path: bytes
    ) -> None:
        try:
            self._record(name)
        except errors.Refusal as refusal:
            await refuse(scope, send, refusal)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        async with self._agents.busy(name) as touch:
            try:
                record = self._record(name)
                if record.awake:
                    assert record.url is not None
                    url, cold, wake_ms = record.url, *_NOT_WOKEN
                else:
                    url, cold, wake_ms = await self._woken_url(name, record)
            except errors.Refusal as refusal:
                await refuse(scope, send, refusal)
                return
            query: bytes = scope.get("query_string", b"")
            target = path + b"?" + query if query else path
            try:
                upstream = await self._client.websocket(
                    url,
                    target,
                    headers=self._forward_headers(scope, name, _WEBSOCKET_DROP),
                    protocols=tuple(scope.get("subprotocols") or ()),
                    max_message_size=WEBSOCKET_MAX_MESSAGE,
                )
            except errors.AgentHTTPError as exc:
                if exc.status is not None:
                    error = f"agent {name!r} refused the WebSocket upgrade (HTTP {exc.status})"
                else:
                    error = f"agent {name!r} did not answer: {exc or type(exc).__name__}"
                status = 504 if isinstance(exc, errors.AgentTimeout) else 502
                await refuse(
                    scope, send, errors.Refusal(status, error, agent=name, state=self._state(name))
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
                await _relay_websocket(receive, send, upstream, name, touch)
            finally:
                self.open_streams -= 1
                await upstream.close()


class _RequestBody:
    """The client's request body, read from ASGI ``receive`` as upstream wants it
    (``receive`` is the edge's: it refuses a body over ``server.max_body_size``)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        #: every byte of the request body has been read (or there was none).
        self.consumed = True
        #: the body is held whole in memory, so the request can be sent again.
        self.replayable = True

    async def start(self) -> bytes | AsyncIterator[bytes]:
        """The body whole when it came in one piece, else a stream of its chunks."""
        self.consumed = False
        first = await self._receive()
        if first["type"] != "http.request":
            raise _ClientGone
        chunk: bytes = first.get("body", b"")
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

    async def _stream(self, first: bytes) -> AsyncIterator[bytes]:
        if first:
            yield first
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone  # disconnected while sending its body
            chunk: bytes = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.consumed = True
                return


async def _relay_websocket(
    receive: Receive,
    send: Send,
    upstream: AgentWebSocket,
    name: str,
    touch: Callable[[], None],
) -> None:
    """Pump messages both ways until either side closes; then close the other."""

    async def client_to_agent() -> int:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                touch()
                text: str | None = message.get("text")
                await upstream.send(text if text is not None else message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                code: int = message.get("code", 1000)
                return code

    async def agent_to_client() -> int:
        # An agent's failed WebSocket raises here: the client is closed with 1011.
        while (data := await upstream.receive()) is not None:
            touch()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
        return upstream.close_code or 1000

    from_client = asyncio.create_task(client_to_agent(), name=f"roost.ws.in[{name}]")
    from_agent = asyncio.create_task(agent_to_client(), name=f"roost.ws.out[{name}]")
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
