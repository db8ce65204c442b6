"""``GET /api/events``: Roost's event hub as server-sent events (or, with ``?recent=N``, JSON).

Role: HTTP front end of :class:`roost.reactor.eventing.EventHub` — lifecycle
changes (``agent.state``, ``agent.failed``), ``message.status`` and notices
such as ``agent.waking``.

Invariants:
- Each event is one SSE frame: ``id:`` (the hub's integer id), ``event:`` (its
  kind) and ``data:`` (its JSON on one line). ``Last-Event-ID`` (or
  ``?last_event_id=``) resumes after that id with what the hub still buffers;
  without it the stream starts with live events.
- A comment line is sent at once (so clients see the stream open) and every
  ``HEARTBEAT_INTERVAL`` seconds without events (so proxies keep it open).
- A stream ends promptly when the client disconnects (Starlette cancels it) or
  when ``EventStreams.close`` is called (server shutdown): an open stream must
  never keep the server from stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse

from roost.api.errors import error_responses
from roost.engine import Engine
from roost.reactor.eventing import HubEvent

__all__ = ["HEARTBEAT_INTERVAL", "EventStreams", "events_router", "sse_frame"]

HEARTBEAT_INTERVAL = 15.0
MAX_RECENT = 10_000


class EventStreams:
    """Ends every open stream (events, followed logs) when closed (call it when the
    server stops)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    async def close(self) -> None:
        self.closing.set()

    async def until_closed(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """``chunks`` until they end or the streams are closed."""
        closing = asyncio.ensure_future(self.closing.wait())
        following: asyncio.Future[str] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait(
                    {following, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if following not in done:
                    return
                try:
                    yield following.result()
                except StopAsyncIteration:
                    return
                following = None
        finally:
            for task in (following, closing):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(
                *(t for t in (following, closing) if t is not None), return_exceptions=True
            )
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(RuntimeError):
                    await aclose()


def sse_frame(event: HubEvent) -> bytes:
    data = json.dumps(event.to_json(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def _stream(
    engine: Engine, streams: EventStreams, last_id: int | None, heartbeat: float
) -> AsyncIterator[bytes]:
    events = engine.events.subscribe(last_id)
    closing: asyncio.Future[Any] = asyncio.ensure_future(streams.closing.wait())
    following: asyncio.Future[Any] | None = None
    try:
        yield b": roost events\n\n"
        while not streams.closing.is_set():
            if following is None:
                following = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait(
                {following, closing}, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
            )
            if following in done:
                try:
                    event: HubEvent = following.result()
                except StopAsyncIteration:
                    return
                following = None
                yield sse_frame(event)
            elif not done:
                yield b": heartbeat\n\n"
    finally:
        for task in (following, closing):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (following, closing) if t), return_exceptions=True)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()


def events_router(
    engine: Engine,
    streams: EventStreams,
    *,
    dependencies: Sequence[Depends] = (),
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
) -> APIRouter:
    """The event routes, guarded by ``dependencies`` (the API's token check)."""
    router = APIRouter(tags=["events"], dependencies=list(dependencies))

    @router.get(
        "/api/events",
        summary="Server-sent events: lifecycle, message status, agent.waking.",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "A stream of events (text/event-stream), or with ?recent=N "
                "the newest N as JSON.",
                "content": {
                    "text/event-stream": {
                        "schema": {"type": "string"},
                        "example": 'id: 1767225600000001\nevent: agent.state\ndata: {"id": '
                        '1767225600000001, "kind": "agent.state", "at": 1767225600.5, '
                        '"agent": "echo", "from": "starting", "to": "running"}\n\n',
                    },
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/EventList"},
                    },
                },
            },
            **error_responses(400, 422),
        },
    )
    async def get_events(
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[
            int | None, Query(description="Resume after this event id (like Last-Event-ID).")
        ] = None,
        recent: Annotated[
            int | None,
            Query(ge=0, le=MAX_RECENT, description="Answer the newest N events as JSON instead."),
        ] = None,
    ) -> Response:
        if recent is not None:
            events: list[dict[str, Any]] = [e.to_json() for e in engine.events.recent(recent)]
            return JSONResponse({"events": events})
        resume = last_event_id
        if last_event_id_header is not None:
            try:
                resume = int(last_event_id_header.strip())
            except ValueError:
                return JSONResponse(
                    {"error": f"Last-Event-ID must be an event id, not {last_event_id_header!r}"},
                    status_code=400,
                )
        return StreamingResponse(
            _stream(engine, streams, resume, heartbeat_interval),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
