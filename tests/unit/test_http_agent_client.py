"""``HttpAgentClient`` on its own: backpressure both ways and the errors it raises.

Framing, keep-alive and replay are covered end to end in tests/conformance; these
are the behaviours only visible from the client's side of the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from roost import errors
from roost.adapters.http_agent_client import READ_HIGH_WATER, HttpAgentClient
from tests.conftest import wait_until

PIECE = 1024 * 1024
ANSWER_SIZE = 32 * PIECE  # more than loopback's socket buffers hold

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[HttpAgentClient]:
    agent_client = HttpAgentClient(connect_timeout=5)
    yield agent_client
    await agent_client.close()


async def test_reading_pauses_and_agent_waits_when_caller_reads_slowly(
    client: HttpAgentClient,
) -> None:
    written = 0

    async def big_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")  # a GET: its head is all there is
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % ANSWER_SIZE)
        with contextlib.suppress(ConnectionError):
            for _ in range(ANSWER_SIZE // PIECE):
                writer.write(b"x" * PIECE)
                await writer.drain()
                written += PIECE
        writer.close()

    async with (
        raw_server(big_answer) as origin,
        client.stream("GET", origin, b"/big", answer_timeout=10) as answer,
    ):
        first = await answer.read()
        connection = answer._live()
        await wait_until(lambda: connection._reading_paused, timeout=10, what="reading paused")
        assert connection._buffered <= READ_HIGH_WATER + 512 * 1024
        assert written < ANSWER_SIZE  # the agent is held back by the caller
        received = len(first)
        while chunk := await answer.read():
            received += len(chunk)
        assert received == ANSWER_SIZE


async def test_upload_raises_timeout_when_agent_reads_none_of_it(client: HttpAgentClient) -> None:
    stop = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()  # accepts, never reads, never answers
        writer.close()

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"u" * PIECE

    try:
        async with raw_server(deaf) as origin:
            with pytest.raises(errors.AgentTimeout, match="read none of the request body"):
                async with client.stream(
                    "POST", origin, b"/upload", body=upload(), answer_timeout=0.5
                ):
                    pass
    finally:
        stop.set()


async def test_request_raises_timeout_naming_url_when_answer_never_ends(
    client: HttpAgentClient,
) -> None:
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")
        await stop.wait()
        writer.close()

    try:
        async with raw_server(trickle) as origin:
            with pytest.raises(errors.AgentTimeout, match=r"no whole answer within 0\.3s"):
                await client.request("GET", origin + "/slow", timeout=0.3)
    finally:
        stop.set()


async def test_request_raises_agent_http_error_when_url_is_not_http(
    client: HttpAgentClient,
) -> None:
    with pytest.raises(errors.AgentHTTPError, match="not an http:// agent address"):
        await client.request("GET", "https://127.0.0.1:1/health", timeout=1)


@contextlib.asynccontextmanager
async def held_second_answer() -> AsyncIterator[tuple[str, asyncio.Event, list[int]]]:
    """A keep-alive server: the first request is answered at once, every later one
    only when the yielded event is set; the list counts connections. On exit every
    connection is closed and its handler has ended."""
    release = asyncio.Event()
    connections: list[int] = []
    writers: list[asyncio.StreamWriter] = []
    handlers: list[asyncio.Task[object]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        writers.append(writer)
        connections.append(1)
        answered = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if answered:
                    await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                answered += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client closed the connection
        finally:
            writer.close()

    try:
        async with raw_server(serve) as origin:
            yield origin, release, connections
    finally:
        release.set()
        for writer in writers:
            writer.close()  # ends a handler still reading the next request
        await asyncio.gather(*handlers, return_exceptions=True)


async def test_answer_times_out_at_its_own_deadline_when_the_connection_had_a_later_one(
    client: HttpAgentClient,
) -> None:
    async with held_second_answer() as (origin, _, connections):
        async with client.stream("GET", origin, b"/first", answer_timeout=3600) as first:
            assert await first.read() == b"ok"
        with pytest.raises(errors.AgentTimeout, match=r"did not answer within 0\.2s"):
            async with client.stream("GET", origin, b"/second", answer_timeout=0.2):
                pass
        assert len(connections) == 1  # the pooled connection, whose timer stood later


async def test_answer_is_awaited_past_an_earlier_deadline_the_connection_had(
    client: HttpAgentClient,
) -> None:
    async with held_second_answer() as (origin, release, connections):
        async with client.stream("GET", origin, b"/first", answer_timeout=0.2) as first:
            assert await first.read() == b"ok"
            connection = first._live()

        async def second() -> bytes:
            async with client.stream("GET", origin, b"/second", answer_timeout=3600) as answer:
                return await answer.read()

        waiting = asyncio.create_task(second(), name="test.second-request")
        try:
            # The timer armed for the first answer's deadline fires and moves on.
            loop = asyncio.get_running_loop()
            await wait_until(
                lambda: connection._timer_at > loop.time() + 60,
                timeout=10,
                what="the answer timer moved to the second deadline",
            )
            assert not waiting.done()
            release.set()
            assert await waiting == b"ok"
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        assert len(connections) == 1


async def test_upload_is_not_cut_by_the_deadline_the_previous_answer_left_standing(
    client: HttpAgentClient,
) -> None:
    async with held_second_answer() as (origin, release, connections):
        async with client.stream("GET", origin, b"/first", answer_timeout=0.2) as first:
            assert await first.read() == b"ok"
            connection = first._live()
        go = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"part one"
            await go.wait()  # still uploading when the old timer fires
            yield b"part two"

        async def second() -> bytes:
            async with client.stream(
                "POST", origin, b"/second", body=body(), answer_timeout=3600
            ) as answer:
                return await answer.read()

        sending = asyncio.create_task(second(), name="test.second-request")
        try:
            await wait_until(
                lambda: connection._deadline_timer is None, what="the first answer's timer fired"
            )
            go.set()
            release.set()
            assert await sending == b"ok"
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        assert len(connections) == 1
