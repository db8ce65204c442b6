"""A minimal pooled HTTP/1.1 client for the proxy's hot path (asyncio + httptools).

Role: send one request to an agent and hand back its response head and a
stream of body chunks, over keep-alive connections reused per ``(host, port)``.
It exists because the proxy forwards bytes it already has (raw header pairs,
body chunks): a general client (aiohttp) spends most of a warm proxied
request's CPU on building, validating and wrapping what is passed through
here untouched. WebSockets still go through aiohttp.

Invariants:
- A connection returns to the pool only after its response ended cleanly
  (message complete, request body fully written, ``keep-alive`` per the
  response) and nobody holds it; anything else closes it.
- Header names and values go out as given: the caller passes bytes it took
  from a parsed request (no CR/LF inside) and sets framing itself except for
  the body Roost frames: a whole body gets ``Content-Length``; a streamed one
  keeps the caller's ``Content-Length`` or is sent ``chunked``.
- ``UpstreamDisconnected`` means the connection closed before a single
  response byte arrived (a stale pooled connection): the request may be sent
  again when it can be replayed. Every other failure is ``UpstreamError``
  (or ``OSError``/``TimeoutError`` from connecting).
- Informational (1xx) responses other than 101 are skipped; a ``HEAD``
  response ends at its head (the connection is then not reused).
- Reading pauses when more than ``READ_HIGH_WATER`` bytes wait unread, so a
  slow client slows the agent instead of filling Roost's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import cast

import httptools

__all__ = [
    "READ_HIGH_WATER",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

#: Unread response bytes buffered per connection before reading pauses.
READ_HIGH_WATER = 256 * 1024
#: Idle keep-alive connections kept per agent address.
MAX_IDLE_PER_HOST = 256

_CRLF = b"\r\n"


class UpstreamError(Exception):
    """The agent's connection failed or spoke broken HTTP."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed before any byte of the response arrived."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self._informational = False
        self._got_bytes = False
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self.complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the agent switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the agent sent invalid HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells the waiters

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        self._pool._forget(self)
        if not self.complete:
            if not self._got_bytes:
                error: UpstreamError = UpstreamDisconnected(
                    "the agent closed the connection before answering"
                )
            else:
                error = UpstreamError("the agent closed the connection mid-response")
            self._fail(error, close=False)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # e.g. 100 Continue: the real answer follows
            return
        self.status = status
        self.keep_alive = bool(self._parser.should_keep_alive())
        if self._head_only:
            # A HEAD answer has no body whatever its Content-Length says; the parser
            # cannot be told, so the exchange ends here and the connection is dropped.
            self.keep_alive = False
            self.complete = True
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self._wake()

    # -- exchange ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException, *, close: bool = True) -> None:
        if self._error is None:
            self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: nobody may be waiting any more
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if close and self.transport is not None:
            self.transport.close()

    def send_now(self, data: bytes) -> None:
        """Write without waiting for the buffer to drain (a whole small request)."""
        if self.closed or self.transport is None:
            raise UpstreamDisconnected("the agent's connection closed before the request")
        self.transport.write(data)

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self._error or UpstreamError("the agent's connection is closed")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def head(self) -> None:
        await self._head

    def buffered_body(self) -> bytes:
        """Everything received of the body so far (all of it once ``complete``)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._consumed()
        return data

    async def read_chunk(self) -> bytes:
        """The next body bytes; ``b""`` at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.buffered_body()

    def _consumed(self) -> None:
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def begin(self, *, head_only: bool) -> None:
        self._reset(head_only=head_only)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class UpstreamResponse:
    """An agent's answer: ``status``, raw ``headers`` and the body as it arrives."""

    __slots__ = ("_body_task", "_connection", "_done", "headers", "status")

    def __init__(self, connection: _Connection, body_task: asyncio.Task[None] | None) -> None:
        self._connection = connection
        self._body_task = body_task
        self._done = False
        self.status = connection.status
        self.headers = connection.headers

    @property
    def complete(self) -> bool:
        """The whole body has arrived (``body()`` returns it without waiting)."""
        return self._connection.complete

    def body(self) -> bytes:
        """The body received so far: all of it when ``complete``."""
        return self._connection.buffered_body()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive, until its end."""
        while True:
            chunk = await self._connection.read_chunk()
            if not chunk:
                return
            yield chunk

    async def release(self) -> None:
        """Done with the response: pool the connection if the exchange ended cleanly."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        clean = connection.complete and connection.keep_alive and not connection.closed
        if self._body_task is not None:
            if not self._body_task.done():
                clean = False
                self._body_task.cancel()
            with contextlib.suppress(BaseException):
                await self._body_task
            if self._body_task.cancelled() or self._body_task.exception() is not None:
                clean = False
        connection._pool._release(connection, reuse=clean)

    def close(self) -> None:
        """Abandon the response: the connection is closed, never reused."""
        if self._done:
            return
        self._done = True
        if self._body_task is not None and not self._body_task.done():
            self._body_task.cancel()
        self._connection._pool._release(self._connection, reuse=False)


