"""One error shape for every HTTP answer Roost gives itself.

Role: render any :class:`roost.errors.RoostError` (a :class:`roost.errors.Refusal`
included) as ``{"error": "<message naming what is wrong>", ...}`` with the status
``roost.errors.http_status`` gives its class; ``ErrorBody`` is that shape for
OpenAPI. The edge (token, body limit, proxy) and the admin API's exception
handlers use the same ``render``.

Invariants:
- Errors about one agent carry ``agent``; start failures carry ``log_tail``.
- 5xx answers are logged (one line, no traceback for Roost's own errors).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from roost import errors

__all__ = [
    "ERROR_DESCRIPTIONS",
    "ERROR_SCHEMA_REF",
    "ErrorBody",
    "error_response",
    "error_responses",
    "install_error_handlers",
    "refuse",
    "render",
]

log = logging.getLogger("roost.api")

#: Retry-After of an answer that failed for Roost's own reasons (engine, disk).
RETRY_LATER_SECONDS = 5


class ErrorBody(BaseModel):
    """What every error answer looks like (more fields may follow ``error``: ``state``,
    ``log_tail``, ``valid_actions``, ...)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"error": "agent 'echo' is failed; reset it first", "agent": "echo"},
            ]
        },
    )

    error: str = Field(description="What is wrong, naming the thing at fault.")
    agent: str | None = Field(default=None, description="The agent concerned, if any.")


def render(
    exc: errors.RoostError, *, agent: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, JSON body) of the answer for ``exc``."""
    status = errors.http_status(exc)
    body: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
    headers: dict[str, str] = {}
    if agent is not None:
        body["agent"] = agent
    if isinstance(exc, errors.Refusal):
        body.update(exc.extra)
        headers.update(exc.headers)
    elif isinstance(exc, errors.ContainerError) and not isinstance(exc, errors.DockerUnavailable):
        body["log_tail"] = exc.log_tail
    if isinstance(exc, errors.StoreError | errors.DockerUnavailable):
        # Roost's bad day, not the request's: the same request will do later.
        headers.setdefault("Retry-After", str(RETRY_LATER_SECONDS))
    return status, headers, json.dumps(body).encode()


async def refuse(
    scope: MutableMapping[str, Any],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    refusal: errors.RoostError,
) -> None:
    """Answer with the refusal (an HTTP response, or a denied WebSocket handshake)."""
    status, extra_headers, body = render(refusal)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in extra_headers.items()),
    ]
    if scope["type"] == "websocket":
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008 if status in (401, 404) else 1011})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


#: What each error status means, as OpenAPI describes it.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: the message names the field or byte at fault.",
    401: "Missing or wrong API token (when server.token_file is set).",
    404: "No such agent, message, job or lease (the message names it).",
    405: "Method not allowed on this path (Allow lists the ones that are).",
    409: "The agent's state does not allow it, or the name is taken.",
    413: "Body larger than server.max_body_size.",
    422: "A parameter or body field is invalid (the message names it).",
    429: "The agent's queue is full; see Retry-After.",
    500: "Roost failed unexpectedly (the message names the request); see its log.",
    502: "The agent could not start, failed, or answered badly.",
    503: "Docker is unreachable, the state database is failing, the agent is still "
    "waking, or Roost is shutting down; see Retry-After when given.",
    504: "The agent did not become healthy in time.",
    507: "The disk holding the state database is full; nothing was stored.",
}
#: Where OpenAPI finds the one error shape.
ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    """The OpenAPI response object of an error answer (always JSON, whatever the
    route's own media type)."""
    return {
        "description": description or ERROR_DESCRIPTIONS.get(status, "Error."),
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}},
    }


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting ``statuses`` with the error shape."""
    return {status: error_response(status) for status in statuses}


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API documents for the request's path (Starlette's own
    ``Allow`` names only the first matching route's)."""
    allowed: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if _path_pattern(template).fullmatch(request.url.path):
            allowed.update(method.upper() for method in operations)
    return sorted(allowed)


@functools.lru_cache(maxsize=256)
def _path_pattern(template: str) -> re.Pattern[str]:
    """``/api/agents/{name}`` as a regular expression (a parameter is one segment)."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _response(exc: errors.RoostError, agent: str | None) -> Response:
    status, headers, body = render(exc, agent=agent)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def install_error_handlers(
    app: FastAPI,
    *,
    actions: tuple[str, ...],
    on_store_error: Callable[[errors.StoreError], object] | None = None,
) -> None:
    """Every error the admin API raises answers in the one shape.

    ``on_store_error`` hears of every state-database failure (Roost's health):
    its condition is announced and logged once, so such a refusal is logged at
    debug level only, not once per refused request."""

    async def on_roost_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.RoostError)
        response = _response(exc, request.path_params.get("name"))
        if isinstance(exc, errors.StoreError) and on_store_error is not None:
            on_store_error(exc)
            log.debug("%s %s: %s", request.method, request.url.path, exc)
        elif response.status_code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return response

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        method, path = request.method, request.url.path
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            parts = path.strip("/").split("/")
            if method == "POST" and len(parts) == 4 and parts[:2] == ["api", "agents"]:
                return _response(
                    errors.Refusal(
                        404,
                        f"unknown action {parts[3]!r}; valid actions: {', '.join(actions)}",
                        valid_actions=list(actions),
                    ),
                    parts[2],
                )
            message = f"no such route: {method} {path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"method {method} is not allowed on {path}; allowed: {', '.join(allowed)}"
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            message = f"the request body of {method} {path} is not valid JSON"
        else:
            message = str(exc.detail)
        return _response(errors.Refusal(exc.status_code, message, headers=headers), None)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = [
            f"{'.'.join(str(p) for p in problem.get('loc', ()))}: {problem.get('msg', 'invalid')}"
            for problem in exc.errors()
        ]
        return _response(
            errors.Refusal(422, "invalid request: " + "; ".join(problems)),
            request.path_params.get("name"),
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception and re-raises it after this answer is sent.
        return JSONResponse(
            {"error": f"internal error while serving {request.method} {request.url.path}"},
            status_code=500,
        )

    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(errors.RoostError, on_roost_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
