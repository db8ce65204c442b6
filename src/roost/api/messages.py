"""Message routes: ``/api/agents/{name}/messages`` over :class:`roost.reactor.delivering.Dispatcher`.

Role: HTTP front end of the durable inbox. ``POST`` stores a JSON value for an
agent and answers once it is committed (202 ``{"id", "agent", "status"}``), or
with ``?wait=true`` once the agent replied (200 with the reply; 202 with the id
when ``wait_timeout`` or ``?timeout=`` passes first). ``GET .../{id}`` shows one
message, ``GET`` without an id lists them.

Invariants:
- Nothing is stored unless the answer is 200/202: an unknown agent is 404, a
  body over ``server.max_body_size`` 413 (checked on ``Content-Length`` first,
  then enforced while reading), malformed JSON 400 naming line and column, a
  full queue (``queue_limit`` undelivered messages) 429 with ``Retry-After``.
- ``Idempotency-Key``: the same key for the same agent names one message; a
  repeated POST answers 200 with the stored message's id and status.
- Error bodies follow the API's shape: ``{"error": ..., "agent": ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response

from roost import errors
from roost.engine import Engine
from roost.ports.inbox import Message, MessageStatus, QueueFull

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "MAX_IDEMPOTENCY_KEY",
    "QUEUE_FULL_RETRY_AFTER",
    "messages_router",
]

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255
#: Seconds a refused sender is told to wait (``Retry-After``) when the queue is full.
QUEUE_FULL_RETRY_AFTER = 1
MAX_LIST = 1000


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _refusal(name: str, exc: _Refused) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc), "agent": name}, status_code=exc.status, headers=exc.headers
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: Request, max_size: int) -> Any:
    """The request's body as a JSON value; ``_Refused`` (413/400) otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Refused(400, f"invalid Content-Length header {declared!r}") from None
        if size > max_size:
            raise _Refused(
                413, f"message body is {size} bytes; the limit is {max_size} (server.max_body_size)"
            )
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_size:
            raise _Refused(
                413,
                f"message body exceeds {max_size} bytes (server.max_body_size)",
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(400, f"message body is not UTF-8: byte {exc.start} is invalid") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _Refused(
            400,
            f"message body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except ValueError as exc:
        raise _Refused(400, f"message body is not valid JSON: {exc}") from None


def _accepted(message: Message) -> dict[str, Any]:
    return {"id": message.id, "agent": message.agent, "status": message.status.value}


def _final(message: Message) -> dict[str, Any]:
    body = _accepted(message)
    body["attempts"] = message.attempts
    if message.status is MessageStatus.DELIVERED:
        body["reply"] = message.reply
    else:
        body["error"] = message.error or None
    return body


def messages_router(engine: Engine, *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The message routes, guarded by ``dependencies`` (the API's token check)."""
    router = APIRouter(tags=["messages"], dependencies=list(dependencies))
    dispatcher = engine.dispatcher
    inbox = engine.inbox
    max_body = engine.settings.server.max_body_size

    def known(name: str) -> None:
        if name not in engine.supervisor.actors:
            raise errors.NotFound(f"no agent named {name!r}")

    @router.post(
        "/api/agents/{name}/messages",
        status_code=202,
        summary="Store a JSON message for the agent (durable); wake it and deliver in order.",
        responses={
            200: {"description": "Replied (?wait=true), or an Idempotency-Key repeat."},
            400: {"description": "Malformed JSON (the error names line and column)."},
            404: {"description": "Unknown agent."},
            413: {"description": "Body over server.max_body_size."},
            429: {"description": "queue_limit undelivered messages; see Retry-After."},
        },
    )
    async def post_message(
        name: str,
        request: Request,
        wait: Annotated[bool, Query(description="Wait for the agent's reply.")] = False,
        timeout: Annotated[
            float | None,
            Query(gt=0, description="Seconds to wait for the reply; default: wait_timeout."),
        ] = None,
    ) -> Response:
        known(name)
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        try:
            if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
                raise _Refused(
                    400, f"{IDEMPOTENCY_KEY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
                )
            body = await read_json_body(request, max_body)
            try:
                message, created = await dispatcher.submit(name, body, idempotency_key=key)
            except QueueFull as exc:
                raise _Refused(
                    429,
                    f"{exc}; retry later",
                    headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
                ) from None
            except errors.StateError as exc:
                raise _Refused(503, str(exc)) from None
        except _Refused as exc:
            return _refusal(name, exc)
        location = {"Location": f"/api/agents/{name}/messages/{message.id}"}
        if wait:
            limit = timeout if timeout is not None else dispatcher.limits(name).wait_timeout
            final = await dispatcher.wait_final(name, message.id, limit)
            if final is None:
                current = await inbox.get(name, message.id) or message
                return JSONResponse(_accepted(current), status_code=202, headers=location)
            if final.status is not MessageStatus.DELIVERED:
                final = await inbox.get(name, message.id) or final  # with its stored error
            return JSONResponse(_final(final), headers=location)
        return JSONResponse(
            _accepted(message), status_code=202 if created else 200, headers=location
        )

    @router.get(
        "/api/agents/{name}/messages/{message_id}",
        summary="One message: status, attempts, reply and last error.",
    )
    async def get_message(name: str, message_id: str) -> dict[str, Any]:
        known(name)
        message = await inbox.get(name, message_id)
        if message is None:
            raise errors.NotFound(f"agent {name!r} has no message {message_id!r}")
        return message.to_json()

    @router.get(
        "/api/agents/{name}/messages",
        summary="The agent's newest messages (or a page after a seq), oldest first.",
    )
    async def list_messages(
        name: str,
        status: Annotated[
            MessageStatus | None, Query(description="Only messages in this status.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
        after: Annotated[
            int | None,
            Query(ge=0, description="Page: the first `limit` messages after this seq."),
        ] = None,
    ) -> dict[str, Any]:
        known(name)
        messages = await inbox.list_messages(name, status=status, limit=limit, after_seq=after)
        return {
            "agent": name,
            "pending": inbox.pending_count(name),
            "messages": [m.to_json() for m in messages],
        }

    return router
