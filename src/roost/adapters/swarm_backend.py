"""``SwarmBackend``: the agent backend port over a Docker Swarm (aiodocker on a manager).

Role: each agent runs as one service of one replica; its id is the unit's id (the
agent record's ``container_id``). What runs is the service's *current task* (its
newest), on whichever node Swarm placed it. Roost keeps the lifecycle: services
are created with ``RestartPolicy.Condition = none``, so Swarm never restarts a
task itself and every exit reaches Roost's own backoff and ``max_restarts``.

- ``ensure``: ``POST /services/create`` with Roost's labels (on the service and
  its containers), the limits a service has (memory, CPUs, pids), the agent's env
  (its token included: env, never a label or a log line), capabilities, the
  agent's ``placement`` constraints, ``dnsrr`` endpoints and the agent's port
  published in host mode. The service wants one replica at once, so its task is
  scheduled while the supervisor records the id.
- ``wake``: scale to one. Swarmkit loses a scale-up that follows a scale-down too
  closely (the service stays 0/1 with no task), so the old task must be gone
  first, and every scale-up bumps ``ForceUpdate``; a service that still has no
  task after ``STUCK_AFTER`` gets another bump. Returns once the new task runs;
  a task that fails or is rejected raises ``ContainerError`` with Swarm's error.
- ``sleep(stop)``: scale to zero, then wait until the task has ended. There is no
  pause on a swarm (``can_pause`` False): the engine stops instead.
- ``status``/``list``: the service's wanted replicas against its tasks present, on
  every call: wanted one and its current task running → ``running``; wanted one
  and a task on its way (or none yet) → ``created``; otherwise ``exited``.
- ``endpoint``: the running task's host-mode port (``Status.PortStatus``, which
  Docker 20.10 lists once per address family: deduplicated) on its node's address
  (``Status.Addr``); Roost reaches the agent there.
- Exit details: the task's exit code and error; the OOM flag, the container's own
  error and finish time come from the node's Docker API (``node_hosts``) where
  it is reachable; otherwise an exit killed by SIGKILL says the OOM flag is
  unknown.
- ``observe``: the manager's event stream has no task events (no exits, no OOM),
  so tasks are polled: every ``POLL_INTERVAL`` while anything changes (and after
  every operation of ours), backing off to ``IDLE_POLL_INTERVAL`` when nothing
  does; service and node events on the manager's stream cut a wait short. A diff
  becomes events: ``die`` (the current task ended), ``destroy`` (the service is
  gone), ``node_lost`` (its node is down while the task should run). A failed
  poll yields ``lost`` (once), and the next good one ``gap``: the caller re-lists.

Errors are translated as ``docker_runtime`` translates them (one mapping,
``docker_runtime.translated``): unreachable → ``DockerUnavailable``, 404 →
``ContainerNotFound``, 409 on create → ``Conflict``, else ``ContainerError``.

Swarm facts this module relies on (dockerd 20.10, API 1.41, measured on the
three-node fixture, scripts/swarm-fixture):
- with ``Condition = none`` a task on a node that goes down keeps its observed
  state (``running``) and gets desired state ``shutdown``; the node is marked
  ``down`` ~11-13 s after it stops answering, and nothing is rescheduled;
- task states: new, allocated, pending, assigned, accepted, preparing, ready,
  starting, running; ended: complete, failed, shutdown, rejected, orphaned, remove;
- an OOM kill shows as ``failed`` with exit code 137; only the node knows it was OOM.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError
from aiodocker.multiplexed import multiplexed_result_list, multiplexed_result_stream

from roost import errors
from roost.adapters.docker_runtime import DockerRuntime, connect, docker_address, translated
from roost.core.backoff import Backoff
from roost.core.labels import AGENT, INSTANCE
from roost.core.records import ExitInfo, SessionHealth
from roost.ports.backend import Capabilities, Endpoint, SleepMode
from roost.ports.runtime import ContainerInfo, ContainerSpec, ContainerState, RuntimeEvent

__all__ = ["SWARM_CAPABILITIES", "SwarmBackend"]

log = logging.getLogger(__name__)

SWARM_CAPABILITIES = Capabilities(
    can_pause=False,
    can_commit=False,
    publishes_on_loopback=False,
    no_new_privileges=False,
    limits_swap=False,
    reports_oom=False,
    shared_volumes=False,
    spans_nodes=True,
)

#: Between polls of the tasks while anything changes (and after our own operations).
POLL_INTERVAL = 0.25
#: The longest wait between polls when nothing changes.
IDLE_POLL_INTERVAL = 1.0
#: Polls at POLL_INTERVAL after an operation of ours, changes or not.
_FAST_POLLS_AFTER_OPERATION = 8
#: How often ``wake`` and ``sleep`` look at their task (they wait for one task).
TASK_POLL_INTERVAL = 0.02
#: A service that wants a replica but has no task this long is stuck (the swarmkit
#: race): bump ForceUpdate again.
STUCK_AFTER = 3.0
#: ``sleep`` waits this long past the stop grace for the task to end (a node that
#: is down never reports it; the manager stops it when the node returns).
STOP_MARGIN = 15.0
#: Bound on reading a service's logs (the manager gathers them from every node).
LOGS_TIMEOUT = 10.0
#: Service updates refused because another update came first are retried this often.
_UPDATE_ATTEMPTS = 4
_RECONNECT = Backoff.doubling(0.1, 2.0)
_LIVE_STATES = frozenset(
    {
        "new",
        "allocated",
        "pending",
        "assigned",
        "accepted",
        "preparing",
        "ready",
        "starting",
        "running",
    }
)
_ENDED_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})
_NODE_DOWN = frozenset({"down", "unknown", "disconnected"})
#: SIGKILL: the OOM killer's signal, and not only its.
_KILLED = 137
_NAME_LIMIT = 63


@dataclasses.dataclass(slots=True)
class _Poll:
    """What one poll saw, for the next one to diff against."""

    #: service id → its labels.
    labels: dict[str, dict[str, str]]
    #: service id → (wanted replicas, current task id, its state, its node).
    services: dict[str, tuple[int, str | None, str | None, str | None]]
    #: task ids seen live (running or on their way).
    live: set[str]
    #: ended current task id → its exit code (None: it never ran a container).
    exit_codes: dict[str, int | None]
    #: node id → state.
    nodes: dict[str, str]


class SwarmBackend:
    """``AgentBackend`` on a Docker Swarm (see the module docstring).

    ``host`` is the manager's Docker address (None: ``DOCKER_HOST`` or the local
    socket); ``node_hosts`` maps a node's id or address to its own Docker API, read
    for exit details (OOM) where reachable."""

    kind = "swarm"
    capabilities = SWARM_CAPABILITIES

    def __init__(
        self,
        host: str | None = None,
        *,
        node_hosts: Mapping[str, str] | None = None,
        connection_limit: int = 32,
        poll_interval: float = POLL_INTERVAL,
        idle_poll_interval: float = IDLE_POLL_INTERVAL,
    ) -> None:
        self._host = docker_address(host)
        self._connection_limit = connection_limit
        self._docker: aiodocker.Docker | None = None
        self._connector: aiohttp.BaseConnector | None = None
        self._node_hosts = dict(node_hosts or {})
        self._node_runtimes: dict[str, DockerRuntime] = {}
        self._poll_interval = poll_interval
        self._idle_poll_interval = idle_poll_interval
        #: set by every operation of ours: observers poll at once, then quickly.
        self._operated = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()
        #: node id → address Roost reaches it at.
        self._node_addresses: dict[str, str] = {}
        #: service id → (task id, endpoint) seen running by ``wake``.
        self._endpoints: dict[str, tuple[str, Endpoint]] = {}
        #: task id → exit details read from its node (they never change).
        self._exits: dict[str, ExitInfo] = {}
        self._checked_manager = False

    # -- client lifecycle -----------------------------------------------------------

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker, self._connector = connect(self._host, self._connection_limit)
        return self._docker

    async def close(self) -> None:
        watchers = list(self._watchers)
        for task in watchers:
            task.cancel()
        if watchers:
            await asyncio.wait(watchers)
        self._watchers.clear()
        for runtime in self._node_runtimes.values():
            await runtime.close()
        self._node_runtimes.clear()
        docker, connector = self._docker, self._connector
        self._docker = self._connector = None
        if docker is not None:
            await docker.close()
        if connector is not None:
            await connector.close()

    async def _get(self, path: str, what: str, params: Mapping[str, Any] | None = None) -> Any:
        with translated(what, self._host):
            return await self._client()._query_json(path, "GET", params=params)

    # -- engine ---------------------------------------------------------------------

    async def ping(self) -> str:
        with translated("ping the swarm manager", self._host):
            version = await self._client().version()
        if not self._checked_manager:
            info = await self._get("info", "read the engine's info")
            swarm = info.get("Swarm") or {}
            if not swarm.get("ControlAvailable"):
                raise errors.ContainerError(
                    f"the Docker engine at {self._host} is not a swarm manager "
                    f"(swarm state {swarm.get('LocalNodeState') or 'inactive'!r}): "
                    "docker.backend = 'swarm' needs docker.host to name a manager"
                )
            self._checked_manager = True
        return str(version["ApiVersion"])

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        """Nothing to do here: every node pulls what its tasks need from a registry
        (or has it loaded, preferring local images); a node without it rejects the
        task, which ``wake`` reports with Swarm's error."""

    # -- units ----------------------------------------------------------------------

    async def ensure(self, spec: ContainerSpec, *, placement: tuple[str, ...] = ()) -> str:
        body = _service_spec(spec, placement)
        try:
            with translated("create service from", spec.image):
                created = await self._client()._query_json(
                    "services/create", "POST", data=json.dumps(body)
                )
        except errors.ContainerError as exc:
            if exc.status == 409:
                raise errors.Conflict(f"service name {body['Name']!r} is already taken") from exc
            raise
        self._operated.set()
        return str(created["ID"])

    async def wake(self, unit_id: str, *, paused: bool = False, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        self._endpoints.pop(unit_id, None)
        service, tasks = await self._service_with_tasks(unit_id)
        force = _force_update(service)
        current = _current(tasks, force)
        wanted = _replicas(service)
        if wanted < 1 or (current is not None and _state(current) in _ENDED_STATES):
            if current is not None and _state(current) in _LIVE_STATES:
                # Still stopping after a sleep: scaling up now would race it.
                await self._until_ended(unit_id, str(current["ID"]), deadline)
            # (A task's end does not change the service's version; an update that
            # another one overtook is retried on a fresh read.)
            force = await self._scale(unit_id, 1, bump=True, service=service)
        # else: it wants a replica and has (or is getting) a task: wait for that one.
        self._operated.set()
        bumped_at = time.monotonic()
        while True:
            current = _current(await self._tasks([unit_id]), force)
            if current is not None:
                state = _state(current)
                if state == "running":
                    endpoint = await self._endpoint_of(current)
                    if endpoint is not None:
                        self._endpoints[unit_id] = (str(current["ID"]), endpoint)
                    return
                if state in _ENDED_STATES:
                    raise errors.ContainerError(
                        f"service {unit_id[:12]}: task {str(current['ID'])[:12]} "
                        f"{state} before it ran: {_task_error(current)}"
                    )
            elif time.monotonic() - bumped_at >= STUCK_AFTER:
                # Wanted one replica, got no task: the swarmkit race. Ask again.
                log.info("service %s has no task; bumping ForceUpdate", unit_id[:12])
                force = await self._scale(unit_id, 1, bump=True)
                bumped_at = time.monotonic()
            if time.monotonic() >= deadline:
                where = _task_error(current) if current is not None else "no task was made"
                state = _state(current) if current is not None else "without a task"
                raise errors.StartupTimeout(
                    f"service {unit_id[:12]} still {state} after {timeout:g}s: {where}"
                )
            await asyncio.sleep(TASK_POLL_INTERVAL)

    async def sleep(self, unit_id: str, *, mode: SleepMode, grace: float = 10.0) -> None:
        if mode == "pause":
            raise errors.ContainerError(
                f"service {unit_id[:12]}: a Docker Swarm service cannot be paused "
                "(capabilities.can_pause is False)"
            )
        self._endpoints.pop(unit_id, None)
        try:
            await self._scale(unit_id, 0, grace=grace)
        except errors.ContainerNotFound:
            return
        self._operated.set()
        deadline = time.monotonic() + grace + STOP_MARGIN
        while time.monotonic() < deadline:
            try:
                tasks = await self._tasks([unit_id])
            except errors.ContainerNotFound:
                return
            if not any(_state(t) in _LIVE_STATES for t in tasks):
                self._operated.set()  # observers: poll now, the exit is there to see
                return
            await asyncio.sleep(TASK_POLL_INTERVAL * 5)
        log.warning(
            "service %s: its task has not ended %gs after the scale to 0 (its node may be "
            "down; the node stops it when it returns)",
            unit_id[:12],
            grace + STOP_MARGIN,
        )

    async def remove(self, unit_id: str) -> None:
        self._endpoints.pop(unit_id, None)
        try:
            with translated("remove service", unit_id):
                async with self._client()._query(f"services/{unit_id}", "DELETE"):
                    pass
        except errors.ContainerNotFound:
            return
        self._operated.set()

    async def status(self, unit_id: str) -> ContainerState:
        service, tasks = await self._service_with_tasks(unit_id)
        return await self._state_of(service, tasks)

    async def endpoint(self, unit_id: str) -> Endpoint | None:
        known = self._endpoints.get(unit_id)
        if known is not None:
            return known[1]
        service = await self._service(unit_id)
        current = _current(await self._tasks([unit_id]), _force_update(service))
        if current is None or _state(current) != "running":
            return None
        return await self._endpoint_of(current)

    async def logs_tail(self, unit_id: str, *, lines: int = 50) -> str:
        return "".join([chunk async for chunk in self.logs(unit_id, tail=lines)])

    async def logs(
        self,
        unit_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        params: dict[str, Any] = {
            "stdout": "1",
            "stderr": "1",
            "tail": "all" if tail is None else str(tail),
        }
        if since is not None:
            params["since"] = str(int(since))
        if timestamps:
            params["timestamps"] = "1"
        if follow:
            params["follow"] = "1"
        path = f"services/{unit_id}/logs"
        if not follow:
            try:
                # The manager gathers them from every node: one that is down would
                # hold the answer open, so it is bounded.
                async with asyncio.timeout(LOGS_TIMEOUT):
                    with translated("read logs of service", unit_id):
                        async with self._client()._query(path, "GET", params=params) as response:
                            # (aiodocker's demultiplexer is untyped)
                            chunks: builtins.list[str] = await multiplexed_result_list(response)  # type: ignore[no-untyped-call]
            except TimeoutError as exc:
                raise errors.ContainerError(
                    f"cannot read logs of service {unit_id}: no answer within {LOGS_TIMEOUT:g}s"
                ) from exc
            for chunk in chunks:
                yield chunk
            return
        with translated("read logs of service", unit_id):
            async with self._client()._query(
                path, "GET", params=params, timeout=aiohttp.ClientTimeout(sock_connect=10.0)
            ) as response:
                stream = multiplexed_result_stream(response)  # type: ignore[no-untyped-call]
                async for chunk in stream:
                    yield chunk

    async def list(self, labels: Mapping[str, str]) -> builtins.list[ContainerInfo]:
        services, tasks = await self._services_and_tasks(labels)
        by_service = _by_service(tasks)
        found = []
        for service in services:
            service_id = str(service["ID"])
            spec = service.get("Spec") or {}
            current = _current(by_service.get(service_id, []), _force_update(service))
            status, _ = _status(_replicas(service), current)
            found.append(
                ContainerInfo(
                    id=service_id,
                    name=str(spec.get("Name", "")),
                    image=_image(service),
                    labels=dict(spec.get("Labels") or {}),
                    status=status,
                    created_at=_epoch(str(service.get("CreatedAt") or "")),
                )
            )
        return found

    # -- observing ------------------------------------------------------------------

    def observe(self, labels: Mapping[str, str]) -> AsyncIterator[RuntimeEvent]:
        return self._observe(dict(labels))

    async def _observe(self, labels: dict[str, str]) -> AsyncIterator[RuntimeEvent]:
        poked = asyncio.Event()
        watcher = asyncio.create_task(
            self._watch_manager(poked), name=f"roost.swarm-events[{self._host}]"
        )
        self._watchers.add(watcher)
        previous: _Poll | None = None
        #: task ids an event was sent for, by kind (each is sent once).
        reported: dict[str, set[str]] = {}
        failures = 0
        lost = False
        interval = self._poll_interval
        fast_polls = 0
        try:
            while True:
                if self._operated.is_set():
                    self._operated.clear()
                    fast_polls = _FAST_POLLS_AFTER_OPERATION
                try:
                    current = await self._poll(labels)
                except errors.RoostError as exc:
                    if failures == 0:
                        log.warning("swarm poll failed (%s); polling again", exc)
                    if not lost and isinstance(exc, errors.DockerUnavailable):
                        lost = True
                        yield RuntimeEvent(kind="lost", time=time.time())
                    failures += 1
                    previous = None
                    await asyncio.sleep(_RECONNECT.delay(failures - 1) or 0.0)
                    continue
                if failures:
                    failures = 0
                    lost = False
                    yield RuntimeEvent(kind="gap", time=time.time())
                events = _diff(previous, current, reported)
                changed = previous is None or bool(events) or _changed(previous, current)
                previous = current
                for event in events:
                    yield event
                if changed or fast_polls > 0:
                    interval = self._poll_interval
                    fast_polls = max(0, fast_polls - 1)
                else:
                    interval = min(interval * 2, self._idle_poll_interval)
                poked.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await _either(poked, self._operated)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])
            self._watchers.discard(watcher)

    async def _poll(self, labels: Mapping[str, str]) -> _Poll:
        services, tasks = await self._services_and_tasks(labels)
        nodes = await self._get("nodes", "list the swarm's nodes")
        node_states = {}
        for node in nodes:
            node_id = str(node["ID"])
            node_states[node_id] = str((node.get("Status") or {}).get("State") or "unknown")
            address = _node_address(node)
            if address:
                self._node_addresses[node_id] = address
        by_service = _by_service(tasks)
        seen: dict[str, tuple[int, str | None, str | None, str | None]] = {}
        for service in services:
            service_id = str(service["ID"])
            current = _current(by_service.get(service_id, []), _force_update(service))
            seen[service_id] = (
                _replicas(service),
                None if current is None else str(current["ID"]),
                None if current is None else _state(current),
                None if current is None else str(current.get("NodeID") or "") or None,
            )
        return _Poll(
            labels={
                str(s["ID"]): dict((s.get("Spec") or {}).get("Labels") or {}) for s in services
            },
            services=seen,
            live={str(t["ID"]) for t in tasks if _state(t) in _LIVE_STATES},
            exit_codes={str(t["ID"]): _exit_code(t) for t in tasks if _state(t) in _ENDED_STATES},
            nodes=node_states,
        )

    async def _watch_manager(self, poked: asyncio.Event) -> None:
        """Read the manager's service and node events, forever: each one cuts the
        poller's wait short. Read continuously (a stalled reader slows the engine);
        errors only mean a reconnect, the poller reports the engine's condition."""
        filters = json.dumps({"type": ["service", "node"]})
        failures = 0
        while True:
            try:
                async with self._client()._query(
                    "events",
                    "GET",
                    params={"filters": filters},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                ) as response:
                    failures = 0
                    try:
                        async for line in response.content:
                            if line.strip():
                                poked.set()
                    finally:
                        response.close()
            except (DockerError, aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(_RECONNECT.delay(failures) or 0.0)
            failures += 1

    # -- helpers ----------------------------------------------------------------------

    async def _service(self, unit_id: str) -> dict[str, Any]:
        service: dict[str, Any] = await self._get(
            f"services/{unit_id}", f"inspect service {unit_id}"
        )
        return service

    async def _service_with_tasks(
        self, unit_id: str
    ) -> tuple[dict[str, Any], builtins.list[dict[str, Any]]]:
        """The service and its tasks, read at once (two requests in flight)."""
        service, tasks = await asyncio.gather(self._service(unit_id), self._tasks([unit_id]))
        return service, tasks

    async def _services(self, labels: Mapping[str, str]) -> builtins.list[dict[str, Any]]:
        filters = json.dumps({"label": [f"{k}={v}" for k, v in sorted(labels.items())]})
        found: builtins.list[dict[str, Any]] = await self._get(
            "services", "list services", params={"filters": filters}
        )
        return found

    async def _services_and_tasks(
        self, labels: Mapping[str, str]
    ) -> tuple[builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
        """The services carrying ``labels`` and their tasks. A service removed
        between the two calls makes the manager refuse the task filter (404): then
        both are read again."""
        for _ in range(_UPDATE_ATTEMPTS - 1):
            services = await self._services(labels)
            if not services:
                return [], []
            try:
                return services, await self._tasks([str(s["ID"]) for s in services])
            except errors.ContainerNotFound:
                continue
        services = await self._services(labels)
        return services, (await self._tasks([str(s["ID"]) for s in services]) if services else [])

    async def _tasks(self, service_ids: Sequence[str]) -> builtins.list[dict[str, Any]]:
        filters = json.dumps({"service": list(service_ids)})
        found: builtins.list[dict[str, Any]] = await self._get(
            "tasks", "list tasks", params={"filters": filters}
        )
        return found

    async def _scale(
        self,
        unit_id: str,
        replicas: int,
        *,
        bump: bool = False,
        grace: float | None = None,
        service: dict[str, Any] | None = None,
    ) -> int:
        """Set the service's replicas (and bump ForceUpdate); its ForceUpdate after.
        ``service``: as just read (else it is read here). An update refused because
        another came first is retried on a fresh read."""
        for attempt in range(_UPDATE_ATTEMPTS):
            if service is None or attempt > 0:
                service = await self._service(unit_id)
            spec = service["Spec"]
            spec.setdefault("Mode", {}).setdefault("Replicated", {})["Replicas"] = replicas
            template = spec.setdefault("TaskTemplate", {})
            force = int(template.get("ForceUpdate") or 0) + (1 if bump else 0)
            template["ForceUpdate"] = force
            if grace is not None:
                template.setdefault("ContainerSpec", {})["StopGracePeriod"] = _nanos(grace)
            version = (service.get("Version") or {}).get("Index")
            try:
                with translated("update service", unit_id):
                    await self._client()._query_json(
                        f"services/{unit_id}/update",
                        "POST",
                        params={"version": str(version)},
                        data=json.dumps(spec),
                    )
            except errors.ContainerNotFound:
                raise
            except errors.ContainerError:
                if attempt + 1 == _UPDATE_ATTEMPTS:
                    raise
                continue
            return force
        raise AssertionError("unreachable")  # pragma: no cover

    async def _until_ended(self, unit_id: str, task_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            tasks = await self._tasks([unit_id])
            if not any(str(t["ID"]) == task_id and _state(t) in _LIVE_STATES for t in tasks):
                return
            await asyncio.sleep(TASK_POLL_INTERVAL)
        raise errors.StartupTimeout(
            f"service {unit_id[:12]}: its previous task {task_id[:12]} has not stopped"
        )

    async def _endpoint_of(self, task: Mapping[str, Any]) -> Endpoint | None:
        ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
        published = sorted({int(p["PublishedPort"]) for p in ports if p.get("PublishedPort")})
        if not published:
            return None
        address = await self._node_address(str(task.get("NodeID") or ""))
        if address is None:
            return None
        return Endpoint(address, published[0])

    async def _node_address(self, node_id: str) -> str | None:
        if not node_id:
            return None
        known = self._node_addresses.get(node_id)
        if known is not None:
            return known
        node = await self._get(f"nodes/{node_id}", f"inspect node {node_id}")
        address = _node_address(node)
        if address:
            self._node_addresses[node_id] = address
        return address

    async def _state_of(
        self, service: Mapping[str, Any], tasks: builtins.list[dict[str, Any]]
    ) -> ContainerState:
        spec = service.get("Spec") or {}
        container = (spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}
        current = _current(tasks, _force_update(service))
        status, running = _status(_replicas(service), current)
        exit_info = None
        endpoint = None
        started_at = None
        if current is not None:
            task_status = current.get("Status") or {}
            if _state(current) in _ENDED_STATES:
                exit_info = await self._exit_of(current)
            elif running:
                endpoint = await self._endpoint_of(current)
                started_at = str(task_status.get("Timestamp") or "") or None
        return ContainerState(
            id=str(service["ID"]),
            name=str(spec.get("Name", "")),
            image=str(container.get("Image", "")),
            labels=dict(spec.get("Labels") or {}),
            status=status,
            running=running,
            paused=False,
            health=SessionHealth.UNKNOWN,
            exit=exit_info,
            started_at=started_at,
            host_port=None if endpoint is None else endpoint.port,
            host_ip=None if endpoint is None else endpoint.host,
            env=tuple(container.get("Env") or ()),
        )

    async def _exit_of(self, task: Mapping[str, Any]) -> ExitInfo:
        """How an ended task ended: Swarm's exit code and error, completed from the
        node's own API where it is reachable (OOM flag, error, finish time)."""
        task_id = str(task["ID"])
        known = self._exits.get(task_id)
        if known is not None:
            return known
        status = task.get("Status") or {}
        container_status = status.get("ContainerStatus") or {}
        code = _exit_code(task)
        info = ExitInfo(
            exit_code=code,
            error=_task_error(task) if _state(task) in ("failed", "rejected", "orphaned") else "",
            finished_at=str(status.get("Timestamp") or "") or None,
        )
        if code in (None, 0):
            return info  # nothing more to learn (and a clean exit needs no note)
        node_info = await self._node_exit(task, str(container_status.get("ContainerID") or ""))
        if node_info is not None:
            info = ExitInfo(
                exit_code=code,
                oom_killed=node_info.oom_killed,
                error=node_info.error or (info.error if not node_info.oom_killed else ""),
                finished_at=node_info.finished_at or info.finished_at,
            )
            self._exits[task_id] = info
        elif code == _KILLED:
            note = (
                "killed (exit code 137); whether by the OOM killer is unknown: the node's "
                "Docker API is not reachable (docker.node_hosts)"
            )
            info = dataclasses.replace(info, error=f"{info.error}; {note}" if info.error else note)
        return info

    async def _node_exit(self, task: Mapping[str, Any], container_id: str) -> ExitInfo | None:
        node_id = str(task.get("NodeID") or "")
        address = self._node_addresses.get(node_id, "")
        host = self._node_hosts.get(node_id) or self._node_hosts.get(address)
        if not host or not container_id:
            return None
        runtime = self._node_runtimes.get(host)
        if runtime is None:
            runtime = self._node_runtimes[host] = DockerRuntime(host, connection_limit=4)
        try:
            async with asyncio.timeout(5.0):
                state = await runtime.inspect(container_id)
        except (errors.RoostError, TimeoutError) as exc:
            log.info("cannot read exit details of %s on node %s: %s", container_id[:12], host, exc)
            return None
        return state.exit


# -- pure helpers --------------------------------------------------------------------------


def _service_spec(spec: ContainerSpec, placement: tuple[str, ...]) -> dict[str, Any]:
    """The service for one agent (see the module docstring)."""
    container: dict[str, Any] = {
        "Image": spec.image,
        "Labels": dict(spec.labels),
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        # Swarm's default; ``sleep`` sets the agent's own grace when it stops it.
        "StopGracePeriod": _nanos(10.0),
    }
    if spec.command is not None:
        container["Args"] = list(spec.command)  # a container's Cmd; "Command" is its entrypoint
    if spec.user:
        container["User"] = spec.user
    if spec.read_only_rootfs:
        container["ReadOnly"] = True
    if spec.cap_drop:
        container["CapabilityDrop"] = list(spec.cap_drop)
    if spec.cap_add:
        container["CapabilityAdd"] = list(spec.cap_add)
    if spec.extra_hosts:
        # "name:ip" (a container's ExtraHosts) is "ip name" in a service.
        container["Hosts"] = [" ".join(reversed(h.split(":", 1))) for h in spec.extra_hosts]
    mounts = [_mount(bind) for bind in spec.binds]
    mounts += [{"Type": "tmpfs", "Target": path} for path in spec.tmpfs]
    if mounts:
        container["Mounts"] = mounts
    limits: dict[str, Any] = {}
    if spec.memory is not None:
        limits["MemoryBytes"] = spec.memory
    if spec.cpus is not None:
        limits["NanoCPUs"] = round(spec.cpus * 1e9)
    if spec.pids_limit is not None:
        limits["Pids"] = spec.pids_limit
    template: dict[str, Any] = {
        "ContainerSpec": container,
        "Resources": {"Limits": limits},
        # Roost restarts agents itself (backoff, max_restarts, the admin's alert).
        "RestartPolicy": {"Condition": "none"},
        "Placement": {"Constraints": list(placement)},
        "ForceUpdate": 0,
    }
    if spec.network:
        template["Networks"] = [{"Target": spec.network}]
    ports = []
    if spec.port is not None:
        port: dict[str, Any] = {"Protocol": "tcp", "TargetPort": spec.port, "PublishMode": "host"}
        if spec.host_port:
            port["PublishedPort"] = spec.host_port
        ports.append(port)
    return {
        "Name": _service_name(spec),
        "Labels": dict(spec.labels),
        "TaskTemplate": template,
        "Mode": {"Replicated": {"Replicas": 1}},
        # No IPVS needed: DNS round robin, and the port published on the task's node.
        "EndpointSpec": {"Mode": "dnsrr", "Ports": ports},
    }


def _service_name(spec: ContainerSpec) -> str:
    """The container's name when it fits a service name (63 characters), else a
    short one from the agent's name and a digest of the long one."""
    name = spec.name or f"roost-{spec.labels.get(AGENT, 'agent')}"
    if len(name) <= _NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    agent = spec.labels.get(AGENT, "agent")[: _NAME_LIMIT - 20]
    instance = spec.labels.get(INSTANCE, "")[:6]
    return f"roost-{agent}-{instance}{digest}"[:_NAME_LIMIT]


def _mount(bind: str) -> dict[str, Any]:
    """``volume:/path[:ro]`` or ``/host:/path[:ro]`` as a service mount (per node)."""
    parts = bind.split(":")
    source, target = parts[0], parts[1]
    mount: dict[str, Any] = {
        "Type": "bind" if source.startswith("/") else "volume",
        "Source": source,
        "Target": target,
    }
    if len(parts) > 2 and "ro" in parts[2].split(","):
        mount["ReadOnly"] = True
    return mount


def _nanos(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _replicas(service: Mapping[str, Any]) -> int:
    mode = (service.get("Spec") or {}).get("Mode") or {}
    return int((mode.get("Replicated") or {}).get("Replicas") or 0)


def _force_update(service: Mapping[str, Any]) -> int:
    return int(((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ForceUpdate") or 0)


def _spec_force(task: Mapping[str, Any]) -> int:
    return int((task.get("Spec") or {}).get("ForceUpdate") or 0)


def _image(service: Mapping[str, Any]) -> str:
    template = (service.get("Spec") or {}).get("TaskTemplate") or {}
    return str((template.get("ContainerSpec") or {}).get("Image", ""))


def _state(task: Mapping[str, Any]) -> str:
    return str((task.get("Status") or {}).get("State") or "")


def _exit_code(task: Mapping[str, Any]) -> int | None:
    """The exit code of an ended task's container; None when it never had one."""
    container = (task.get("Status") or {}).get("ContainerStatus") or {}
    code = container.get("ExitCode")
    return int(code) if code is not None and container.get("ContainerID") else None


def _task_error(task: Mapping[str, Any]) -> str:
    status = task.get("Status") or {}
    return str(status.get("Err") or status.get("Message") or _state(task))


def _current(tasks: Sequence[Mapping[str, Any]], force: int) -> Mapping[str, Any] | None:
    """The task that runs (or last ran) the agent: the newest of the service's
    current generation (its ForceUpdate: every wake bumps it). None when that
    generation has no task (yet, or any more: Swarm deletes the tasks of a service
    scaled to zero soon after they end)."""
    generation = [t for t in tasks if _spec_force(t) == force]
    if not generation:
        return None
    return max(generation, key=lambda t: _time_key(str(t.get("CreatedAt") or "")))


def _by_service(tasks: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        grouped.setdefault(str(task.get("ServiceID") or ""), []).append(task)
    return grouped


def _status(wanted: int, current: Mapping[str, Any] | None) -> tuple[str, bool]:
    """(Docker's word for the unit, whether it runs): replicas wanted against tasks present."""
    state = None if current is None else _state(current)
    if wanted >= 1 and state == "running":
        return "running", True
    if wanted >= 1 and (state is None or state in _LIVE_STATES):
        return "created", False
    return "exited", False


def _time_key(stamp: str) -> tuple[str, int]:
    """A sortable key for Docker's RFC 3339 times, whose fractions vary in length."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    digits = "".join(ch for ch in fraction if ch.isdigit())[:9]
    return whole, int(digits.ljust(9, "0")) if digits else 0


def _epoch(stamp: str) -> float:
    whole, nanos = _time_key(stamp)
    if not whole:
        return 0.0
    try:
        moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    except ValueError:
        return 0.0
    return moment.timestamp() + nanos / 1e9


def _node_address(node: Mapping[str, Any]) -> str | None:
    """Where Roost reaches a node: its ``Status.Addr`` (a manager's may read
    0.0.0.0: then its manager address, without the port)."""
    address = str((node.get("Status") or {}).get("Addr") or "")
    if address in ("", "0.0.0.0"):
        manager = str((node.get("ManagerStatus") or {}).get("Addr") or "")
        address = manager.rsplit(":", 1)[0] if manager else ""
    return address or None


def _diff(
    previous: _Poll | None, current: _Poll, reported: dict[str, set[str]]
) -> list[RuntimeEvent]:
    """Events between two polls (``previous`` None: the first, or the first after a
    gap). Level rules, each sent once per task: the current task ended while its
    service wants it (or it was seen live) → ``die``; its node is down while it
    should run → ``node_lost``. A service gone since the last poll → ``destroy``."""
    now = time.time()
    events: list[RuntimeEvent] = []
    for service_id, (wanted, task_id, state, node_id) in current.services.items():
        labels = current.labels[service_id]
        if task_id is None or state is None:
            continue
        sent = reported.setdefault(task_id, set())
        node_state = current.nodes.get(node_id or "", "unknown")
        if (
            state in _LIVE_STATES
            and wanted >= 1
            and node_id is not None
            and node_state in _NODE_DOWN
            and "node_lost" not in sent
        ):
            sent.add("node_lost")
            events.append(
                RuntimeEvent(
                    kind="node_lost",
                    container_id=service_id,
                    labels=labels,
                    time=now,
                    node=node_id,
                )
            )
        elif state in _ENDED_STATES and "die" not in sent:
            was_live = previous is not None and task_id in previous.live
            if wanted >= 1 or was_live:
                sent.add("die")
                events.append(
                    RuntimeEvent(
                        kind="die",
                        container_id=service_id,
                        labels=labels,
                        exit_code=current.exit_codes.get(task_id),
                        time=now,
                    )
                )
    if previous is not None:
        for service_id in previous.services.keys() - current.services.keys():
            events.append(
                RuntimeEvent(
                    kind="destroy",
                    container_id=service_id,
                    labels=previous.labels.get(service_id, {}),
                    time=now,
                )
            )
    # Forget tasks that are no longer listed (their services went).
    listed = {task for (_, task, _, _) in current.services.values() if task is not None}
    for task_id in list(reported):
        if task_id not in listed:
            del reported[task_id]
    return events


def _changed(previous: _Poll, current: _Poll) -> bool:
    return previous.services != current.services or previous.nodes != current.nodes


async def _either(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
