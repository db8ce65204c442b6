"""The admin HTTP API: agents as JSON, lifecycle actions, logs, metrics, the dashboard.

Role: a thin FastAPI front end over a running :class:`roost.engine.Engine`, reached
only through ``engine.agents`` (the facade) and the engine's other components
(inbox, jobs, events). It decides nothing itself: every action is requested from
the facade, which refuses what the agent's state does not allow (``StateError`` →
409). It sits behind the edge (``roost.edge``), which checks the token and the
body size before a request gets here; OpenAPI documents both.

Invariants:
- Every error body is ``{"error": ...}`` (``roost.api.errors``), documented per route.
- Metrics (``roost.api.metrics``) live in a registry owned by the app, so two
  apps in one process never share counters.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import urllib.parse
from typing import Annotated, Any

import prometheus_client
from fastapi import FastAPI, Query
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from roost import errors
from roost.api import (
    agent_endpoints,
    events,
    jobs,
    leases,
    messages,
    openapi,
    registry,
    routing,
    schemas,
)
from roost.api.errors import error_responses, install_error_handlers
from roost.api.metrics import Metrics, build_version
from roost.config import parse_duration
from roost.engine import Engine
from roost.reactor.agents import ACTIONS, Action

__all__ = ["HISTORY_LIMIT", "PUBLIC_PATHS", "create_api"]

#: State changes shown by ``GET /api/agents/{name}``.
HISTORY_LIMIT = 20
MAX_LOG_TAIL_LINES = 10_000
#: Routes anyone may read, token or not (the edge lets them through).
PUBLIC_PATHS = frozenset({"/healthz", "/", "/openapi.json", "/docs", "/redoc"})
#: Swagger UI's and ReDoc's own files, served from the fastapi-offline package.
DOCS_ASSETS = "/docs/assets"
#: The browser may load nothing from elsewhere: a page can never reach a CDN, even
#: one an asset names (ReDoc's bundle links a logo on cdn.redoc.ly).
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
#: Swagger UI starts from an inline script; ReDoc runs workers from blob: URLs.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


#: The dashboard's own files (index.html, dashboard.js, dashboard.css), package data.
STATIC_DIR = pathlib.Path(str(importlib.resources.files("roost.api").joinpath("static")))


def _dashboard_html() -> str:
    """The dashboard page; its file URLs carry the version, so a new Roost is never
    served an old cached script."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return page.replace("{{version}}", urllib.parse.quote(build_version()))


# --------------------------------------------------------------------------- app

DESCRIPTION = """Run AI agents as Docker containers on demand: the admin API.

Errors are always JSON in one shape, `{"error": "...", ...}` (`ErrorBody`): the
message names what is wrong; errors about one agent carry `agent`.
With `server.token_file` set, every route but `/healthz`, `/`, and these docs needs
`Authorization: Bearer <token>` (or `Roost-Token: <token>`).
The reverse proxy `ANY /agents/{name}/{path}` is served beside this API.
"""


