"""Message routes: ``/api/agents/{name}/messages`` over :class:`roost.reactor.delivering.Dispatcher`.

Role: HTTP front end of the durable inbox. ``POST`` stores a JSON text for an
agent and answers once it is committed (202 ``{"id", "agent", "status"}``), or
with ``?wait=true`` once the agent replied (200 with the reply; 202 with the id
when ``wait_timeout`` or ``?timeout=`` passes first). ``GET .../{id}`` shows one
message, ``GET`` without an id lists them.

Invariants:
- Nothing is stored unless the answer is 200/202: an unknown agent is 404, a
  body over ``server.max_body_size`` 413 (the edge enforces it), malformed JSON
  400 naming line and column, JSON nested deeper than ``MAX_JSON_DEPTH`` 400, a
  full queue (``queue_limit`` undelivered messages)
  429 with ``Retry-After``.
- The body is checked here once (``json_body``: UTF-8, JSON without NaN or
  Infinity, nested at most ``MAX_JSON_DEPTH`` deep) and from then on is bytes: the
  inbox stores exactly what the client sent and the agent receives exactly that.
- ``Idempotency-Key``: the same key for the same agent names one message; a
  repeated POST answers 200 with the stored message's id and status.
- Error bodies follow the API's one shape (``roost.api.errors``).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from roost import errors
from roost.api import schemas
from roost.api.errors import error_response, error_responses, render
from roost.engine import Engine
from roost.ports.inbox import Message, MessageStatus, QueueFull, json_value

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "MAX_IDEMPOTENCY_KEY",
    "QUEUE_FULL_RETRY_AFTER",
    "MessageDoor",
    "check_depth",
    "json_body",
    "messages_router",
    "parse_json_body",
]

log = logging.getLogger("roost.api")

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255
#: Seconds a refused sender is told to wait (``Retry-After``) when the queue is full.
QUEUE_FULL_RETRY_AFTER = 1
MAX_LIST = 1000
#: Deepest nesting of arrays and objects a message may have (deeper: 400).
MAX_JSON_DEPTH = 128
_LOCATION = {"description": "The message's URL.", "schema": {"type": "string"}}
_RETRY_AFTER = {"description": "Seconds to wait.", "schema": {"type": "integer"}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> Any:
    """The body as a JSON value; ``Refusal`` 400 naming the byte, line and column."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.Refusal(
            400, f"message body is not UTF-8: byte {exc.start} is invalid"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise errors.Refusal(
            400,
            f"message body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except ValueError as exc:
        raise errors.Refusal(400, f"message body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None


def _too_deep() -> errors.Refusal:
    return errors.Refusal(
        400, f"message body is nested more than {MAX_JSON_DEPTH} levels deep; refused"
    )


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refusal 400 when arrays/objects nest deeper than ``limit`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise _too_deep()
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def json_body(raw: bytes) -> bytes:
    """``raw`` itself, once it is known to be a JSON text Roost stores: UTF-8, valid
    JSON without NaN or Infinity, nested at most ``MAX_JSON_DEPTH`` deep. Refusal 400
    naming what is wrong otherwise. The parsed value only proves it and is dropped."""
    value = parse_json_body(raw)
    # Each level of nesting opens a bracket: with no more brackets than the limit
    # (counted in C, strings' own brackets too) it cannot nest deeper.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        check_depth(value)
    return raw


def _accepted(message: Message) -> dict[str, Any]:
    return {"id": message.id, "agent": message.agent, "status": message.status.value}


def _final(message: Message) -> dict[str, Any]:
    body = _accepted(message)
    body["attempts"] = message.attempts
    if message.status is MessageStatus.DELIVERED:
        body["reply"] = json_value(message.reply)
    else:
        body["error"] = message.error or None
    return body


async def accept(
    engine: Engine,
    name: str,
    key: str | None,
    read_body: Callable[[], Awaitable[bytes]],
    *,
    wait: bool,
    timeout: float | None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``POST /api/agents/{name}/messages``, whichever door it came in by: the
    answer's status, JSON body and headers. Refusals are raised (the one error
    shape renders them)."""
    agents, dispatcher, inbox = engine.agents, engine.dispatcher, engine.inbox
    agents.get(name)  # NotFound → 404 before anything is read or stored
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise errors.Refusal(
            400, f"{IDEMPOTENCY_KEY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )
    body = json_body(await read_body())
    try:
        # A StoreError (507 or 503) reaches Roost's health in the error handler.
        message, created = await dispatcher.submit(name, body, idempotency_key=key)
    except QueueFull as exc:
        raise errors.Refusal(
            429, f"{exc}; retry later", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)}
        ) from None
    except errors.StateError as exc:
        raise errors.Refusal(503, str(exc)) from None
    engine.health.clear("store")
    location = {"Location": f"/api/agents/{name}/messages/{message.id}"}
    if wait:
        limit = timeout if timeout is not None else agents.spec(name).wait_timeout
        # A new message cannot have been delivered yet: nothing awaited since.
        final = await dispatcher.wait_final(
            name, message.id, limit, current=message if created else None
        )
        if final is None:
            current = await inbox.get(name, message.id) or message
            return 202, _accepted(current), location
        if final.status is not MessageStatus.DELIVERED:
            final = await inbox.get(name, message.id) or final  # with its stored error
        return 200, _final(final), location
    return (202 if created else 200), _accepted(message), location


_Scope = MutableMapping[str, Any]
_ASGI = Callable[
    [_Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]
_POST_PATH = re.compile(r"/api/agents/([^/]+)/messages")
_KEY_HEADER = IDEMPOTENCY_KEY_HEADER.lower().encode()
#: Values the door takes as they are; any other goes to FastAPI, which validates it.
_WAIT = {"true": True, "false": False}
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


class MessageDoor:
    """``POST /api/agents/{name}/messages`` straight to :func:`accept`, in front of the
    admin API (``api``): the busiest route, without FastAPI's per-request machinery
    (middleware stack, routing, dependency injection), which costs a message about
    as much CPU as storing and delivering it. Every other request, and every message
    POST that is not the plain case (a query parameter other than ``wait=true|false``
    and ``timeout=<seconds>``, or one given twice), goes to ``api``, whose route
    (the same ``accept``) documents and validates it; so the answers are the same.
    Errors answer in the one shape, as the API's handlers render them."""

    def __init__(
        self, engine: Engine, api: _ASGI, *, on_store_error: Callable[[errors.StoreError], object]
    ) -> None:
        self._engine = engine
        self._api = api
        self._on_store_error = on_store_error

    async def __call__(
        self,
        scope: _Scope,
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        match = _POST_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        params = _plain(scope["query_string"]) if match and scope["method"] == "POST" else None
        if match is None or params is None:
            await self._api(scope, receive, send)
            return
        name = match.group(1)
        key = next((v.decode("latin-1") for k, v in scope["headers"] if k == _KEY_HEADER), None)

        async def read_body() -> bytes:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise errors.Refusal(400, "the client went away before its body arrived")
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            status, body, headers = await accept(
                self._engine, name, key, read_body, wait=params[0], timeout=params[1]
            )
            response: Response = JSONResponse(body, status_code=status, headers=headers)
        except errors.RoostError as exc:
            status, headers, rendered = render(exc, agent=name)
            if isinstance(exc, errors.StoreError):
                self._on_store_error(exc)
                log.debug("POST %s: %s", scope["path"], exc)
            elif status >= 500:
                log.warning("POST %s: %s", scope["path"], exc)
            response = Response(
                rendered, status_code=status, headers=headers, media_type="application/json"
            )
        except Exception:
            # As FastAPI's last-resort handler answers (and the server logs it).
            failed = JSONResponse(
                {"error": f"internal error while serving POST {scope['path']}"}, status_code=500
            )
            await failed(scope, receive, send)
            raise
        await response(scope, receive, send)


def _plain(query_string: bytes) -> tuple[bool, float | None] | None:
    """``(wait, timeout)`` of a plain query string; None for anything else."""
    wait, timeout = False, None
    seen: set[str] = set()
    for field, value in urllib.parse.parse_qsl(query_string.decode("latin-1")):
        if field in seen:
            return None
        seen.add(field)
        if field == "wait" and value in _WAIT:
            wait = _WAIT[value]
        elif field == "timeout" and _SECONDS.fullmatch(value) and float(value) > 0:
            timeout = float(value)
        else:
            return None
    return wait, timeout


def messages_router(engine: Engine) -> APIRouter:
    """The message routes."""
    router = APIRouter(tags=["messages"])
    inbox = engine.inbox
    agents = engine.agents

    def known(name: str) -> None:
        agents.get(name)  # NotFound → 404 before anything is read or stored

    @router.post(
        "/api/agents/{name}/messages",
        status_code=202,
        summary="Store a JSON message for the agent (durable); wake it and deliver in order.",
        response_model=schemas.MessageAccepted,
        responses={
            200: {
                "model": schemas.MessageOutcome,
                "description": "Replied or failed (?wait=true), or an Idempotency-Key repeat.",
            },
            202: {
                "description": "Stored (or, with ?wait=true, still pending at the timeout).",
                "headers": {"Location": _LOCATION},
            },
            **error_responses(400, 404, 413, 422),
            429: {**error_response(429), "headers": {"Retry-After": _RETRY_AFTER}},
            503: error_response(503, "Roost is shutting down; nothing was stored."),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "Any JSON value: what the agent receives.",
                "content": {"application/json": {"schema": {}, "example": {"hi": 1}}},
            },
            "parameters": [
                {
                    "name": IDEMPOTENCY_KEY_HEADER,
                    "in": "header",
                    "required": False,
                    "description": "The same key for the same agent names one message.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            ],
        },
    )
    async def post_message(
        name: schemas.AgentName,
        request: Request,
        wait: Annotated[bool, Query(description="Wait for the agent's reply.")] = False,
        timeout: Annotated[
            float | None,
            Query(gt=0, description="Seconds to wait for the reply; default: wait_timeout."),
        ] = None,
    ) -> Response:
        status, body, headers = await accept(
            engine,
            name,
            request.headers.get(IDEMPOTENCY_KEY_HEADER),
            request.body,
            wait=wait,
            timeout=timeout,
        )
        return JSONResponse(body, status_code=status, headers=headers)

    @router.get(
        "/api/agents/{name}/messages/{message_id}",
        summary="One message: status, attempts, reply and last error.",
        response_model=schemas.Message,
        responses=error_responses(404, 422),
    )
    async def get_message(name: schemas.AgentName, message_id: str) -> dict[str, Any]:
        known(name)
        message = await inbox.get(name, message_id)
        if message is None:
            raise errors.NotFound(f"agent {name!r} has no message {message_id!r}")
        return message.to_json()

    @router.get(
        "/api/agents/{name}/messages",
        summary="The agent's newest messages (or a page after a seq), oldest first.",
        response_model=schemas.MessageList,
        responses=error_responses(404, 422),
    )
    async def list_messages(
        name: schemas.AgentName,
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