class UpstreamPool:
    """Keep-alive connections to agents, by ``(host, port)``."""

    def __init__(self, *, connect_timeout: float, max_idle_per_host: int = MAX_IDLE_PER_HOST):
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._body_tasks: set[asyncio.Task[None]] = set()

    @property
    def idle_connections(self) -> int:
        return sum(len(found) for found in self._idle.values())

    async def request(
        self,
        host: str,
        port: int,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        length_given: bool = False,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head.

        ``body``: None (no body), bytes (sent with Content-Length) or chunks
        (sent as they come: raw when ``length_given``, i.e. ``headers`` hold the
        client's Content-Length, else chunked). Raises UpstreamError, OSError,
        TimeoutError.
        """
        key = (host, port)
        connection = self._take_idle(key)
        if connection is None:
            connection = await self._connect(key)
        connection.begin(head_only=method == b"HEAD")
        parts = [
            method,
            b" ",
            target,
            b" HTTP/1.1\r\nhost: ",
            host.encode(),
            b":",
            str(port).encode(),
            _CRLF,
        ]
        for name, value in headers:
            parts += (name, b": ", value, _CRLF)
        body_task: asyncio.Task[None] | None = None
        try:
            if body is None:
                parts.append(_CRLF)
                connection.send_now(b"".join(parts))
            elif isinstance(body, bytes):
                parts += (b"content-length: ", str(len(body)).encode(), _CRLF, _CRLF, body)
                connection.send_now(b"".join(parts))
            else:
                if not length_given:
                    parts.append(b"transfer-encoding: chunked\r\n")
                parts.append(_CRLF)
                await connection.write(b"".join(parts))
                # The body goes up while the answer may already come down (no deadlock
                # with an agent that streams its reply while reading).
                body_task = asyncio.create_task(
                    _send_body(connection, body, chunked=not length_given),
                    name="roost.proxy.upload",
                )
                self._body_tasks.add(body_task)
                body_task.add_done_callback(self._body_tasks.discard)
            if body_task is None:
                await connection.head()
            else:
                await _head_or_upload_failure(connection, body_task)
        except BaseException:
            if body_task is not None:
                body_task.cancel()
            self._release(connection, reuse=False)
            raise
        return UpstreamResponse(connection, body_task)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()
        for task in list(self._body_tasks):
            task.cancel()
        if self._body_tasks:
            await asyncio.gather(*self._body_tasks, return_exceptions=True)

    # -- pool --------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            transport, protocol = await loop.create_connection(
                lambda: _Connection(self, key), key[0], key[1]
            )
        # uvloop may return before connection_made has run: take the transport here.
        protocol.transport = transport
        self._open.add(protocol)
        return protocol

    def _release(self, connection: _Connection, *, reuse: bool) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if reuse and not connection.closed and len(idle) < self._max_idle:
            idle.append(connection)
            return
        connection.close()
        self._open.discard(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)


async def _send_body(connection: _Connection, body: AsyncIterator[bytes], *, chunked: bool) -> None:
    async for chunk in body:
        if not chunk:
            continue
        if chunked:
            await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            await connection.write(chunk)
    if chunked:
        await connection.write(b"0\r\n\r\n")


async def _head_or_upload_failure(connection: _Connection, upload: asyncio.Task[None]) -> None:
    """Wait for the response head; if the upload fails first, raise its error."""
    head = asyncio.ensure_future(connection.head())
    try:
        done, _ = await asyncio.wait((head, upload), return_when=asyncio.FIRST_COMPLETED)
        if head in done:
            head.result()
            return
        upload.result()  # raises the upload's failure (a finished upload returns)
        await head
    finally:
        if not head.done():
            head.cancel()
            with contextlib.suppress(BaseException):
                await head
