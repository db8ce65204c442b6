"""``HttpAgentClient``: Roost's one HTTP client for agents (probes, delivery, proxy).

Role: implements ``roost.ports.agent_http.AgentClient``. HTTP/1.1 framing is
h11's (a maintained, pure-Python HTTP/1.1 state machine; it ships with uvicorn
and httpcore); this module drives it from an asyncio ``Protocol`` and keeps
its own small keep-alive pool. WebSockets go through aiohttp, behind the same
object.

Why h11 on a Protocol rather than httpcore's pool, measured here (2 cores,
shared; sequential warm GETs to a raw asyncio server in the same process, CPU of
both sides per request): httpcore 1.0.9 375-525 µs (anyio locks and streams per
request; its profile is led by a failing ``import sniffio`` on every request),
this client 68-85 µs, aiohttp 53-63 µs, the hand-written httptools client it
replaced 18-21 µs. Of this client's cost h11 itself is ~40 µs (validating the
request's headers, parsing the answer's head with regexes, its state machine);
the Protocol, pool and futures around it ~15 µs. httpcore would miss the
proxy's targets (bench P4) by far. h11 also exposes what the proxy needs and
httpcore hides: the 100 Continue before the final answer, the states that say
whether a connection can be reused, and the end of a close-delimited body.

Measured again for issue 13 (CPU of a uvicorn process per proxied GET, 50
connections, a static upstream): uvicorn answering by itself 18-23 µs;
forwarding through this client 86-95 µs; through aiohttp's ``ClientSession``
94-101 µs (its C parser is cheap, its session is not). h11 is most of this
client's own cost: 52 µs per exchange in isolation (``Request`` 10, sending it
11, parsing the answer 28). aiohttp's C response parser alone takes 2.6 µs
per answer, and a prototype forwarding with it under a pool like this one
(h11 still writing the request) cost 55-70 µs. It is not used: that means
driving aiohttp's undocumented parser, ``StreamReader`` and protocol flow
control (whose signatures changed as late as 3.14) from here, where a new
aiohttp could break the one agent client at run time. The answer deadline is
one timer per connection, moved only when it fires early or stands too late,
not one armed and cancelled per request.

Invariants:
- Framing is h11's and covers RFC 9112: ``Content-Length``; ``chunked`` with
  extensions (ignored) and trailers (read and dropped); close-delimited bodies
  (HTTP/1.0 servers, CGI: the body ends when the agent closes the connection);
  no body after ``HEAD``, 1xx, 204 and 304. 1xx answers before the final one
  are skipped (a 100 only releases a body held for ``Expect: 100-continue``).
- A response head (status line and headers) may be up to ``MAX_HEAD_SIZE``
  (64 KiB); a larger one fails the request like any invalid answer.
- A connection goes back to the pool only when h11 says both sides finished
  the exchange and keep-alive holds; any other end closes it. A pooled
  connection is dropped when the agent closed it (seen as EOF while idle), or
  once it has idled past the agent's ``Keep-Alive: timeout=N`` (less
  ``KEEP_ALIVE_MARGIN``) or ``IDLE_TIMEOUT``. The pool is LIFO per (host, port).
- Replay: a request whose connection closed before any byte of the answer is
  sent again on another connection only when that connection had been pooled
  (a keep-alive race), its method is idempotent (GET, HEAD, OPTIONS, PUT,
  DELETE, TRACE) and its body is in memory. A request that may not be replayed
  takes a pooled connection only if it was in use within ``UNSAFE_REUSE_IDLE``
  (servers close idle connections after seconds, not less), else a new one.
- ``Expect: 100-continue`` with a streamed body: the body is pulled from the
  caller's stream only after the agent's 100, or after ``CONTINUE_TIMEOUT``
  without any answer; a final answer first means the body is never read (and
  the connection, whose request is unfinished, is closed afterwards).
- Backpressure both ways: reading pauses while more than ``READ_HIGH_WATER``
  body bytes wait unread; a streamed upload waits while the socket's write
  buffer is full. Neither direction holds a whole body unless it is given one.
- Errors: ``AgentHTTPError`` (refused, reset, cut, invalid HTTP, head too
  large) and ``AgentTimeout`` (connect or answer too slow), translated here
  with ``from``; an exception raised by the caller's body stream propagates
  unchanged. Every upload task is named and owned by its exchange, which
  cancels and awaits it on exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, cast

import aiohttp
import h11
from yarl import URL

from roost import errors
from roost.ports.agent_http import AgentResponse, Headers, ProbeResult, RequestBody

__all__ = [
    "CONTINUE_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "IDLE_TIMEOUT",
    "MAX_HEAD_SIZE",
    "READ_HIGH_WATER",
    "UNSAFE_REUSE_IDLE",
    "HttpAgentClient",
]

#: Largest response head accepted (h11's own default is 16 KiB).
MAX_HEAD_SIZE = 64 * 1024
#: Unread response body bytes buffered per connection before reading pauses.
READ_HIGH_WATER = 256 * 1024
#: Longest a connection stays pooled without use.
IDLE_TIMEOUT = 15.0
#: Pooled connections are dropped this long before the agent's Keep-Alive timeout.
KEEP_ALIVE_MARGIN = 1.0
#: A request that may not be replayed reuses only connections idle for less than this.
UNSAFE_REUSE_IDLE = 1.0
#: Wait for ``100 Continue`` this long before sending an expecting body anyway (as curl).
CONTINUE_TIMEOUT = 1.0
#: Time to open a TCP connection to an agent.
CONNECT_TIMEOUT = 10.0
#: Idle connections kept per agent address.
MAX_IDLE_PER_ORIGIN = 256
#: RFC 9110 9.2.2: a repeated request has the effect of one.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_Key = tuple[str, int]
_CHUNKED = (b"transfer-encoding", b"chunked")


class _NoAnswer(errors.AgentHTTPError):
    """The connection closed before a single byte of the answer arrived."""


class _NotSent(_NoAnswer):
    """The connection was found closed before any of the request was written."""


class _Connection(asyncio.Protocol):
    """One connection to an agent and its h11 state; carries one exchange at a time."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.closed = False
        #: when the connection last went back to the pool, and when it must leave it.
        self.idle_since = 0.0
        self.expires_at = 0.0
        self.on_lost: Callable[[_Connection], None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        #: the current exchange's answer deadline (loop time) and its length in seconds;
        #: one timer per connection, moved only when it fires early or is too late.
        self._answer_timeout = 0.0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.begin()

    def begin(self) -> None:
        """Reset the per-exchange state (the h11 state is reset by start_next_cycle)."""
        self.response: h11.Response | None = None
        #: the answer's header pairs (names lower-case), once its head arrived.
        self.headers: list[tuple[bytes, bytes]] = []
        #: bytes received before the head was complete (bounds the head's size).
        self.received = 0
        self.head: asyncio.Future[None] = self._loop.create_future()
        self.continued: asyncio.Future[None] | None = None
        self.complete = False
        self.got_bytes = False
        self.error: errors.AgentHTTPError | None = None
        self._chunks: collections.deque[bytes | bytearray] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        #: no deadline until ``answer_head`` sets this exchange's own: a timer left
        #: standing by the previous exchange must not cut this one's upload short.
        self._answer_deadline = float("inf")

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.response is None:
            self.received += len(data)
        self.h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool | None:
        if self.got_bytes and not self.complete:
            # The end of a close-delimited body, or an answer cut short: h11 says which.
            # (With no answer byte yet, connection_lost reports a closed connection.)
            with contextlib.suppress(RuntimeError):  # a second EOF
                self.h11.receive_data(b"")
            self._next_events()
        return None  # close the transport; connection_lost tells the waiters

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_deadline_timer()
        if self.on_lost is not None:
            self.on_lost(self)
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)
        if not self.complete:
            if self.got_bytes:
                error: errors.AgentHTTPError = errors.AgentHTTPError(
                    "the agent closed the connection mid-response"
                )
            else:
                error = _NoAnswer("the agent closed the connection before answering")
            self._fail(error, close=False)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- h11 events ---------------------------------------------------------------------

    def _next_events(self) -> None:
        connection = self.h11
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(errors.AgentHTTPError(f"the agent sent invalid HTTP: {exc}"))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            kind = type(event)
            if kind is h11.Data:
                data = cast(h11.Data, event).data
                self._chunks.append(data)
                self._buffered += len(data)
                if self._buffered > READ_HIGH_WATER and not self._reading_paused:
                    self._reading_paused = True
                    if self.transport is not None:
                        self.transport.pause_reading()
                self._wake()
            elif kind is h11.Response:
                response = cast(h11.Response, event)
                # h11 bounds a head that arrives in pieces; one read can hold a whole one.
                if self.received > MAX_HEAD_SIZE and _head_size(response) > MAX_HEAD_SIZE:
                    self._fail(
                        errors.AgentHTTPError(
                            f"the agent's response head is larger than {MAX_HEAD_SIZE} bytes"
                        )
                    )
                    return
                self.response = response
                self.headers = list(response.headers)
                if not self.head.done():
                    self.head.set_result(None)
            elif kind is h11.EndOfMessage:
                # Trailers (event.headers) are dropped: nothing downstream can carry them.
                self.complete = True
                self._wake()
                return  # h11 gives nothing more before the next cycle (it would say PAUSED)
            elif kind is h11.InformationalResponse:
                # 100 releases a held body; 102/103 and an unasked 100 are skipped.
                status = cast(h11.InformationalResponse, event).status_code
                continued = self.continued
                if status == 100 and continued is not None and not continued.done():
                    continued.set_result(None)
            else:  # ConnectionClosed: connection_lost follows
                return

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: errors.AgentHTTPError, *, close: bool = True) -> None:
        if self.error is None:
            self.error = error
        for future in (self.head, self.continued, self._waiter):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: its waiter may be gone already
        if close:
            self.close()

    # -- the exchange -------------------------------------------------------------------

    async def answer_head(self, timeout: float) -> None:
        """Wait for the answer's head; ``AgentTimeout`` after ``timeout`` seconds."""
        head = self.head
        if not head.done():
            deadline = self._loop.time() + timeout
            self._answer_deadline = deadline
            self._answer_timeout = timeout
            # A timer per request would be armed and cancelled every time (~1.4 µs); this
            # one is moved only when the deadline is earlier than where it stands.
            timer = self._deadline_timer
            if timer is None or self._timer_at > deadline:
                self._arm_deadline_timer(deadline)
            await head
        head.result()

    def _arm_deadline_timer(self, at: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._timer_at = at
        self._deadline_timer = self._loop.call_at(at, self._deadline_passed)

    def _stop_deadline_timer(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        head = self.head
        if head.done() or self._answer_deadline == float("inf"):
            # No exchange waits for a head yet (the next one arms its own deadline).
            return
        if self._loop.time() < self._answer_deadline:
            self._arm_deadline_timer(self._answer_deadline)  # armed for an earlier one
            return
        head.set_exception(
            errors.AgentTimeout(f"the agent did not answer within {self._answer_timeout:g}s")
        )

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self.error or _NotSent("the agent closed the connection before the request")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self.closed:
            raise self.error or errors.AgentHTTPError("the agent closed the connection")

    def send(self, event: h11.Event) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as exc:
            raise errors.AgentHTTPError(f"cannot send the request to the agent: {exc}") from exc
        if data:
            self.write(data)

    async def read(self) -> bytes:
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = bytes(chunks.popleft()) if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        connection = self.h11
        return (
            not self.closed
            and connection.our_state is h11.DONE
            and connection.their_state is h11.DONE
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._stop_deadline_timer()


def _head_size(response: h11.Response) -> int:
    """Bytes of a response head as sent (within a few: h11 strips whitespace)."""
    return 16 + len(response.reason) + sum(len(n) + len(v) + 4 for n, v in response.headers)


def _keep_alive_timeout(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    """The ``timeout=N`` parameter of a ``Keep-Alive`` header (RFC 2068 19.7.1.1)."""
    for name, value in headers:
        if name == b"keep-alive":
            for parameter in value.split(b","):
                key, _, number = parameter.partition(b"=")
                if key.strip().lower() == b"timeout":
                    try:
                        return float(number.strip())
                    except ValueError:
                        return None
    return None


class _Pool:
    """Idle keep-alive connections by (host, port), most recently used last."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open: set[_Connection] = set()

    @property
    def idle_connections(self) -> int:
        return sum(len(found) for found in self._idle.values())

    def idle_to(self, key: _Key) -> int:
        return len(self._idle.get(key, ()))

    def take(self, key: _Key, *, replayable: bool) -> _Connection | None:
        idle = self._idle.get(key)
        now = self._clock()
        while idle:
            connection = idle.pop()
            transport = connection.transport
            gone = connection.closed or transport is None or transport.is_closing()
            if gone or now >= connection.expires_at:
                self.discard(connection)
            elif not replayable and now - connection.idle_since >= UNSAFE_REUSE_IDLE:
                idle.append(connection)  # the freshest is too old: open a new one
                return None
            else:
                return connection
        return None

    def add(self, connection: _Connection) -> None:
        connection.on_lost = self._forget
        self._open.add(connection)

    def release(self, connection: _Connection, keep_alive: float | None) -> None:
        """Pool a connection whose exchange ended cleanly (``start_next_cycle`` done)."""
        lifetime = IDLE_TIMEOUT
        if keep_alive is not None:
            lifetime = min(lifetime, keep_alive - KEEP_ALIVE_MARGIN)
        idle = self._idle.setdefault(connection.key, [])
        if lifetime <= 0 or len(idle) >= MAX_IDLE_PER_ORIGIN or connection.closed:
            self.discard(connection)
            return
        now = self._clock()
        connection.idle_since = now
        connection.expires_at = now + lifetime
        idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()


class _Exchange:
    """One request and its answer: ``HttpAgentClient.stream``'s context manager and the
    ``AgentStream`` it gives."""

    __slots__ = (
        "_answer_timeout",
        "_body",
        "_client",
        "_connection",
        "_headers",
        "_method",
        "_origin",
        "_target",
        "_upload",
        "headers",
        "status",
    )

    def __init__(
        self,
        client: HttpAgentClient,
        method: str,
        origin: str,
        target: bytes,
        headers: Headers,
        body: RequestBody,
        answer_timeout: float,
    ) -> None:
        self._client = client
        self._method = method
        self._origin = origin
        self._target = target
        self._headers = headers
        self._body = body
        self._answer_timeout = answer_timeout
        self._connection: _Connection | None = None
        self._upload: asyncio.Task[None] | None = None
        #: the answer's status and raw headers (names lower-case), once it came.
        self.status = 0
        self.headers: Headers = ()

    async def __aenter__(self) -> _Exchange:
        connection = await self._client._send(self)
        response = connection.response
        assert response is not None
        self.status = response.status_code
        self.headers = connection.headers
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._upload is None:
            self.release()
        else:
            await self.finish()

    # -- AgentStream --------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._live().complete

    def read(self) -> Coroutine[Any, Any, bytes]:
        return self._live().read()

    def _live(self) -> _Connection:
        if self._connection is None:
            raise RuntimeError("the exchange is not open")
        return self._connection

    async def finish(self) -> None:
        """End the exchange: stop the upload if it still runs, then ``release``."""
        upload, self._upload = self._upload, None
        if upload is not None:
            if not upload.done():
                upload.cancel()
            await asyncio.wait((upload,))  # (a cancellation of ours still propagates)
            if not upload.cancelled():
                upload.exception()  # retrieved: what mattered was raised by _exchange_on
        self.release()

    def release(self) -> None:
        """Pool the connection when both sides ended cleanly, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        pool = self._client._pool
        if connection.complete and connection.reusable:
            connection.h11.start_next_cycle()
            pool.release(connection, _keep_alive_timeout(connection.headers))
        else:
            pool.discard(connection)


class HttpAgentClient:
    """HTTP/1.1 to agents over h11 with a keep-alive pool; WebSockets over aiohttp.

    ``clock`` (monotonic seconds) times pooled connections' idleness; tests pass
    a fake one to expire connections without waiting.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._pool = _Pool(clock)
        self._session: aiohttp.ClientSession | None = None
        self._origins: dict[str, tuple[_Key, bytes]] = {}
        self._urls: dict[str, tuple[str, bytes]] = {}

    @property
    def idle_connections(self) -> int:
        """Pooled connections waiting for a request (for tests and metrics)."""
        return self._pool.idle_connections

    def idle_connections_to(self, origin: str) -> int:
        """Pooled connections to ``http://host:port`` waiting for a request (tests)."""
        return self._pool.idle_to(self._address(origin)[0])

    # -- AgentClient ------------------------------------------------------------------

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        try:
            response = await self.request("GET", url, timeout=timeout)
        except errors.AgentTimeout:
            return ProbeResult(False, None, f"no answer within {timeout:g}s")
        except errors.AgentHTTPError as exc:
            return ProbeResult(False, None, str(exc))
        return ProbeResult(response.status == 200, response.status, f"HTTP {response.status}")

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        origin, target = self._split_url(url)
        try:
            async with asyncio.timeout(timeout):
                async with self.stream(
                    method, origin, target, headers=headers, body=body, answer_timeout=timeout
                ) as answer:
                    chunks = []
                    while chunk := await answer.read():
                        chunks.append(chunk)
                    return AgentResponse(
                        answer.status,
                        chunks[0] if len(chunks) == 1 else b"".join(chunks),
                        answer.headers,
                    )
        except TimeoutError as exc:
            if isinstance(exc, errors.AgentTimeout):
                raise
            raise errors.AgentTimeout(
                f"{method} {url}: no whole answer within {timeout:g}s"
            ) from exc

    def stream(
        self,
        method: str,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        body: RequestBody = None,
        answer_timeout: float,
    ) -> _Exchange:
        return _Exchange(self, method, origin, target, headers, body, answer_timeout)

    async def websocket(
        self,
        origin: str,
        target: bytes,
        *,
        headers: Headers = (),
        protocols: Sequence[str] = (),
        max_message_size: int,
    ) -> _AiohttpWebSocket:
        url = URL("ws" + origin[len("http") :] + target.decode("latin-1"), encoded=True)
        try:
            connection = await self._websocket_session().ws_connect(
                url,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                protocols=tuple(protocols),
                max_msg_size=max_message_size,
                autoclose=True,
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise errors.AgentHTTPError(
                f"the agent refused the WebSocket upgrade (HTTP {exc.status})", status=exc.status
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise errors.AgentTimeout(f"{origin}: no WebSocket handshake in time") from exc
            raise errors.AgentHTTPError(f"{origin}: {exc or type(exc).__name__}") from exc
        return _AiohttpWebSocket(connection)

    async def close(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals --------------------------------------------------------------------

    def _websocket_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = self._connect_timeout
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout),
                # A proxy relays: no decompression, no headers the client did not send.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _split_url(self, url: str) -> tuple[str, bytes]:
        """(origin, target) of an absolute http URL (cached: agents' URLs repeat)."""
        found = self._urls.get(url)
        if found is None:
            parts = urllib.parse.urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            found = (f"{parts.scheme}://{parts.netloc}", target.encode("latin-1"))
            if len(self._urls) > 4096:
                self._urls.clear()
            self._urls[url] = found
        return found

    def _address(self, origin: str) -> tuple[_Key, bytes]:
        """((host, port), Host header) of ``http://host:port`` (cached)."""
        found = self._origins.get(origin)
        if found is None:
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme != "http" or not parts.hostname:
                raise errors.AgentHTTPError(f"not an http:// agent address: {origin!r}")
            found = ((parts.hostname, parts.port or 80), parts.netloc.encode("latin-1"))
            if len(self._origins) > 4096:
                self._origins.clear()
            self._origins[origin] = found
        return found

    async def _connect(self, key: _Key) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, connection = await loop.create_connection(
                    lambda: _Connection(key), key[0], key[1]
                )
        except TimeoutError as exc:
            raise errors.AgentTimeout(
                f"no connection to {key[0]}:{key[1]} within {self._connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise errors.AgentHTTPError(
                f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}"
            ) from exc
        # uvloop may return before connection_made has run: take the transport here.
        connection.transport = transport
        self._pool.add(connection)
        return connection

    async def _send(self, exchange: _Exchange) -> _Connection:
        """Connect (or reuse), send the request and wait for the answer's head."""
        key, host = self._address(exchange._origin)
        body = exchange._body
        replayable = (body is None or isinstance(body, bytes)) and (
            exchange._method in IDEMPOTENT_METHODS
        )
        headers: list[tuple[bytes, bytes]] = [(b"host", host), *exchange._headers]
        if isinstance(body, bytes):
            headers.append((b"content-length", str(len(body)).encode()))
        elif body is not None and not any(name == b"content-length" for name, _ in headers):
            headers.append(_CHUNKED)
        try:
            request = h11.Request(method=exchange._method, target=exchange._target, headers=headers)
        except h11.LocalProtocolError as exc:
            raise errors.AgentHTTPError(f"cannot send the request to the agent: {exc}") from exc
        while True:
            connection = self._pool.take(key, replayable=replayable)
            pooled = connection is not None
            if connection is None:
                connection = await self._connect(key)
            exchange._connection = connection
            try:
                await _exchange_on(connection, exchange, request)
                return connection
            except _NoAnswer as exc:
                await exchange.finish()
                if pooled and (replayable or isinstance(exc, _NotSent)):
                    continue  # a keep-alive race: the agent closed it meanwhile
                raise errors.AgentHTTPError(str(exc)) from exc
            except BaseException:
                await exchange.finish()
                raise


async def _exchange_on(connection: _Connection, exchange: _Exchange, request: h11.Request) -> None:
    """Send ``request`` (and its body) on ``connection``; return once the head arrived."""
    connection.begin()
    timeout = exchange._answer_timeout
    body = exchange._body
    if body is None or isinstance(body, bytes):
        try:
            pieces = [connection.h11.send(request)]
            if body:
                pieces.append(connection.h11.send(h11.Data(data=body)))
            pieces.append(connection.h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            raise errors.AgentHTTPError(f"cannot send the request to the agent: {exc}") from exc
        connection.write(b"".join(pieces))
        await connection.answer_head(timeout)
        return
    connection.send(request)
    if connection.h11.client_is_waiting_for_100_continue:
        connection.continued = asyncio.get_running_loop().create_future()
        if not await _continued(connection):
            return  # answered before it asked for the body: the body is never read
    upload = asyncio.create_task(_upload(connection, body, timeout), name="roost.agent.upload")
    exchange._upload = upload
    head = connection.head
    await asyncio.wait((head, upload), return_when=asyncio.FIRST_COMPLETED)
    if not head.done():
        failure = upload.exception()
        if failure is None:
            await connection.answer_head(timeout)  # the whole body is sent: the answer is due
        elif isinstance(failure, errors.AgentHTTPError):
            connection._fail(failure)  # fails the head (and closes) if still waiting
        else:
            raise failure  # the caller's body stream failed (e.g. too large): as it is
    await head


async def _continued(connection: _Connection) -> bool:
    """After ``Expect: 100-continue``: True to send the body (100 came, or nothing within
    CONTINUE_TIMEOUT), False when the final answer came first."""
    continued = connection.continued
    assert continued is not None
    head = connection.head
    await asyncio.wait(
        (continued, head), timeout=CONTINUE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if head.done():
        head.result()  # raises when the connection failed
        return False
    if continued.done():
        continued.result()
    return True


async def _upload(
    connection: _Connection, body: AsyncIterable[bytes], stall_timeout: float
) -> None:
    """Send the body as it comes; fail when the agent reads none of it for ``stall_timeout``."""
    for_chunks = connection.h11
    async for chunk in body:
        if not chunk:
            continue
        try:
            pieces = for_chunks.send_with_data_passthrough(h11.Data(data=chunk))
        except h11.LocalProtocolError as exc:
            raise errors.AgentHTTPError(f"cannot send the request body: {exc}") from exc
        if pieces:
            connection.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        try:
            async with asyncio.timeout(stall_timeout):
                await connection.drain()
        except TimeoutError as exc:
            if isinstance(exc, errors.AgentHTTPError):
                raise
            raise errors.AgentTimeout(
                f"the agent read none of the request body for {stall_timeout:g}s"
            ) from exc
    connection.send(h11.EndOfMessage())


class _AiohttpWebSocket:
    """``AgentWebSocket`` over aiohttp's client WebSocket."""

    def __init__(self, connection: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = connection

    @property
    def subprotocol(self) -> str | None:
        return self._ws.protocol

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def send(self, data: str | bytes) -> None:
        try:
            if isinstance(data, str):
                await self._ws.send_str(data)
            else:
                await self._ws.send_bytes(data)
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.AgentHTTPError(f"WebSocket send failed: {exc}") from exc

    async def receive(self) -> str | bytes | None:
        while True:
            message = await self._ws.receive()
            kind = message.type
            if kind is aiohttp.WSMsgType.TEXT:
                text: str = message.data
                return text
            if kind is aiohttp.WSMsgType.BINARY:
                binary: bytes = message.data
                return binary
            if kind is aiohttp.WSMsgType.ERROR:
                raise errors.AgentHTTPError(f"the agent's WebSocket failed: {message.data}")
            if kind in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                return None

    async def close(self, code: int = 1000) -> None:
        await self._ws.close(code=code)
