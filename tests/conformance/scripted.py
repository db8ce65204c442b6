"""A TCP server that reads requests with h11 and answers with bytes a test scripts.

For the answers real servers rarely give on demand: trailers and chunk
extensions, 1xx before the final answer, a garbage status line, a head over
64 KiB, an idle keep-alive connection closed, an accepted request never
answered. Requests are parsed by h11 (server role); only the answers are
written by hand, byte for byte as each test wants them on the wire.

Invariants: every request is recorded in ``seen`` (with the number of the
connection it came on) before it is answered; ``stop`` closes every
connection, including the ones told to hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

import h11

__all__ = ["Answer", "ScriptedServer", "Seen", "answer", "chunked"]


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the server does with a request."""

    #: bytes written as the answer, exactly.
    wire: bytes = b""
    #: afterwards: keep the connection for the next request, close it, or stay
    #: silent (never answer, keep the connection open until the client leaves).
    then: Literal["keep", "close", "hang"] = "keep"
    #: read the whole request body before answering.
    read_body: bool = True
    #: write ``100 Continue`` before reading the body.
    continue_first: bool = False
    #: on a connection that already carried a request: close it without answering
    #: (a keep-alive connection the server timed out just as the request came).
    drop_when_reused: bool = False


@dataclasses.dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    #: which connection (1, 2, ...) and which request on it (0, 1, ...).
    connection: int
    index: int


def answer(
    status: int = 200,
    body: bytes = b"ok",
    *,
    headers: Mapping[str, str] | None = None,
    reason: str = "",
    length: bool = True,
) -> bytes:
    """An HTTP/1.1 answer; ``length=False`` leaves Content-Length out."""
    lines = [f"HTTP/1.1 {status} {reason or 'Whatever'}"]
    fields = dict(headers or {})
    if length:
        fields.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(
    *pieces: bytes, extensions: bool = False, trailers: Mapping[str, str] | None = None
) -> bytes:
    """A chunked body of ``pieces`` (``;ext`` on every chunk when asked), with trailers."""
    out = b""
    for number, piece in enumerate(pieces):
        extension = f';ext{number}="v {number}"'.encode() if extensions else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
    out += b"0\r\n"
    for name, value in (trailers or {}).items():
        out += f"{name}: {value}\r\n".encode()
    return out + b"\r\n"


Route = Answer | Callable[[Seen], Answer]


class ScriptedServer:
    """Answers by path (the target without its query); unknown paths get 404."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.seen: list[Seen] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.target.partition("?")[0] == path]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        index = 0
        try:
            while True:
                event = await _next(parser, reader)
                if not isinstance(event, h11.Request):
                    return  # the client closed (or sent garbage)
                target = event.target.decode("latin-1")
                seen = Seen(
                    event.method.decode(),
                    target,
                    {k.decode(): v.decode("latin-1") for k, v in event.headers},
                    b"",
                    number,
                    index,
                )
                route = self.routes.get(target.partition("?")[0])
                if route is None:
                    todo = Answer(answer(404, b"no such path"))
                else:
                    todo = route(seen) if callable(route) else route
                if todo.drop_when_reused and index > 0:
                    self.seen.append(seen)
                    return
                if todo.continue_first:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if todo.read_body:
                    while isinstance(data := await _next(parser, reader), h11.Data):
                        seen.body += data.data
                self.seen.append(seen)
                writer.write(todo.wire)
                await writer.drain()
                if todo.then == "close" or not todo.read_body:
                    return
                if todo.then == "hang":
                    while await reader.read(65536):
                        pass
                    return
                leftover, _ = parser.trailing_data
                parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
                if leftover:  # (receive_data(b"") would mean the client closed)
                    parser.receive_data(leftover)
                index += 1
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _next(parser: h11.Connection, reader: asyncio.StreamReader) -> h11.Event | type:
    while True:
        event = parser.next_event()
        if event is not h11.NEED_DATA:
            return event
        parser.receive_data(await reader.read(65536))
