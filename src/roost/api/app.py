"""The admin HTTP API: agents as JSON, lifecycle actions, logs, metrics, the dashboard.

Role: a thin FastAPI front end over a running :class:`roost.engine.Engine`. It
decides nothing itself: every action becomes an event for the supervisor, which
refuses what the agent's state does not allow (``StateError`` → 409).

Invariants:
- Every error body is JSON ``{"error": "<message naming what is wrong>"}``; errors
  about one agent also carry ``"agent"``, start failures carry ``"log_tail"``.
- With a token, every route except ``/healthz``, the OpenAPI schema (``/openapi.json``,
  ``/docs``) and the dashboard's static page (``/``, which holds no data and asks for
  the token itself) needs ``Authorization: Bearer <token>``; the comparison is
  constant-time.
- Roost errors map to HTTP statuses by class (NotFound 404, StateError and Conflict
  409, ConfigError 400, StartupTimeout 504, DockerUnavailable 503, ContainerError
  502, StoreError 500), never by message text.
- Metrics live in a registry owned by the app, so two apps in one process never
  share counters.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

import prometheus_client
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from roost import errors
from roost.api import events, jobs, leases, messages, registry
from roost.core import events as ev
from roost.core.records import AgentRecord, StateChange
from roost.core.states import AgentState
from roost.engine import Engine
from roost.gateway import leasing, proxying
from roost.reactor.supervising import describe

__all__ = ["ACTIONS", "HISTORY_LIMIT", "ApiError", "create_app"]

log = logging.getLogger("roost.api")

#: Lifecycle actions accepted by ``POST /api/agents/{name}/{action}``.
ACTIONS = ("start", "stop", "pause", "wake", "restart", "reset")
#: State changes shown by ``GET /api/agents/{name}``.
HISTORY_LIMIT = 20
MAX_LOG_TAIL_LINES = 10_000

_ACTION_PATH = re.compile(r"^/api/agents/(?P<name>[^/]+)/(?P<action>[^/]+)$")


class ApiError(Exception):
    """An error answer: HTTP status plus the JSON body (always with ``error``)."""

    def __init__(
        self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, **extra}
        self.headers = headers


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


# --------------------------------------------------------------------------- errors


def _status_of(exc: errors.RoostError) -> int:
    # Most specific class first: StartupTimeout and DockerUnavailable are ContainerErrors.
    table: tuple[tuple[type[errors.RoostError], int], ...] = (
        (errors.NotFound, 404),
        (errors.StateError, 409),
        (errors.Conflict, 409),
        (errors.ConfigError, 400),
        (errors.StartupTimeout, 504),
        (errors.DockerUnavailable, 503),
        (errors.ContainerError, 502),
        (errors.StoreError, 500),
    )
    for cls, status in table:
        if isinstance(exc, cls):
            return status
    return 500


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for problem in exc.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()))
        problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    async def on_roost_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.RoostError)
        status = _status_of(exc)
        body: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
        name = request.path_params.get("name")
        if name is not None:
            body["agent"] = name
        if isinstance(exc, errors.ContainerError) and not isinstance(exc, errors.DockerUnavailable):
            body["log_tail"] = exc.log_tail
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(body, status_code=status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            match = _ACTION_PATH.match(path)
            if method == "POST" and match is not None:
                return JSONResponse(
                    {
                        "error": f"unknown action {match['action']!r}; "
                        f"valid actions: {', '.join(ACTIONS)}",
                        "agent": match["name"],
                        "valid_actions": list(ACTIONS),
                    },
                    status_code=404,
                )
            message = f"no such route: {method} {path}"
        elif exc.status_code == 405:
            message = f"method {method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception and re-raises it after this answer is sent.
        return JSONResponse(
            {"error": f"internal error while serving {request.method} {request.url.path}"},
            status_code=500,
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(errors.RoostError, on_roost_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


# --------------------------------------------------------------------------- auth


# Module level: FastAPI resolves the (postponed) annotations below against module globals.
_BEARER = HTTPBearer(
    auto_error=False,
    description="The token from server.token_file, as `Authorization: Bearer <token>`.",
)


def _token_guard(token: str) -> Callable[..., Awaitable[None]]:
    expected = token.encode("utf-8")

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        given = credentials.credentials.encode("utf-8") if credentials is not None else b""
        # Always compare (an absent header is an empty token), so timing says nothing.
        if not secrets.compare_digest(given, expected):
            raise ApiError(
                401,
                "missing or wrong API token: send 'Authorization: Bearer <token>' "
                "with the token from server.token_file",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


# --------------------------------------------------------------------------- metrics


class _AgentStateCollector(Collector):
    """``roost_agents{state}``: agents per state, counted at scrape time."""

    def __init__(self, records: Callable[[], Iterable[AgentRecord]]) -> None:
        self._records = records

    def collect(self) -> Iterable[Metric]:
        counts = dict.fromkeys(AgentState, 0)
        for record in self._records():
            counts[record.state] += 1
        family = GaugeMetricFamily("roost_agents", "Agents per state.", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state.value], count)
        yield family


class _Metrics(Collector):
    """Transition and restart counters fed by the supervisor's state listener.

    A collector of its own rather than ``prometheus_client.Counter``, whose
    ``*_created`` series would double the exposition for no use here.
    """

    def __init__(self, engine: Engine) -> None:
        self.transitions = dict.fromkeys(AgentState, 0)
        self.restarts = 0
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.registry.register(_AgentStateCollector(engine.supervisor.records))
        self.registry.register(self)

    def on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        for change in changes:
            self.transitions[change.to_state] += 1
            if change.to_state is AgentState.RESTARTING:
                self.restarts += 1

    def collect(self) -> Iterable[Metric]:
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


def create_app(engine: Engine, *, token: str | None) -> proxying.GatewayMiddleware[FastAPI]:
    """Roost's whole HTTP surface over ``engine`` (which the caller starts and stops):
    the reverse proxy takes ``/agents/...`` before FastAPI routes anything (the hot
    path skips FastAPI's per-request layers); everything else is the admin API
    (``.app``, the FastAPI instance). Serving and tests use exactly this."""
    supervisor = engine.supervisor
    metrics = _Metrics(engine)
    supervisor.add_listener(metrics.on_change)
    dashboard = _dashboard_html()
    guarded = [Depends(_token_guard(token))] if token else []

    app = FastAPI(
        title="Roost",
        version=_version(),
        description="Run AI agents as Docker containers on demand: the admin API.",
    )
    _install_error_handlers(app)

    def record_of(name: str) -> AgentRecord:
        try:
            return supervisor.get(name)
        except errors.NotFound:
            raise ApiError(404, f"no agent named {name!r}", agent=name) from None

    @app.get("/healthz", tags=["health"], summary="Liveness of Roost itself (no token needed).")
    async def healthz() -> dict[str, Any]:
        return {
            "ok": True,
            "agents": len(supervisor.actors),
            "docker_api": engine.docker_api_version,
        }

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        # Static page without data: public, it asks for the token and sends it itself.
        return HTMLResponse(dashboard)

    @app.get("/api/agents", tags=["agents"], dependencies=guarded, summary="All agents.")
    async def list_agents() -> dict[str, Any]:
        records = sorted(supervisor.records(), key=lambda r: r.name)
        return {"agents": [describe(r) for r in records]}

    @app.get(
        "/api/agents/{name}",
        tags=["agents"],
        dependencies=guarded,
        summary="One agent, with its latest state changes.",
    )
    async def get_agent(name: str) -> dict[str, Any]:
        record = record_of(name)
        entries = await engine.store.history(name, limit=HISTORY_LIMIT)
        return {
            **describe(record),
            "history": [
                {
                    "from": e.change.from_state.value,
                    "to": e.change.to_state.value,
                    "reason": e.change.reason,
                    "at": e.change.at,
                }
                for e in entries
            ],
        }

    @app.get(
        "/api/agents/{name}/logs",
        tags=["agents"],
        dependencies=guarded,
        response_class=PlainTextResponse,
        summary="The last lines of the agent's current container's output.",
    )
    async def agent_logs(
        name: str,
        tail: Annotated[int, Query(ge=1, le=MAX_LOG_TAIL_LINES)] = 100,
    ) -> PlainTextResponse:
        record = record_of(name)
        if record.container_id is None:
            raise ApiError(
                404, f"agent {name!r} has no container ({record.state.value})", agent=name
            )
        try:
            text = await engine.runtime.logs_tail(record.container_id, lines=tail)
        except errors.ContainerNotFound:
            raise ApiError(
                404,
                f"agent {name!r}: container {record.container_id[:12]} no longer exists",
                agent=name,
            ) from None
        return PlainTextResponse(text)

    def add_start_action(action: str) -> None:
        async def start_like(
            name: str,
            timeout: Annotated[
                float | None,
                Query(gt=0, description="Seconds to wait; default: the agent's startup_timeout."),
            ] = None,
            wait: Annotated[
                bool, Query(description="false: only request it and answer 202.")
            ] = True,
        ) -> Response:
            record_of(name)
            reason = f"{action} requested via API"
            if not wait:
                record = await supervisor.request(name, ev.StartRequested(reason))
                return JSONResponse(describe(record), status_code=202)
            limit = (
                timeout if timeout is not None else supervisor.actor(name).policy.startup_timeout
            )
            record = await supervisor.ensure_running(name, timeout=limit, reason=reason)
            return JSONResponse(describe(record))

        app.add_api_route(
            f"/api/agents/{{name}}/{action}",
            start_like,
            methods=["POST"],
            tags=["actions"],
            dependencies=guarded,
            name=f"{action}_agent",
            summary=f"{action.capitalize()} the agent and wait until it answers its health check.",
        )

    def add_request_action(action: str, make: Callable[[str], ev.Event]) -> None:
        async def requested(name: str) -> dict[str, Any]:
            record_of(name)
            record = await supervisor.request(name, make(f"{action} requested via API"))
            return describe(record)

        app.add_api_route(
            f"/api/agents/{{name}}/{action}",
            requested,
            methods=["POST"],
            tags=["actions"],
            dependencies=guarded,
            name=f"{action}_agent",
            summary=f"{action.capitalize()} the agent (returns once it is requested).",
        )

    add_start_action("start")
    add_request_action("stop", ev.StopRequested)
    add_request_action("pause", ev.PauseRequested)
    add_start_action("wake")
    add_request_action("restart", ev.RestartRequested)
    add_request_action("reset", ev.ResetRequested)

    @app.get(
        "/metrics",
        tags=["health"],
        dependencies=guarded,
        response_class=PlainTextResponse,
        summary="Prometheus metrics.",
    )
    async def get_metrics() -> Response:
        return Response(metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    app.include_router(registry.registry_router(engine), dependencies=guarded)
    app.include_router(jobs.jobs_router(engine), dependencies=guarded)
    app.include_router(messages.messages_router(engine), dependencies=guarded)
    # Open event streams end when the server stops (serving closes them) or the engine does.
    app.state.event_streams = event_streams = events.EventStreams()
    engine.add_closer(event_streams.close)
    app.include_router(events.events_router(engine, event_streams), dependencies=guarded)
    lease_table = leasing.Leases(engine)
    engine.add_closer(lease_table.close)
    app.include_router(leases.lease_router(lease_table), dependencies=guarded)
    proxy = proxying.AgentProxy(engine, token=token)
    engine.add_closer(proxy.close)
    return proxying.GatewayMiddleware(app, proxy=proxy)
