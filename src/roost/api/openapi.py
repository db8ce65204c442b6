"""The OpenAPI document: what FastAPI generates, made to tell the truth about Roost.

Role: ``document(app)`` replaces the app's ``openapi()`` with one that takes
FastAPI's schema and adds what the edge and the proxy do outside FastAPI:

- the bearer security scheme on every route but the public ones (the edge checks
  the token when ``server.token_file`` is set), with its 401;
- the one error shape everywhere: ``ErrorBody`` (a component, with ``EventList``,
  which only a hand-written response names) for 422 (instead of FastAPI's
  ``HTTPValidationError``, which Roost never sends), 400 and 413 on routes that
  take a body (bad JSON; the edge's body limit), 500 on every route;
- the reverse proxy ``ANY /agents/{name}/{path}`` (served by the edge, not
  FastAPI), with its ``Roost-Cold-Start`` / ``Roost-Wake-Ms`` headers, its own
  refusals and the waiting page.

Invariants:
- Every error status a route can answer is documented with ``ErrorBody`` as
  ``application/json``, whatever the route's own media type.
- The document is built once per app and cached (FastAPI's ``openapi_schema``).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from roost.api.errors import ErrorBody, error_response
from roost.api.schemas import EventList

__all__ = ["PROXY_PATH", "TAGS", "document"]

#: The proxy's path as OpenAPI shows it.
PROXY_PATH = "/agents/{name}/{path}"
TAGS: list[dict[str, Any]] = [
    {"name": "health", "description": "Roost itself: liveness and Prometheus metrics."},
    {"name": "agents", "description": "Agents: list, inspect, logs, register, delete."},
    {"name": "actions", "description": "Lifecycle actions on one agent."},
    {"name": "messages", "description": "Durable messages to an agent, delivered in order."},
    {"name": "leases", "description": "Leases that keep an agent awake during long work."},
    {"name": "jobs", "description": "One-shot job containers with hard timeouts."},
    {"name": "events", "description": "What happens in Roost, as server-sent events."},
    {
        "name": "proxy",
        "description": "HTTP and WebSocket traffic to an agent, waking it first "
        "(served by the edge in front of the admin API).",
    },
]
_BODY_METHODS = ("post", "put", "patch")
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def document(app: FastAPI, *, public_paths: Collection[str]) -> None:
    """Make ``app.openapi()`` return the truthful document (see the module docstring)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=TAGS,
            )
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            _, extra = models_json_schema(
                [(model, "serialization") for model in (ErrorBody, EventList)],
                ref_template="#/components/schemas/{model}",
            )
            for name, model_schema in extra.get("$defs", {}).items():
                schemas.setdefault(name, model_schema)
            for name in _FASTAPI_VALIDATION:
                schemas.pop(name, None)
            schema["paths"][PROXY_PATH] = _proxy_path()
            components["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token from server.token_file (required when it is "
                    "set): `Authorization: Bearer <token>`, or `Roost-Token: <token>`.",
                }
            }
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    _complete(operation, method, secured=path not in public_paths)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(operation: dict[str, Any], method: str, *, secured: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    validation = responses.get("422")
    if validation is not None and "HTTPValidationError" in str(validation):
        responses["422"] = error_response(422)
    if method in _BODY_METHODS:
        responses.setdefault("400", error_response(400))
        responses.setdefault("413", error_response(413))
    responses.setdefault("500", error_response(500))
    if secured:
        operation["security"] = [{"bearer": []}]
        responses.setdefault("401", error_response(401))


def _proxy_path() -> dict[str, Any]:
    """``ANY /agents/{name}/{path}``, by hand (the edge serves it, not FastAPI)."""
    wake_headers = {
        "Roost-Cold-Start": {
            "description": "The state the agent was woken from for this request "
            "(`paused`, `stopped`, `created`, `crashed`, ...); `none` when it was already "
            "running.",
            "schema": {"type": "string", "examples": ["none", "paused", "stopped"]},
        },
        "Roost-Wake-Ms": {
            "description": "Milliseconds the request was held while the agent woke (0 "
            "when it was running).",
            "schema": {"type": "integer", "minimum": 0, "examples": [0, 240]},
        },
    }
    parameters = [
        {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "The agent.",
            "schema": {"type": "string"},
            "example": "echo",
        },
        {
            "name": "path",
            "in": "path",
            "required": True,
            "description": "The rest of the path, sent to the agent as is (it may hold "
            "`/`, and the query string follows it).",
            "schema": {"type": "string"},
            "example": "health",
        },
    ]
    waiting = dict(error_response(503))
    waiting["content"] = {
        **waiting["content"],
        "text/html": {
            "schema": {"type": "string"},
            "example": "<!doctype html>... echo is waking up ...",
        },
    }
    waiting["description"] = (
        "Still waking after hold_timeout, or Roost is shutting down (JSON, with "
        "Retry-After); or, for a browser asking an agent with waiting_page = true, the "
        "self-refreshing waiting page (text/html) that shows the agent's state until it "
        "is ready."
    )
    waiting["headers"] = {
        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
    }
    responses = {
        "default": {
            "description": "The agent's own answer, streamed as it comes (any status, "
            "headers and body; hop-by-hop headers dropped). A WebSocket upgrade is relayed "
            "both ways (101).",
            "headers": wake_headers,
            "content": {"*/*": {"schema": {}}},
        },
        "404": error_response(404, "No agent of that name."),
        "413": error_response(413),
        "502": error_response(
            502,
            "The agent is failed, could not start, or did not answer (the body names it "
            "and its state).",
        ),
        "503": waiting,
    }
    operation = {
        "tags": ["proxy"],
        "summary": "Forward to the agent, waking it and holding the request until it is healthy.",
        "description": "Wakes a sleeping agent and holds the request until it answers its "
        "health check, for at most its hold_timeout; then forwards method, path, query, "
        "headers (X-Forwarded-* set; Roost's own token removed) and body, and streams the "
        "answer back. Open requests and WebSockets count as activity, so idling never "
        "pauses an agent mid-stream.",
        "parameters": parameters,
        "responses": responses,
    }
    methods = ("get", "put", "post", "delete", "options", "head", "patch")
    item: dict[str, Any] = {}
    for method in methods:
        one = {**copy.deepcopy(operation), "operationId": f"proxy_{method}"}
        if method in _BODY_METHODS:
            one["requestBody"] = {
                "required": False,
                "description": "Sent to the agent as it arrives (up to server.max_body_size).",
                "content": {"*/*": {"schema": {}}},
            }
        item[method] = one
    return item
