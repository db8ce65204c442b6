"""Lease routes: ``/api/agents/{name}/leases`` over :class:`roost.gateway.leasing.Leases`.

Role: HTTP front end only; ``Leases`` decides. ``POST`` takes a lease (waking the
agent, answering once it runs), ``GET`` lists the held ones, ``PUT .../{id}``
renews one with a new TTL, ``DELETE .../{id}`` releases one.

Invariants:
- A bad body answers 400 ``{"error": ..., "agent": ...}`` naming the field
  (``ttl``, ``holder``) or saying the JSON is malformed; nothing is taken then.
- Unknown agents and leases answer 404; wake failures map like the admin API's
  actions (Roost errors raised here reach the app's handlers unchanged).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response

from roost.gateway.leasing import MAX_TTL, Leases, validate_ttl

__all__ = ["MAX_HOLDER_LENGTH", "lease_router"]

MAX_HOLDER_LENGTH = 200
#: A lease request is a few fields; anything bigger is refused unread (413).
MAX_LEASE_BODY = 4096


class _BadBody(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _bad_request(name: str, exc: _BadBody) -> JSONResponse:
    return JSONResponse({"error": str(exc), "agent": name}, status_code=exc.status)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_LEASE_BODY:
            raise _BadBody(f"lease request body exceeds {MAX_LEASE_BODY} bytes", status=413)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise _BadBody(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadBody('request body must be a JSON object like {"ttl": 60}')
    return body


def _ttl_of(body: dict[str, Any]) -> float:
    if "ttl" not in body:
        raise _BadBody(f"ttl is required: seconds the lease lasts, at most {MAX_TTL:g}")
    try:
        return validate_ttl(body["ttl"])
    except ValueError as exc:
        raise _BadBody(str(exc)) from None


def lease_router(leases: Leases, *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The lease routes, guarded by ``dependencies`` (the API's token check)."""
    router = APIRouter(tags=["leases"], dependencies=list(dependencies))

    @router.post(
        "/api/agents/{name}/leases",
        status_code=201,
        summary="Take a lease: wake the agent and keep it awake for ttl seconds.",
    )
    async def take_lease(name: str, request: Request) -> Response:
        try:
            body = await _json_object(request)
            ttl = _ttl_of(body)
            holder = body.get("holder", "")
            if not isinstance(holder, str) or len(holder) > MAX_HOLDER_LENGTH:
                raise _BadBody(f"holder must be text of at most {MAX_HOLDER_LENGTH} characters")
            unknown = sorted(set(body) - {"ttl", "holder"})
            if unknown:
                raise _BadBody(f"unknown field(s) {', '.join(unknown)}; expected ttl, holder")
        except _BadBody as exc:
            return _bad_request(name, exc)
        lease = await leases.grant(name, ttl, holder=holder)
        return JSONResponse(lease.to_json(), status_code=201)

    @router.get("/api/agents/{name}/leases", summary="Leases held on the agent.")
    async def list_leases(name: str) -> dict[str, Any]:
        return {"leases": [lease.to_json() for lease in leases.list(name)]}

    @router.put(
        "/api/agents/{name}/leases/{lease_id}",
        summary="Renew a lease: it now ends ttl seconds from now.",
    )
    async def renew_lease(name: str, lease_id: str, request: Request) -> Response:
        try:
            ttl = _ttl_of(await _json_object(request))
        except _BadBody as exc:
            return _bad_request(name, exc)
        lease = await leases.renew(name, lease_id, ttl)
        return JSONResponse(lease.to_json())

    @router.delete(
        "/api/agents/{name}/leases/{lease_id}",
        status_code=204,
        summary="Release a lease now.",
    )
    async def release_lease(name: str, lease_id: str) -> Response:
        await leases.release(name, lease_id)
        return Response(status_code=204)

    return router
