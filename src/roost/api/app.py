"""The admin HTTP API: agents as JSON, lifecycle actions, logs, metrics, the dashboard.

Role: a thin FastAPI front end over a running :class:`roost.engine.Engine`, reached
only through ``engine.agents`` (the facade) and the engine's other components
(inbox, jobs, events). It decides nothing itself: every action is requested from
the facade, which refuses what the agent's state does not allow (``StateError`` →
409). It sits behind the edge (``roost.edge``), which checks the token and the
body size before a request gets here; OpenAPI documents both.

Invariants:
- Every error body is ``{"error": ...}`` (``roost.api.errors``), documented per route.
- Metrics live in a registry owned by the app, so two apps in one process never
  share counters.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from collections.abc import Iterable
from typing import Annotated, Any

import prometheus_client
from fastapi import FastAPI, Query
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from roost.api import events, jobs, leases, messages, registry
from roost.api.errors import error_responses, install_error_handlers
from roost.core.records import AgentRecord, StateChange
from roost.core.states import AgentState
from roost.engine import Engine
from roost.reactor.agents import ACTIONS, Action, Agents

__all__ = ["HISTORY_LIMIT", "create_api"]

#: State changes shown by ``GET /api/agents/{name}``.
HISTORY_LIMIT = 20
MAX_LOG_TAIL_LINES = 10_000
#: Routes anyone may read, token or not (the edge lets them through).
PUBLIC_PATHS = frozenset({"/healthz", "/", "/openapi.json", "/docs", "/redoc"})


def _version() -> str:
    try:
        return importlib.metadata.version("roost")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _dashboard_html() -> str:
    return (
        importlib.resources.files("roost.api")
        .joinpath("static", "index.html")
        .read_text(encoding="utf-8")
    )


# --------------------------------------------------------------------------- metrics


class _Metrics(Collector):
    """``roost_agents{state}`` at scrape time, and transition/restart counters fed by
    the facade's state listener.

    A collector of its own rather than ``prometheus_client.Counter``, whose
    ``*_created`` series would double the exposition for no use here.
    """

    def __init__(self, agents: Agents) -> None:
        self._agents = agents
        self.transitions = dict.fromkeys(AgentState, 0)
        self.restarts = 0
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        agents.add_listener(self.on_change)

    def on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        for change in changes:
            self.transitions[change.to_state] += 1
            if change.to_state is AgentState.RESTARTING:
                self.restarts += 1

    def collect(self) -> Iterable[Metric]:
        counts = dict.fromkeys(AgentState, 0)
        for record in self._agents.records():
            counts[record.state] += 1
        agents = GaugeMetricFamily("roost_agents", "Agents per state.", labels=["state"])
        for state, count in counts.items():
            agents.add_metric([state.value], count)
        yield agents
        transitions = CounterMetricFamily(
            "roost_agent_transitions",
            "Agent state changes, by the state entered.",
            labels=["to"],
        )
        for state, count in self.transitions.items():
            transitions.add_metric([state.value], count)
        yield transitions
        yield CounterMetricFamily(
            "roost_restarts",
            "Automatic restarts scheduled after a crash (entries into 'restarting').",
            value=self.restarts,
        )

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


# --------------------------------------------------------------------------- app


def _document_security(app: FastAPI) -> None:
    """OpenAPI says what the edge enforces: a bearer token on every route but the
    public ones (when ``server.token_file`` is set)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token from server.token_file (required when it is "
                    "set): `Authorization: Bearer <token>`, or `Roost-Token: <token>`.",
                }
            }
            for path, operations in schema.get("paths", {}).items():
                if path in PUBLIC_PATHS:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {}).setdefault(
                        "401",
                        {
                            "description": "Missing or wrong API token "
                            "(when server.token_file is set).",
                            "content": _ERROR_CONTENT,
                        },
                    )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def create_api(engine: Engine) -> FastAPI:
    """The admin API over ``engine`` (which the caller starts and stops)."""
    agents = engine.agents
    metrics = _Metrics(agents)
    dashboard = _dashboard_html()

    app = FastAPI(
        title="Roost",
        version=_version(),
        description="Run AI agents as Docker containers on demand: the admin API.",
    )
    install_error_handlers(
        app,
        actions=ACTIONS,
        on_store_error=lambda exc: engine.health.fail("store", str(exc)),
    )
    _document_security(app)

    @app.get(
        "/healthz",
        tags=["health"],
        summary="Roost itself (no token needed): ok, or degraded with the reasons.",
    )
    async def healthz() -> dict[str, Any]:
        problems = engine.health.problems()
        return {
            "ok": not problems,
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "agents": len(agents),
            "docker_api": engine.docker_api_version,
        }

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        # Static page without data: public, it asks for the token and sends it itself.
        return HTMLResponse(dashboard)

    @app.get("/api/agents", tags=["agents"], summary="All agents.")
    async def list_agents() -> dict[str, Any]:
        return {"agents": [agents.describe(name) for name in agents.names()]}

    @app.get(
        "/api/agents/{name}",
        tags=["agents"],
        summary="One agent, with its latest state changes.",
        responses=error_responses(404),
    )
    async def get_agent(name: str) -> dict[str, Any]:
        return await agents.details(name, history=HISTORY_LIMIT)

    @app.get(
        "/api/agents/{name}/logs",
        tags=["agents"],
        response_class=PlainTextResponse,
        summary="The last lines of the agent's current container's output.",
        responses=error_responses(404),
    )
    async def agent_logs(
        name: str,
        tail: Annotated[int, Query(ge=1, le=MAX_LOG_TAIL_LINES)] = 100,
    ) -> PlainTextResponse:
        return PlainTextResponse(await agents.logs(name, tail=tail))

    def add_action(action: Action) -> None:
        waits = action in ("start", "wake")

        async def act(
            name: str,
            timeout: Annotated[
                float | None,
                Query(gt=0, description="Seconds to wait; default: the agent's startup_timeout."),
            ] = None,
            wait: Annotated[
                bool, Query(description="false: only request it and answer 202.")
            ] = True,
        ) -> Response:
            reason = f"{action} requested via API"
            if waits and wait:
                limit = timeout if timeout is not None else agents.spec(name).startup_timeout
                await agents.wake(name, reason=reason, timeout=limit)
                return JSONResponse(agents.describe(name))
            await agents.act(name, action, reason=reason)
            return JSONResponse(agents.describe(name), status_code=202 if waits else 200)

        app.add_api_route(
            f"/api/agents/{{name}}/{action}",
            act,
            methods=["POST"],
            tags=["actions"],
            name=f"{action}_agent",
            summary=(
                f"{action.capitalize()} the agent and wait until it answers its health check."
                if waits
                else f"{action.capitalize()} the agent (returns once it is requested)."
            ),
            responses=error_responses(404, 409, *((502, 503, 504) if waits else ())),
        )

    for action in ACTIONS:
        add_action(action)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        summary="Prometheus metrics.",
    )
    async def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    app.include_router(registry.registry_router(engine))
    app.include_router(jobs.jobs_router(engine))
    app.include_router(messages.messages_router(engine))
    # Open event streams end when the server stops (serving closes them) or the engine does.
    app.state.event_streams = event_streams = events.EventStreams()
    engine.add_closer(event_streams.close)
    app.include_router(events.events_router(engine, event_streams))
    app.include_router(leases.lease_router(engine.leases))
    return app