def create_api(engine: Engine) -> FastAPI:
    """The admin API over ``engine`` (which the caller starts and stops)."""
    agents = engine.agents
    metrics = Metrics(engine)
    dashboard = _dashboard_html()

    # FastAPIOffline: FastAPI with /docs and /redoc on local copies of Swagger UI and
    # ReDoc (no CDN); the edge lets their assets under /docs/ through without a token.
    app = FastAPIOffline(
        title="Roost",
        version=build_version(),
        description=DESCRIPTION,
        static_url=DOCS_ASSETS,
        docs_url=None,  # served below, with a Content-Security-Policy
        redoc_url=None,
    )
    install_error_handlers(
        app,
        actions=ACTIONS,
        on_store_error=lambda exc: engine.health.fail("store", str(exc)),
    )
    openapi.document(app, public_paths=PUBLIC_PATHS)
    #: the proxy reports to it (``roost.edge`` wires them).
    app.state.metrics = metrics
    # Open streams (events, followed logs) end when the server stops (serving closes
    # them) or the engine does.
    app.state.event_streams = event_streams = events.EventStreams()
    engine.add_closer(event_streams.close)

    @app.get(
        "/healthz",
        tags=["health"],
        summary="Roost itself (no token needed): ok, or degraded with the reasons.",
        response_model=schemas.Health,
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
        return HTMLResponse(
            dashboard,
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": DASHBOARD_CSP},
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Roost - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            # No validator badge: it would call validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url="/openapi.json",
            title="Roost - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="dashboard")

    @app.get(
        "/api/agents",
        tags=["agents"],
        summary="All agents.",
        response_model=schemas.AgentList,
        response_model_exclude_unset=True,
    )
    async def list_agents() -> dict[str, Any]:
        return {
            "agents": [schemas.agent_body(agents, engine.inbox, name) for name in agents.names()]
        }

    @app.get(
        "/api/agents/{name}",
        tags=["agents"],
        summary="One agent, with its latest state changes.",
        response_model=schemas.AgentDetails,
        response_model_exclude_unset=True,
        responses=error_responses(404),
    )
    async def get_agent(name: schemas.AgentName) -> dict[str, Any]:
        details = await agents.details(name, history=HISTORY_LIMIT)
        return {**details, **schemas.agent_body(agents, engine.inbox, name)}

    @app.get(
        "/api/agents/{name}/logs",
        tags=["agents"],
        response_class=PlainTextResponse,
        summary="The last lines of the agent's current container's output.",
        responses={
            200: {"content": {"text/plain": {"example": "listening on :8000\n"}}},
            **error_responses(400, 404, 422, 502, 503),
        },
    )
    async def agent_logs(
        name: schemas.AgentName,
        tail: Annotated[
            int, Query(ge=1, le=MAX_LOG_TAIL_LINES, description="How many lines.")
        ] = 100,
        follow: Annotated[
            bool, Query(description="Stream new output as it comes, across restarts.")
        ] = False,
        since: Annotated[
            str | None,
            Query(description="Only output from this long ago on: '90s', '10m', '1h'."),
        ] = None,
        timestamps: Annotated[bool, Query(description="Prefix each line with its time.")] = False,
        previous: Annotated[
            bool,
            Query(description="The output kept from the latest exit (a crashed container)."),
        ] = False,
    ) -> Response:
        if previous:
            return PlainTextResponse(await agents.previous_logs(name))
        start = None
        if since is not None:
            try:
                start = engine.clock.now() - parse_duration(since)
            except ValueError as exc:
                raise errors.Refusal(400, f"since: {exc}") from None
        if not follow:
            return PlainTextResponse(
                await agents.logs(name, tail=tail, since=start, timestamps=timestamps)
            )
        agents.get(name)  # NotFound before the stream starts
        chunks = agents.follow_logs(name, tail=tail, since=start, timestamps=timestamps)
        return StreamingResponse(
            event_streams.until_closed(chunks),
            media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def add_action(action: Action) -> None:
        waits = action in ("start", "wake")

        async def act(
            name: schemas.AgentName,
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
                return JSONResponse(schemas.agent_body(agents, engine.inbox, name))
            await agents.act(name, action, reason=reason)
            return JSONResponse(
                schemas.agent_body(agents, engine.inbox, name), status_code=202 if waits else 200
            )

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
            response_model=schemas.Agent,
            response_model_exclude_unset=True,
            responses={
                **(
                    {202: {"model": schemas.Agent, "description": "Requested (wait=false)."}}
                    if waits
                    else {}
                ),
                **error_responses(404, 409, 422, *((502, 503, 504) if waits else ())),
            },
        )

    for action in ACTIONS:
        add_action(action)

    @app.post(
        "/api/reload",
        tags=["health"],
        summary="Re-read the config file and apply its agents (like SIGHUP).",
        responses=error_responses(400, 409),
    )
    async def reload(
        restart: Annotated[
            bool, Query(description="Restart running agents whose container changed now.")
        ] = False,
    ) -> dict[str, Any]:
        return await engine.reload_from_file(restart=restart)

    @app.get(
        "/api/config",
        tags=["health"],
        summary="The configuration the daemon runs: its file and each configured agent.",
    )
    async def config() -> dict[str, Any]:
        resolved = engine.settings.resolved_agents()
        return {
            "source_file": engine.settings.source_file,
            "agents": {name: spec.shown() for name, spec in resolved.items()},
        }

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        summary="Prometheus metrics (every series is listed in the README).",
        responses={
            200: {
                "content": {
                    "text/plain": {
                        "example": '# TYPE roost_agents gauge\nroost_agents{state="running"} 1.0\n'
                    }
                }
            }
        },
    )
    async def get_metrics() -> Response:
        return Response(
            await metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST
        )

    app.include_router(registry.registry_router(engine))
    app.include_router(jobs.jobs_router(engine))
    app.include_router(messages.messages_router(engine))
    app.include_router(routing.route_router(engine))
    app.include_router(agent_endpoints.agent_router(engine))
    app.include_router(events.events_router(engine, event_streams))
    app.include_router(leases.lease_router(engine.leases))
    return app
