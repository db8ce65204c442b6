"""``roost.edge.connections``: a response head goes out with its first body bytes."""

from __future__ import annotations

import asyncio

from roost.edge.connections import HeadHeldTransport


class RecordingTransport:
    """The calls uvicorn's response cycle makes, recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _held(transport: RecordingTransport) -> HeadHeldTransport:
    return HeadHeldTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]


async def _next_iteration() -> None:
    await asyncio.sleep(0)  # one loop iteration, not a wait for anything
    await asyncio.sleep(0)


async def test_head_and_body_are_one_write_when_written_in_one_go() -> None:
    transport = RecordingTransport()
    held = _held(transport)
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    held.write(b"body")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    await _next_iteration()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]


async def test_head_goes_alone_at_the_end_of_the_iteration_when_the_body_is_late() -> None:
    transport = RecordingTransport()
    held = _held(transport)
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await _next_iteration()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    held.write(b"chunk 1")
    held.write(b"chunk 2")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n", b"chunk 1", b"chunk 2"]


async def test_held_head_is_written_before_close_when_closed_at_once() -> None:
    transport = RecordingTransport()
    held = _held(transport)
    held.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    held.close()
    assert transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    assert transport.closed
    await _next_iteration()  # the scheduled flush writes nothing more
    assert transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]


async def test_held_head_is_dropped_when_the_connection_closed_meanwhile() -> None:
    transport = RecordingTransport()
    held = _held(transport)
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.close()  # the client went away
    await _next_iteration()
    assert transport.writes == []
    assert held.is_closing()
