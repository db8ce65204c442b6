"""The agent endpoints: what an agent container calls back on (pull queue, WebSocket).

Role: HTTP front end of :mod:`roost.reactor.pulling` and
:mod:`roost.reactor.channels`, served on two listeners: the admin API (with the
admin token, for tools and tests) and the agent listener
(:mod:`roost.edge.agent_app`, with the agent's own ``ROOST_AGENT_TOKEN``, which
that edge has already checked is this agent's):

- ``POST /api/agents/{name}/queue/next?wait=S`` — 200 ``{"id", "body",
  "event_type", "attempt", "lease_expires_at"}``, or 204 when ``wait`` seconds
  pass with nothing to give (long poll);
- ``POST /api/agents/{name}/queue/{id}/heartbeat`` — 200 ``{"id",
  "lease_expires_at"}``; 409 when the lease was lost;
- ``POST /api/agents/{name}/queue/{id}/complete`` — body ``{"reply": ...}`` or
  ``{"error": "..."}``; 200 with the stored message once it is durable;
- ``GET /api/agents/{name}/ws`` — the agent's WebSocket (frames: see
  :mod:`roost.reactor.channels`).

Invariants:
- Queue endpoints answer 409 for an agent whose ``delivery`` is not ``pull``;
  the WebSocket is refused (close 1008) unless it is ``websocket``. Unknown agents
  are 404 (close 1008).
- A poll is activity for its whole wait, a heartbeat or a frame is a sign of
  life (``Agents.busy`` / ``Agents.touch``): a pull agent that polls stays awake.
- ``lease_expires_at`` is wall-clock seconds since the epoch.
- A message's body goes out as stored, spliced into the answer or frame unparsed;
  a ``complete``'s reply is checked like a message body (``parse_json_body``) and
  kept as its JSON text. A WebSocket frame with NaN or Infinity is not JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from roost import errors
from roost.api import routing
from roost.api.errors import error_responses, install_error_handlers
from roost.api.messages import check_depth, parse_json_body
from roost.engine import Engine
from roost.ports.inbox import spliced_json
from roost.reactor.agents import ACTIONS
from roost.reactor.attempts import Outcome

__all__ = ["AGENT_TOKEN_HASH", "MAX_POLL_WAIT", "agent_router", "create_agent_api"]

log = logging.getLogger("roost.api.agent_endpoints")

#: Longest ``queue/next`` long-polls (seconds).
MAX_POLL_WAIT = 300.0
#: Scope key the agent listener sets: the hash of the token the request came with
#: (absent on the admin listener).
AGENT_TOKEN_HASH = "roost.agent_token_hash"
#: WebSocket close code for a frame that breaks the protocol, or a refused agent.
CLOSE_POLICY = 1008
CLOSE_BAD_DATA = 1007


class _StarletteLink:
    """A Starlette WebSocket as a ``roost.reactor.channels.Link`` (sends serialised:
    the lanes of one agent may send concurrently)."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._lock = asyncio.Lock()

    async def send_text(self, frame: str) -> None:
        async with self._lock:
            await self._websocket.send_text(frame)

    async def close(self, code: int, reason: str) -> None:
        async with self._lock:
            await self._websocket.close(code=code, reason=reason)


def _mode_conflict(name: str, delivery: str, wanted: str) -> errors.Refusal:
    return errors.Refusal(
        409,
        f"agent {name!r} has delivery = {delivery!r}; this endpoint is for "
        f"delivery = {wanted!r} agents",
        agent=name,
    )


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _outcome(raw: bytes) -> Outcome:
    body = parse_json_body(raw)
    check_depth(body)
    if not isinstance(body, dict) or len(body) != 1 or not {"reply", "error"} >= set(body):
        raise errors.Refusal(
            400, 'complete takes {"reply": <any JSON>} or {"error": "<what went wrong>"}'
        )
    if "reply" in body:
        return Outcome.reply(json.dumps(body["reply"]).encode())
    if not isinstance(body["error"], str) or not body["error"]:
        raise errors.Refusal(400, "'error' must be a non-empty string")
    return Outcome.error(body["error"])


