"""Registering agents at run time: ``POST /api/agents`` and ``DELETE /api/agents/{name}``.

Role: the HTTP face of swarm spawning. A registered agent is a
``config.SpawnedAgent`` built by ``reactor.swarming`` from ``[defaults]``,
``[swarm]`` and the request; ``Engine.register_agent`` persists it, so it
behaves like a configured agent (idles, wakes, restarts, survives a Roost
restart) until ``DELETE`` stops and removes its container and forgets it.

Invariants:
- Registration answers 201 with the agent as JSON (``describe`` plus
  ``agent_id``, ``capabilities`` and ``image``); a taken name is 409; a bad field
  is 400 (``ConfigError``, message starting with the field's name) or 422 (wrong
  JSON type, message ``body.<field>: ...``). With ``?start=true`` the agent is
  also started and the answer waits until it is healthy; if it cannot start,
  the start error is the answer (502/504) and the agent stays registered.
- Only agents registered at run time can be deleted: a configured one would come
  back from ``roost.toml`` on the next start, so deleting it is 409.
- Routes are built by :func:`registry_router`; ``create_app`` mounts them behind
  the same token guard as every other admin route.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from roost import errors
from roost.config import SpawnedAgent
from roost.core.records import AgentRecord
from roost.engine import Engine
from roost.reactor import swarming
from roost.reactor.supervising import describe

__all__ = ["AgentRegistration", "describe_spawned", "registry_router"]


class AgentRegistration(BaseModel):
    """The body of ``POST /api/agents``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The agent's name: a DNS label, unique in this Roost.")
    agent_id: str | None = Field(
        default=None, description="The agent's id in its coordinator (AGENT_ID); default: name."
    )
    capabilities: str | list[str] = Field(
        default="", description="What it can do: 'a,b' or ['a', 'b'] (AGENT_CAPABILITIES)."
    )
    image: str | None = Field(default=None, description="Image; default: [swarm] image.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    port: int | None = Field(default=None, description="Port it listens on; default 8000.")


def describe_spawned(record: AgentRecord, spec: object) -> dict[str, Any]:
    """An agent as JSON, with its swarm identity when it was spawned."""
    body = describe(record)
    if isinstance(spec, SpawnedAgent):
        body["agent_id"] = spec.agent_id
        body["capabilities"] = list(spec.capabilities)
        body["image"] = spec.image
    return body


def registry_router(engine: Engine) -> APIRouter:
    """``POST /api/agents`` and ``DELETE /api/agents/{name}`` over ``engine``."""
    router = APIRouter(tags=["agents"])

    @router.post(
        "/api/agents",
        status_code=201,
        summary="Register (spawn) an agent at run time; it persists until deleted.",
    )
    async def register_agent(
        registration: AgentRegistration,
        start: Annotated[
            bool, Query(description="true: also start it and wait until it is healthy.")
        ] = False,
    ) -> JSONResponse:
        spec = swarming.spawned_agent_spec(
            engine.settings,
            name=registration.name,
            agent_id=registration.agent_id,
            capabilities=registration.capabilities,
            image=registration.image,
            env=registration.env,
            port=registration.port,
        )
        record = await engine.register_agent(spec)
        await engine.announce(
            "agent.registered",
            {
                "agent": spec.name,
                "agent_id": spec.agent_id,
                "capabilities": list(spec.capabilities),
            },
            webhook=False,
        )
        if start:
            record = await engine.supervisor.ensure_running(
                spec.name, timeout=spec.startup_timeout, reason="start requested at registration"
            )
        return JSONResponse(describe_spawned(record, spec), status_code=201)

    @router.delete(
        "/api/agents/{name}",
        status_code=204,
        summary="Stop and remove the agent's container and forget the agent.",
    )
    async def delete_agent(name: str) -> Response:
        engine.supervisor.actor(name)  # NotFound → 404 before anything changes
        stored = await engine.store.get_agent(name)
        if stored is not None and stored.source == "config":
            raise errors.Conflict(
                f"agent {name!r} is configured in the config file; remove it there instead"
            )
        await engine.delete_agent(name)
        await engine.announce("agent.deleted", {"agent": name}, webhook=False)
        return Response(status_code=204)

    return router
