"""Routing by event type: ``POST /api/route/{event_type}`` over the dispatcher.

Role: HTTP front end of ``Dispatcher.route`` (``roost.reactor.delivering``),
served on the admin API and, for agents with ``may_route = true``, on the agent
listener. The JSON body is stored durably, as the bytes the client sent, for the first agent whose
``event_types`` match, in configuration order (202 ``{"id", "agent"}``), or with
``?all=true`` a copy for every matching agent (202 with a list of them).

Invariants:
- Nothing is stored unless the answer is 2xx: an event type nobody handles is 404
  naming it; a malformed type 400 naming what is wrong; bodies are checked as
  ``POST .../messages`` checks them (400, 413 at the edge); a full queue is 429
  (with ``?all=true`` the copies already stored for earlier agents stay).
- ``Idempotency-Key`` works per agent as for messages: a repeat answers 200
  with the stored message's id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from roost import errors
from roost.api.errors import error_responses
from roost.api.messages import (
    IDEMPOTENCY_KEY_HEADER,
    MAX_IDEMPOTENCY_KEY,
    QUEUE_FULL_RETRY_AFTER,
    json_body,
)
from roost.core import routing
from roost.engine import Engine
from roost.ports.inbox import QueueFull

__all__ = ["route_router"]


def route_router(engine: Engine) -> APIRouter:
    """The routing route."""
    router = APIRouter(tags=["routing"])
    dispatcher = engine.dispatcher

    @router.post(
        "/api/route/{event_type}",
        status_code=202,
        summary="Store a JSON message for the agent(s) that handle this event type.",
        responses={
            200: {"description": "An Idempotency-Key repeat (every copy stored before)."},
            **error_responses(400, 404, 413, 429, 503),
        },
    )
    async def route_event(
        event_type: str,
        request: Request,
        fan_out: Annotated[
            bool,
            Query(alias="all", description="Every matching agent gets its own copy."),
        ] = False,
    ) -> Response:
        try:
            routing.check_event_type(event_type)
        except ValueError as exc:
            raise errors.Refusal(400, str(exc)) from None
        dispatcher.route_targets(event_type, fan_out=fan_out)  # 404 before the body is read
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise errors.Refusal(
                400, f"{IDEMPOTENCY_KEY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )
        body = json_body(await request.body())
        try:
            stored = await dispatcher.route(event_type, body, fan_out=fan_out, idempotency_key=key)
        except errors.StoreError as exc:
            engine.health.fail("store", str(exc))
            raise
        except QueueFull as exc:
            raise errors.Refusal(
                429, f"{exc}; retry later", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)}
            ) from None
        except errors.StateError as exc:
            raise errors.Refusal(503, str(exc)) from None
        engine.health.clear("store")
        accepted: list[dict[str, Any]] = [
            {"id": message.id, "agent": message.agent, "event_type": event_type}
            for message, _ in stored
        ]
        status = 202 if any(created for _, created in stored) else 200
        return JSONResponse(accepted if fan_out else accepted[0], status_code=status)

    return router