def agent_router(engine: Engine) -> APIRouter:
    """The agent endpoints over ``engine``."""
    router = APIRouter(tags=["agent endpoints"])
    agents = engine.agents
    pulls = engine.dispatcher.pulls
    channels = engine.dispatcher.channels

    def pull_agent(name: str) -> None:
        spec = agents.spec(name)  # NotFound → 404
        if spec.delivery != "pull":
            raise _mode_conflict(name, spec.delivery, "pull")

    @router.post(
        "/api/agents/{name}/queue/next",
        summary="Pull mode: take the oldest waiting message (leased), long-polling.",
        responses={
            200: {"description": "A leased message."},
            204: {"description": "Nothing came within `wait` seconds."},
            **error_responses(404, 409),
        },
    )
    async def queue_next(
        name: str,
        wait: Annotated[
            float,
            Query(ge=0, le=MAX_POLL_WAIT, description="Seconds to wait for a message."),
        ] = 0.0,
    ) -> Response:
        pull_agent(name)
        async with agents.busy(name):  # a pull agent that polls is in use
            lease = await pulls.next(name, wait=wait)
        if lease is None:
            return Response(status_code=204)
        message = lease.message
        fields = {
            "id": message.id,
            "event_type": message.event_type,
            "attempt": lease.attempt,
            "lease_expires_at": lease.expires_at,
        }
        return Response(spliced_json(fields, {"body": message.body}), media_type="application/json")

    @router.post(
        "/api/agents/{name}/queue/{message_id}/heartbeat",
        summary="Pull mode: renew the lease on a message; 409 when it was lost.",
        responses=error_responses(404, 409),
    )
    async def queue_heartbeat(name: str, message_id: str) -> dict[str, Any]:
        pull_agent(name)
        agents.touch(name)
        expires_at = pulls.heartbeat(name, message_id)
        return {"id": message_id, "lease_expires_at": expires_at}

    @router.post(
        "/api/agents/{name}/queue/{message_id}/complete",
        summary='Pull mode: answer a message with {"reply": ...} or {"error": "..."}.',
        responses=error_responses(400, 404, 409),
    )
    async def queue_complete(name: str, message_id: str, request: Request) -> dict[str, Any]:
        pull_agent(name)
        outcome = _outcome(await request.body())
        agents.touch(name)
        stored = await pulls.complete(name, message_id, outcome)
        return {
            "id": stored.id,
            "agent": stored.agent,
            "status": stored.status.value,
            "attempts": stored.attempts,
        }

    @router.websocket("/api/agents/{name}/ws")
    async def agent_socket(websocket: WebSocket, name: str) -> None:
        try:
            spec = agents.spec(name)
        except errors.NotFound as exc:
            await websocket.close(code=CLOSE_POLICY, reason=str(exc))
            return
        if spec.delivery != "websocket":
            refusal = _mode_conflict(name, spec.delivery, "websocket")
            await websocket.close(code=CLOSE_POLICY, reason=str(refusal)[:120])
            return
        await websocket.accept()
        channel = channels.attach(
            name, _StarletteLink(websocket), token_hash=websocket.scope.get(AGENT_TOKEN_HASH)
        )
        reason = "closed by the agent"
        try:
            while not channel.closed:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    reason = f"closed by the agent (code {message.get('code')})"
                    break
                raw = message.get("text")
                if raw is None:
                    raw = (message.get("bytes") or b"").decode("utf-8", "replace")
                try:
                    frame = json.loads(raw, parse_constant=_not_json)
                except (ValueError, RecursionError):
                    reason = "a frame that is not JSON"
                    await websocket.close(code=CLOSE_BAD_DATA, reason=reason)
                    break
                agents.touch(name)
                problem = channels.received(channel, frame)
                if problem is not None:
                    reason = problem
                    await websocket.close(code=CLOSE_POLICY, reason=problem[:120])
                    break
        except WebSocketDisconnect as exc:
            reason = f"disconnected (code {exc.code})"
        except errors.NotFound:
            reason = "the agent was deleted"
        finally:
            channels.detach(channel, reason)

    return router


def create_agent_api(engine: Engine) -> FastAPI:
    """The app behind the agent listener: the agent endpoints and routing, nothing
    else (no docs, no admin routes)."""
    app = FastAPI(
        title="Roost agent endpoints",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app, actions=ACTIONS)
    app.include_router(agent_router(engine))
    app.include_router(routing.route_router(engine))
    return app
