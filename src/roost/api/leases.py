"""Lease routes: ``/api/agents/{name}/leases`` over :class:`roost.reactor.leasing.Leases`.

Role: HTTP front end only; ``Leases`` decides. ``POST`` takes a lease (waking the
agent, answering once it runs), ``GET`` lists the held ones, ``PUT .../{id}``
renews one with a new TTL, ``DELETE .../{id}`` releases one.

Invariants:
- Bodies are pydantic request models: a bad or unknown field answers 422 naming
  it (``body.ttl: ...``); nothing is taken then.
- Unknown agents and leases answer 404; wake failures map like the admin API's
  actions (Roost errors raised here reach the app's handlers unchanged).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from roost.api import schemas
from roost.api.errors import error_responses
from roost.reactor.leasing import MAX_TTL, Leases

__all__ = ["MAX_HOLDER_LENGTH", "LeaseRenewal", "LeaseRequest", "lease_router"]

MAX_HOLDER_LENGTH = 200


class LeaseRenewal(BaseModel):
    """The body of ``PUT .../leases/{id}``."""

    model_config = ConfigDict(extra="forbid")

    ttl: float = Field(
        gt=0,
        le=MAX_TTL,
        strict=True,
        allow_inf_nan=False,
        description="Seconds the lease lasts from now.",
    )


class LeaseRequest(LeaseRenewal):
    """The body of ``POST .../leases``."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"ttl": 600, "holder": "nightly-report"}]}
    )

    holder: str = Field(
        default="",
        max_length=MAX_HOLDER_LENGTH,
        strict=True,
        description="Who holds it (free text).",
    )


def lease_router(leases: Leases) -> APIRouter:
    """The lease routes."""
    router = APIRouter(tags=["leases"])

    @router.post(
        "/api/agents/{name}/leases",
        status_code=201,
        summary="Take a lease: wake the agent and keep it awake for ttl seconds.",
        response_model=schemas.Lease,
        responses=error_responses(404, 409, 422, 502, 503, 504),
    )
    async def take_lease(name: schemas.AgentName, body: LeaseRequest) -> Response:
        lease = await leases.grant(name, body.ttl, holder=body.holder)
        return JSONResponse(lease.to_json(), status_code=201)

    @router.get(
        "/api/agents/{name}/leases",
        summary="Leases held on the agent.",
        response_model=schemas.LeaseList,
        responses=error_responses(404, 422),
    )
    async def list_leases(name: schemas.AgentName) -> dict[str, Any]:
        return {"leases": [lease.to_json() for lease in leases.list(name)]}

    @router.put(
        "/api/agents/{name}/leases/{lease_id}",
        summary="Renew a lease: it now ends ttl seconds from now.",
        response_model=schemas.Lease,
        responses=error_responses(404, 422),
    )
    async def renew_lease(name: schemas.AgentName, lease_id: str, body: LeaseRenewal) -> Response:
        lease = await leases.renew(name, lease_id, body.ttl)
        return JSONResponse(lease.to_json())

    @router.delete(
        "/api/agents/{name}/leases/{lease_id}",
        status_code=204,
        summary="Release a lease now.",
        responses=error_responses(404, 422),
    )
    async def release_lease(name: schemas.AgentName, lease_id: str) -> Response:
        await leases.release(name, lease_id)
        return Response(status_code=204)

    return router
