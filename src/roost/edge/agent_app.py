"""The agent listener's edge: what an agent container may call, and nothing else.

Role: the ASGI app behind the second listener (``server.agent_listen``, by
default on the gateway of the agents' network: the one Roost address a
container can reach; the admin API stays on loopback). Every request passes,
in order:

1. **token** — ``Authorization: Bearer <ROOST_AGENT_TOKEN>`` (or ``Roost-Token``):
   the agent container's own token, checked against the stored hashes
   (``roost.reactor.credentials``); 401 without a valid one;
2. **scope** — the token's agent may call only its own endpoints:
   ``POST /api/agents/<itself>/queue/next``, ``.../queue/{id}/heartbeat``,
   ``.../queue/{id}/complete``, ``GET /api/agents/<itself>/ws``, and
   ``POST /api/route/{event_type}`` when its ``may_route`` is true. Anything else
   — another agent's endpoints, the admin API, the proxy, the dashboard — is 403;
3. **body limit** — as on the admin listener (413);
4. the agent endpoints app (``roost.api.agent_endpoints.create_agent_api``).

Invariants:
- Refusals use the one error shape (``roost.api.errors``); the token is removed
  from the request before it goes further, and never logged.
- The request carries its agent's token hash to the endpoints
  (``AGENT_TOKEN_HASH``), so a WebSocket is bound to the container token it
  authenticated with (revoked with it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from roost import errors
from roost.api.agent_endpoints import AGENT_TOKEN_HASH, create_agent_api
from roost.api.errors import refuse
from roost.edge.app import limited
from roost.engine import Engine
from roost.reactor.credentials import digest

__all__ = ["AgentEdge", "create_agent_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: An agent endpoint: (agent, what) with ``what`` in queue/next,
#: queue/<id>/heartbeat, queue/<id>/complete, ws.
_AGENT_ENDPOINT = re.compile(
    r"^/api/agents/([^/]+)/(queue/next|queue/[^/]+/heartbeat|queue/[^/]+/complete|ws)$"
)
_ROUTE_PREFIX = "/api/route/"


class AgentEdge:
    """The ASGI app of the agent listener (see the module docstring)."""

    def __init__(self, app: FastAPI, engine: Engine, *, max_body: int) -> None:
        self.app = app
        self._engine = engine
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return  # no lifespan: the engine is started and stopped by serving
        try:
            scope = self._authorize(scope)
            if scope["type"] == "http":
                receive = limited(scope, receive, self._max_body)
        except errors.Refusal as refusal:
            await refuse(scope, send, refusal)
            return
        await self.app(scope, receive, send)

    def _authorize(self, scope: Scope) -> Scope:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        token = ""
        for key, value in headers:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = credentials.strip().decode("latin-1")
            elif key == b"roost-token" and not token:
                token = value.strip().decode("latin-1")
        agent = self._engine.credentials.verify(token)
        if agent is None:
            raise errors.Refusal(
                401,
                "missing or unknown agent token: send 'Authorization: Bearer "
                "$ROOST_AGENT_TOKEN' (the agent listener serves agent containers only)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        path: str = scope["path"]
        endpoint = _AGENT_ENDPOINT.match(path)
        if endpoint is not None:
            if endpoint.group(1) != agent:
                raise errors.Refusal(
                    403,
                    f"the token of agent {agent!r} is valid only for its own endpoints, "
                    f"not for agent {endpoint.group(1)!r}'s",
                    agent=agent,
                )
        elif path.startswith(_ROUTE_PREFIX):
            if not self._may_route(agent):
                raise errors.Refusal(
                    403,
                    f"agent {agent!r} may not route events: set may_route = true in its "
                    "configuration",
                    agent=agent,
                )
        else:
            raise errors.Refusal(
                403,
                f"the agent listener serves only agent endpoints ({path} is not one): "
                f"/api/agents/{agent}/queue/..., /api/agents/{agent}/ws and, with "
                "may_route, /api/route/{event_type}",
                agent=agent,
            )
        kept = [(k, v) for k, v in headers if k not in (b"authorization", b"roost-token")]
        return {**scope, "headers": kept, AGENT_TOKEN_HASH: digest(token)}

    def _may_route(self, agent: str) -> bool:
        try:
            return self._engine.agents.spec(agent).may_route
        except errors.NotFound:
            return False


def create_agent_app(engine: Engine) -> AgentEdge:
    """The agent listener's whole surface over ``engine`` (started by the caller)."""
    return AgentEdge(
        create_agent_api(engine), engine, max_body=engine.settings.server.max_body_size
    )
