"""Registering agents at run time: ``POST /api/agents`` and ``DELETE /api/agents/{name}``.

Role: the HTTP face of spawning agents at run time. A registered agent is a
``config.SpawnedAgent`` built by ``reactor.spawning`` from ``[defaults]``,
``[swarm]`` and the request; ``Agents.register`` persists it, so it
behaves like a configured agent (idles, wakes, restarts, survives a Roost
restart) until ``DELETE`` stops and removes its container and forgets it.

Invariants:
- Registration answers 201 with the agent as JSON (``Agents.describe``, with
  ``agent_id``, ``capabilities`` and ``image``); a taken name is 409; a bad field
  is 400 (``ConfigError``, message starting with the field's name) or 422 (wrong
  JSON type, message ``body.<field>: ...``). With ``?start=true`` the agent is
  also started and the answer waits until it is healthy; if it cannot start,
  the start error is the answer (502/504) and the agent stays registered.
- Only agents registered at run time can be deleted: a configured one would come
  back from ``roost.toml`` on the next start, so deleting it is 409.
- Both go through the facade (``Agents.register`` / ``Agents.delete``), which
  keeps the route-only rules: a configured agent cannot be deleted, and
  ``agent.registered`` / ``agent.deleted`` are published.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from roost.api import schemas
from roost.api.errors import error_responses
from roost.engine import Engine
from roost.reactor import spawning

__all__ = ["AgentRegistration", "registry_router"]


class AgentRegistration(BaseModel):
    """The body of ``POST /api/agents``."""

    # strict: a number sent as a string is refused, as the schema says.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"name": "worker-1", "capabilities": ["search", "summarise"]}]
        },
    )

    # The rules are checked by the agent spec (400 with a message naming the field);
    # the schema states them too, so the documented request is the accepted one.
    name: str = Field(
        description="The agent's name: a DNS label, unique in this Roost.",
        examples=["worker-1"],
        json_schema_extra={"pattern": r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"},
    )
    agent_id: str | None = Field(
        default=None, description="The agent's id in its coordinator (AGENT_ID); default: name."
    )
    capabilities: str | list[str] = Field(
        default="", description="What it can do: 'a,b' or ['a', 'b'] (AGENT_CAPABILITIES)."
    )
    image: str | None = Field(default=None, description="Image; default: [swarm] image.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    port: int | None = Field(
        default=None,
        description="Port it listens on; default 8000.",
        json_schema_extra={"minimum": 1, "maximum": 65535},
    )


def registry_router(engine: Engine) -> APIRouter:
    """``POST /api/agents`` and ``DELETE /api/agents/{name}`` over ``engine``."""
    router = APIRouter(tags=["agents"])
    agents = engine.agents

    @router.post(
        "/api/agents",
        status_code=201,
        summary="Register (spawn) an agent at run time; it persists until deleted.",
        response_model=schemas.Agent,
        response_model_exclude_unset=True,
        responses=error_responses(400, 409, 422, 502, 503, 504),
    )
    async def register_agent(
        registration: AgentRegistration,
        start: Annotated[
            bool, Query(description="true: also start it and wait until it is healthy.")
        ] = False,
    ) -> dict[str, Any]:
        spec = spawning.spawned_agent_spec(
            engine.settings,
            name=registration.name,
            agent_id=registration.agent_id,
            capabilities=registration.capabilities,
            image=registration.image,
            env=registration.env,
            port=registration.port,
        )
        await agents.register(spec)
        if start:
            await agents.wake(
                spec.name, reason="start requested at registration", timeout=spec.startup_timeout
            )
        return schemas.agent_body(agents, engine.inbox, spec.name)

    @router.delete(
        "/api/agents/{name}",
        status_code=204,
        summary="Stop and remove the agent's container and forget the agent.",
        responses=error_responses(404, 409, 422, 502, 503),
    )
    async def delete_agent(name: schemas.AgentName) -> Response:
        await agents.delete(name)
        return Response(status_code=204)

    return router
