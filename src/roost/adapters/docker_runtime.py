"""``DockerRuntime``: the ``ContainerRuntime`` port over the Docker Engine API (aiodocker).

Role: the only place Roost speaks to Docker about containers, images, networks
and volumes. Every
aiodocker/aiohttp error is translated here by its HTTP status (never by its text):

- status 900 (aiodocker's "cannot connect"), connection errors, connect timeouts
  → ``DockerUnavailable``;
- 404 → ``ContainerNotFound`` (``stop``/``remove``/``remove_image`` of something
  gone are no-ops; ``create`` of an absent image → ``ImageUnavailable``);
- 409 on ``create`` with a name → ``Conflict`` (name taken); any other 409/500
  (pause a stopped container, kill an exited one, remove a running one without
  force) → ``ContainerError``: the container's state does not allow it.
  ``ContainerError.status`` carries Docker's HTTP status (a 4xx means the request
  itself was refused: retrying cannot help).
- A failed ``start`` of a container that publishes fixed host ports names them,
  and says which one is in use when the engine is local (checked by binding it,
  not by reading Docker's message).

Where Docker is (:func:`docker_address`) is decided here once, for the engine and
for the library's synchronous reachability check (:func:`check_reachable`):
the ``host`` given, else ``DOCKER_HOST``, else the first of ``/run/docker.sock``
and ``/var/run/docker.sock`` that exists.
- Every failed call translated here (but a 404, which answers "not there") is
  reported to the callables in ``API_ERROR_HOOKS`` with its status
  (``"unreachable"`` or Docker's HTTP status), so metrics can count them.

Invariants:
- ``ping`` asks on a new connection (over a socket or TCP): a stopping dockerd
  closes its listener first and then, for its whole shutdown (its containers'
  stop timeouts, ~10 s measured), keeps serving the connections already open,
  so an answer on a pooled connection would call a departing engine reachable.
- ``create`` never pulls; ``ensure_image`` pulls only an absent image, and
  concurrent calls for the same image share one pull.
- ``ensure_network`` calls for one name are serialised: Docker's
  ``CheckDuplicate`` does not stop concurrent creates from making several
  networks of one name. (Two processes racing can still do so.)
- ``events`` never stops reading Docker's stream: one reader task per
  subscription drains it into a bounded queue (on overflow the backlog is
  replaced by one ``gap``), reconnects with backoff from the last event seen, and
  queues a ``gap`` after every reconnect. A subscriber that stopped reading would
  slow every Docker API call (1.5 → 103 ms measured) and lose events.
- Every task this class starts (event readers, pulls) is named, tracked and
  cancelled and awaited by ``close``.

Docker facts this module relies on (dockerd 20.10, API 1.41):
- ``stop``/``start`` of a container already in that state answer 304 (no error);
  ``unpause`` of a container that is not paused answers 500, not 409.
- ``POST /commit`` *merges* the body's Env and Labels with the container's by key:
  a key can be overridden but not dropped. ``commit(env=...)`` therefore sets
  every key the container had and ``env`` omits to an empty value. Committing a
  running container pauses it, which emits ``pause`` and ``unpause`` events.
- A reconnect with ``since`` replays at most 256 buffered events.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import httpx
from aiodocker.exceptions import DockerError

from roost import errors
from roost.core.backoff import Backoff
from roost.core.records import ExitInfo, SessionHealth
from roost.ports.runtime import ContainerInfo, ContainerSpec, ContainerState, RuntimeEvent

__all__ = [
    "API_ERROR_HOOKS",
    "DockerRuntime",
    "check_reachable",
    "connect",
    "docker_address",
    "translated",
]

log = logging.getLogger(__name__)

#: Called with the status of every failed Docker API call (see the module docstring).
#: Process-wide: ``Engine`` adds its counter while it runs and removes it on stop.
API_ERROR_HOOKS: list[Callable[[str], None]] = []

#: aiodocker reports "cannot connect to the engine" as this pseudo-status.
_STATUS_UNREACHABLE = 900
#: Docker's zero time, used for FinishedAt of a container that never ran.
_ZERO_TIME = "0001-01-01T00:00:00Z"
#: Actor.Attributes keys that Docker adds to container events besides labels.
_NON_LABEL_ATTRIBUTES = frozenset(
    {"image", "name", "exitCode", "signal", "comment", "imageID", "imageRef", "execID"}
)
#: Events a slow subscriber may fall behind by before its backlog becomes one gap.
_EVENT_QUEUE_SIZE = 10_000
#: Reconnect delays for the events stream.
_RECONNECT = Backoff.doubling(0.05, 2.0)
#: Establishing the socket to the engine; waiting for a free pooled connection
#: is not bounded (callers bound their own operations).
_SOCKET_CONNECT_TIMEOUT = 10.0
_DEFAULT_SOCKETS = (Path("/run/docker.sock"), Path("/var/run/docker.sock"))

_HEALTH_BY_DOCKER_STATUS = {
    "healthy": SessionHealth.HEALTHY,
    "unhealthy": SessionHealth.UNHEALTHY,
    "starting": SessionHealth.STARTING,
}


class DockerRuntime:
    """``ContainerRuntime`` over a Docker Engine.

    ``host`` is a Docker address (``unix:///var/run/docker.sock``,
    ``tcp://host:2375``); None means ``DOCKER_HOST`` or the local socket, resolved
    at construction. The aiohttp session is created on first use (aiohttp needs a
    running loop) and released by ``close``.

    ``connection_limit`` sizes the connection pool deliberately instead of
    aiodocker's default of 100: Docker saturates at about 7 concurrent container
    starts on 2 cores, so more parallel API calls only queue inside dockerd, while
    long-lived requests hold a connection each for their whole life: one per
    ``events`` subscription and one per pending ``wait``. 32 leaves room for a few
    of those plus a start pool and inspections; raise it if you hold many waits.
    """

    def __init__(self, host: str | None = None, *, connection_limit: int = 32) -> None:
        if connection_limit < 1:
            raise ValueError("connection_limit must be at least 1")
        self._host = docker_address(host)
        self._connection_limit = connection_limit
        self._docker: aiodocker.Docker | None = None
        self._connector: aiohttp.BaseConnector | None = None
        #: for ``ping``: a client that opens a new connection per request (None:
        #: this address's scheme has no such connector here; the pooled one is used).
        self._fresh: aiodocker.Docker | None = None
        self._fresh_connector: aiohttp.BaseConnector | None = None
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._event_readers: set[asyncio.Task[None]] = set()
        #: one lock per network name: Docker's CheckDuplicate is best effort, and
        #: 4 concurrent creates of one name made 4 networks (dockerd 20.10).
        self._network_locks: dict[str, asyncio.Lock] = {}

    # -- client lifecycle -------------------------------------------------------

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker, self._connector = connect(self._host, self._connection_limit)
        return self._docker

    def _fresh_client(self) -> aiodocker.Docker:
        """A client whose every request opens (and then closes) its own connection."""
        if self._fresh is None:
            timeout = aiohttp.ClientTimeout(sock_connect=_SOCKET_CONNECT_TIMEOUT)
            connector: aiohttp.BaseConnector
            if self._host.startswith("unix://"):
                path = self._host.removeprefix("unix://")
                connector = aiohttp.UnixConnector(path=path, force_close=True)
                url = "unix://localhost"
            elif self._host.startswith(("tcp://", "http://")):
                connector = aiohttp.TCPConnector(force_close=True)
                url = "http://" + self._host.split("://", 1)[1]
            else:
                return self._client()
            self._fresh_connector = connector
            self._fresh = aiodocker.Docker(url=url, connector=connector, timeout=timeout)
        return self._fresh

    async def close(self) -> None:
        tasks = [*self._event_readers, *self._pulls.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._event_readers.clear()
        self._pulls.clear()
        docker, connector = self._docker, self._connector
        fresh, fresh_connector = self._fresh, self._fresh_connector
        self._docker = self._connector = self._fresh = self._fresh_connector = None
        # A client leaves a connector it was given open: close both.
        for client in (docker, fresh):
            if client is not None:
                await client.close()
        for owned in (connector, fresh_connector):
            if owned is not None:
                await owned.close()

    # -- engine and images ------------------------------------------------------

    async def ping(self) -> str:
        with _translated("ping the engine", self._host):
            version = await self._fresh_client().version()
        return str(version["ApiVersion"])

    async def image_exists(self, image: str) -> bool:
        try:
            with _translated("inspect image", image):
                await self._client().images.inspect(image)
        except errors.ContainerNotFound:
            return False
        return True

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        if await self.image_exists(image):
            return
        pull = self._pulls.get(image)
        if pull is None:
            pull = asyncio.create_task(
                self._pull(image, pull_timeout), name=f"roost.docker-pull[{image}]"
            )
            self._pulls[image] = pull
            pull.add_done_callback(lambda done: self._forget_pull(image, done))
        # Shielded: a cancelled caller must not abort the pull others wait on.
        await asyncio.shield(pull)

    def _forget_pull(self, image: str, pull: asyncio.Task[None]) -> None:
        if self._pulls.get(image) is pull:
            del self._pulls[image]
        if not pull.cancelled():
            pull.exception()  # retrieved here so a pull nobody awaits is not logged

    async def _pull(self, image: str, pull_timeout: float) -> None:
        try:
            async with asyncio.timeout(pull_timeout):
                await self._client().images.pull(image)
        except TimeoutError as exc:
            raise errors.ImageUnavailable(
                f"image {image!r} is not present and could not be pulled within {pull_timeout:g} s"
            ) from exc
        except DockerError as exc:
            if exc.status == _STATUS_UNREACHABLE:
                raise errors.DockerUnavailable(f"cannot pull {image!r}: {exc.message}") from exc
            raise errors.ImageUnavailable(
                f"image {image!r} is not present and could not be pulled: {exc.message}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise errors.DockerUnavailable(f"cannot pull {image!r}: {exc}") from exc

    async def remove_image(self, image: str) -> None:
        try:
            with _translated("remove image", image):
                await self._client().images.delete(image)
        except errors.ContainerNotFound:
            return

    async def image_size(self, image: str) -> int:
        with _translated("inspect image", image):
            data = await self._client().images.inspect(image)
        return int(data["Size"])

    # -- containers -------------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        with _translated("create container from", spec.image):
            try:
                container = await self._client().containers.create(
                    _create_config(spec), name=spec.name
                )
            except DockerError as exc:
                # 404: the image or something else the spec names (a network) is
                # missing; ask which instead of reading the message.
                if exc.status == 404 and not await self.image_exists(spec.image):
                    raise errors.ImageUnavailable(
                        f"image {spec.image!r} is not present (create never pulls; "
                        "call ensure_image first)"
                    ) from exc
                if exc.status == 409:
                    raise errors.Conflict(f"container name {spec.name!r} is already taken") from exc
                raise
        return str(container.id)

    async def start(self, container_id: str) -> None:
        try:
            await self._container(container_id).start()
        except DockerError as exc:
            # 500 covers both a taken port and, e.g., a missing executable: only a
            # container with fixed host ports gets them named.
            fixed = await self._fixed_host_ports(container_id) if exc.status == 500 else []
            if fixed:
                raise errors.ContainerError(
                    f"cannot start container {container_id[:12]}: "
                    f"{_port_problem(fixed, self._host)} (Docker: {exc.message})",
                    status=exc.status,
                ) from exc
            raise _translation(exc, "start container", container_id) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _translation(exc, "start container", container_id) from exc

    async def _fixed_host_ports(self, container_id: str) -> list[tuple[str, int]]:
        """The (host ip, host port) pairs the container asks for by number."""
        try:
            with _translated("inspect container", container_id):
                data = await self._container(container_id).show()
        except errors.RoostError:
            return []
        bindings = (data.get("HostConfig") or {}).get("PortBindings") or {}
        fixed = []
        for entries in bindings.values():
            for entry in entries or ():
                if entry.get("HostPort"):
                    fixed.append((str(entry.get("HostIp") or "0.0.0.0"), int(entry["HostPort"])))
        return fixed

    async def pause(self, container_id: str) -> None:
        with _translated("pause container", container_id):
            await self._container(container_id).pause()

    async def unpause(self, container_id: str) -> None:
        with _translated("unpause container", container_id):
            await self._container(container_id).unpause()

    async def stop(self, container_id: str, *, grace: float) -> None:
        # Docker's ``t`` is whole seconds; round up so the app gets at least
        # the grace period asked for.
        seconds = max(0, math.ceil(grace))
        try:
            with _translated("stop container", container_id):
                await self._container(container_id).stop(t=seconds)
        except errors.ContainerNotFound:
            return

    async def kill(self, container_id: str, *, signal: str = "SIGKILL") -> None:
        with _translated("kill container", container_id):
            await self._container(container_id).kill(signal=signal)

    async def remove(self, container_id: str, *, force: bool = True) -> None:
        try:
            with _translated("remove container", container_id):
                await self._container(container_id).delete(force=force, v=True)
        except errors.ContainerNotFound:
            return

    async def inspect(self, container_id: str) -> ContainerState:
        with _translated("inspect container", container_id):
            data = await self._container(container_id).show()
        return _container_state(data)

    async def wait(self, container_id: str) -> int:
        with _translated("wait for container", container_id):
            result = await self._container(container_id).wait()
        return int(result["StatusCode"])

    async def logs_tail(self, container_id: str, *, lines: int = 50) -> str:
        with _translated("read logs of container", container_id):
            chunks = await self._container(container_id).log(stdout=True, stderr=True, tail=lines)
        return "".join(chunks)

    async def logs(
        self,
        container_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        params: dict[str, Any] = {"tail": "all" if tail is None else str(tail)}
        if since is not None:
            params["since"] = str(int(since))
        if timestamps:
            params["timestamps"] = True
        container = self._container(container_id)
        with _translated("read logs of container", container_id):
            if not follow:
                for chunk in await container.log(stdout=True, stderr=True, **params):
                    yield chunk
                return
            stream = container.log(stdout=True, stderr=True, follow=True, **params)
            async for chunk in stream:
                yield chunk

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        with _translated("list containers labelled", _label_filters(labels)):
            containers = await self._client().containers.list(
                all=True, filters=json.dumps({"label": _label_filters(labels)})
            )
        return [_container_info(container) for container in containers]

    async def commit(
        self,
        container_id: str,
        *,
        repository: str,
        tag: str,
        labels: Mapping[str, str],
        env: tuple[str, ...] | None = None,
    ) -> str:
        config: dict[str, Any] = {"Labels": dict(labels)}
        if env is not None:
            current = await self.inspect(container_id)
            config["Env"] = _env_replacing(current.env, env)
        with _translated("commit container", container_id):
            result = await self._container(container_id).commit(
                repository=repository, tag=tag, config=config
            )
        return str(result["Id"])

    def _container(self, container_id: str) -> aiodocker.containers.DockerContainer:
        return self._client().containers.container(container_id)

    # -- networks and volumes ---------------------------------------------------

    async def ensure_network(
        self, name: str, *, labels: Mapping[str, str], isolated: bool = False
    ) -> str:
        lock = self._network_locks.setdefault(name, asyncio.Lock())
        async with lock:
            return await self._ensure_network(name, labels, isolated)

    async def _ensure_network(self, name: str, labels: Mapping[str, str], isolated: bool) -> str:
        existing = await self._network_id(name)
        if existing is not None:
            return existing
        config: dict[str, Any] = {
            "Name": name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Labels": dict(labels),
        }
        if isolated:
            # Docker drops traffic between two containers of this bridge (iptables).
            config["Options"] = {"com.docker.network.bridge.enable_icc": "false"}
        with _translated("create network", name):
            try:
                network = await self._client().networks.create(config)
            except DockerError as exc:
                if exc.status != 409:
                    raise
                network = None  # created by someone else between our look and create
        if network is not None:
            return str(network.id)
        found = await self._network_id(name)
        if found is None:
            raise errors.ContainerError(f"network {name!r} conflicted on create, then vanished")
        return found

    async def network_gateway(self, name: str) -> str | None:
        with _translated("inspect network", name):
            data = await (await self._client().networks.get(name)).show()
        for pool in (data.get("IPAM") or {}).get("Config") or ():
            gateway = (pool or {}).get("Gateway")
            if gateway and ":" not in gateway:  # IPv4 only
                return str(gateway)
            subnet = (pool or {}).get("Subnet")
            if not gateway and subnet and ":" not in subnet:
                # The default bridge lists no gateway: Docker then uses the subnet's
                # first host address (docker0's 172.17.0.1 unless --bip moved it).
                return str(next(ipaddress.ip_network(subnet, strict=False).hosts()))
        return None

    async def _network_id(self, name: str) -> str | None:
        try:
            with _translated("inspect network", name):
                network = await self._client().networks.get(name)
        except errors.ContainerNotFound:
            return None
        return str(network.id)

    async def ensure_volume(self, name: str, *, labels: Mapping[str, str]) -> str:
        # Docker's volume create is idempotent for a name: an existing volume is
        # returned as it is (its labels are not changed).
        # aiodocker's ``volumes.create`` is untyped; this is the same request.
        body = json.dumps({"Name": name, "Driver": "local", "Labels": dict(labels)})
        with _translated("create volume", name):
            volume = await self._client()._query_json("volumes/create", "POST", data=body)
        return str(volume["Name"])

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        try:
            with _translated("inspect volume", name):
                data = await self._client()._query_json(f"volumes/{name}")
        except errors.ContainerNotFound:
            return None
        return dict(data.get("Labels") or {})

    async def remove_network(self, name: str, *, labels: Mapping[str, str]) -> bool:
        try:
            with _translated("inspect network", name):
                data = await self._client()._query_json(f"networks/{name}")
        except errors.ContainerNotFound:
            return False
        if not _carries(data.get("Labels") or {}, labels):
            return False
        try:
            with _translated("remove network", name):
                async with self._client()._query(f"networks/{data['Id']}", "DELETE"):
                    pass
        except errors.ContainerNotFound:
            return False  # removed by someone else meanwhile
        return True

    async def remove_volume(self, name: str, *, labels: Mapping[str, str]) -> bool:
        try:
            with _translated("inspect volume", name):
                data = await self._client()._query_json(f"volumes/{name}")
        except errors.ContainerNotFound:
            return False
        if not _carries(data.get("Labels") or {}, labels):
            return False
        try:
            with _translated("remove volume", name):
                async with self._client()._query(f"volumes/{name}", "DELETE"):
                    pass
        except errors.ContainerNotFound:
            return False
        return True

    # -- events -----------------------------------------------------------------

    def events(
        self, labels: Mapping[str, str], *, kinds: Collection[str] | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        # The subscription starts now, not at the first ``__anext__``: the reader
        # asks Docker for events ``since`` this moment, so nothing that happens
        # between this call and the first iteration is lost.
        filters: dict[str, Sequence[str]] = {
            "type": ["container"],
            "label": _label_filters(labels),
        }
        if kinds is not None:
            # Docker leaves the others out (matching "health_status" by prefix, as its
            # Action carries the status after a colon): none is read nor parsed here.
            filters["event"] = sorted(kinds)
        return self._event_stream(dict(labels), filters, since=time.time())

    async def _event_stream(
        self, labels: dict[str, str], filters: Mapping[str, Sequence[str]], *, since: float
    ) -> AsyncIterator[RuntimeEvent]:
        queue: asyncio.Queue[RuntimeEvent | BaseException] = asyncio.Queue(_EVENT_QUEUE_SIZE)
        reader = asyncio.create_task(
            self._read_events(filters, since, queue),
            name=f"roost.docker-events[{','.join(_label_filters(labels))}]",
        )
        self._event_readers.add(reader)
        reader.add_done_callback(lambda done: _report_reader_end(done, queue))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise errors.ContainerError("the Docker events reader failed") from item
                yield item
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            self._event_readers.discard(reader)

    @contextlib.asynccontextmanager
    async def _open_event_stream(
        self, filters: Mapping[str, Sequence[str]], since: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One ``GET /events`` stream, closed on exit.

        aiodocker's ``docker.events`` is one shared channel per client without
        per-subscriber filters, so this uses its request helper directly. That
        helper does not release the response, and an events body never ends on
        its own: without the ``close`` the connection would leak."""
        async with self._client()._query(
            "events",
            "GET",
            params={"filters": json.dumps(filters), "since": since},
            timeout=aiohttp.ClientTimeout(sock_connect=_SOCKET_CONNECT_TIMEOUT),
        ) as response:
            try:
                yield response
            finally:
                response.close()

    async def _read_events(
        self,
        filters: Mapping[str, Sequence[str]],
        since: float,
        queue: asyncio.Queue[RuntimeEvent | BaseException],
    ) -> None:
        cursor = _EventCursor(since_nano=int(since * 1e9))
        failures = 0
        reconnecting = False
        while True:
            try:
                async with self._open_event_stream(filters, cursor.since()) as response:
                    if reconnecting:
                        if failures > 1:
                            log.info("Docker events stream is back")
                        _offer(queue, RuntimeEvent(kind="gap", time=time.time()))
                    failures = 0
                    async for line in response.content:
                        if not line.strip():
                            continue
                        data = json.loads(line)
                        if cursor.is_new(_time_nano(data), line):
                            _offer(queue, _runtime_event(data))
                detail = "Docker closed the events stream"
            except (DockerError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                detail = f"Docker events stream failed ({exc!r})"
            if failures == 0:
                # Once per loss, not once per attempt: an outage is one line in the log.
                log.warning("%s; reconnecting", detail)
                _offer(queue, RuntimeEvent(kind="lost", time=time.time()))
            reconnecting = True
            await asyncio.sleep(_RECONNECT.delay(failures) or 0.0)
            failures += 1


class _EventCursor:
    """Where to resume the events stream, and which events were already seen.

    Docker's ``since`` is inclusive, so a reconnect replays the events that share
    the last timestamp; they are recognised by their raw line and skipped.
    """

    def __init__(self, *, since_nano: int) -> None:
        self._last_nano = since_nano
        self._seen_at_last: set[bytes] = set()

    def since(self) -> str:
        seconds, nanos = divmod(self._last_nano, 1_000_000_000)
        return f"{seconds}.{nanos:09d}"

    def is_new(self, nano: int, line: bytes) -> bool:
        key = line.strip()
        if nano < self._last_nano or (nano == self._last_nano and key in self._seen_at_last):
            return False
        if nano > self._last_nano:
            self._last_nano = nano
            self._seen_at_last.clear()
        self._seen_at_last.add(key)
        return True


def _offer(queue: asyncio.Queue[RuntimeEvent | BaseException], event: RuntimeEvent) -> None:
    """Queue without ever blocking the reader. A full queue means the consumer is
    far behind: its backlog is worth less than a re-list, so it becomes one gap."""
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(RuntimeEvent(kind="gap", time=event.time))


def _report_reader_end(
    reader: asyncio.Task[None], queue: asyncio.Queue[RuntimeEvent | BaseException]
) -> None:
    """The reader only ends by cancellation; a crash is passed to the consumer."""
    if reader.cancelled():
        return
    failure = reader.exception() or RuntimeError("the events reader stopped")
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(failure)


def connect(
    host: str, connection_limit: int
) -> tuple[aiodocker.Docker, aiohttp.BaseConnector | None]:
    """An aiodocker client for the Docker address ``host`` with a pool of
    ``connection_limit`` connections, and its connector (the caller closes both).
    Shared with the other Docker adapters (``swarm_backend``)."""
    timeout = aiohttp.ClientTimeout(sock_connect=_SOCKET_CONNECT_TIMEOUT)
    connector: aiohttp.BaseConnector | None
    if host.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=host.removeprefix("unix://"), limit=connection_limit)
        url = "unix://localhost"  # aiodocker's placeholder host for sockets
    elif host.startswith(("tcp://", "http://")):
        connector = aiohttp.TCPConnector(limit=connection_limit)
        url = "http://" + host.split("://", 1)[1]
    else:
        # ssh://, npipe://, https:// with TLS: aiodocker's own connector.
        connector = None
        url = host
    return aiodocker.Docker(url=url, connector=connector, timeout=timeout), connector


# -- translation helpers ---------------------------------------------------------


@contextlib.contextmanager
def _translated(action: str, target: object) -> Iterator[None]:
    """Map aiodocker/aiohttp errors to Roost's by meaning (status), with ``from``."""
    try:
        yield
    except (DockerError, aiohttp.ClientError, TimeoutError) as exc:
        translated = _translation(exc, action, target)
        if isinstance(translated, errors.DockerUnavailable):
            _report_api_error("unreachable")
        elif isinstance(translated, errors.ContainerError):  # (a 404 answers "not there")
            _report_api_error(str(translated.status or "client_error"))
        raise translated from exc


#: The translation, for the other Docker adapters (``swarm_backend``): one mapping.
translated = _translated


def _report_api_error(status: str) -> None:
    for hook in API_ERROR_HOOKS:
        try:
            hook(status)
        except Exception:
            log.exception("Docker API error hook failed")


def _translation(exc: Exception, action: str, target: object) -> errors.RoostError:
    """Roost's error for an aiodocker/aiohttp error: by Docker's status, never its text."""
    if isinstance(exc, DockerError):
        message = f"cannot {action} {target}: {exc.message}"
        if exc.status == _STATUS_UNREACHABLE:
            return errors.DockerUnavailable(message)
        if exc.status == 404:
            return errors.ContainerNotFound(message)
        return errors.ContainerError(message, status=exc.status)
    if isinstance(exc, aiohttp.ClientConnectionError | TimeoutError):
        return errors.DockerUnavailable(f"cannot {action} {target}: {exc!r}")
    return errors.ContainerError(f"cannot {action} {target}: {exc!r}")


def docker_address(host: str | None = None) -> str:
    """Where Docker is: ``host``, else ``DOCKER_HOST``, else the first local socket
    that exists (``/run/docker.sock``, ``/var/run/docker.sock``; the last when none
    does, so errors name the usual place)."""
    if host:
        return host
    from_environment = os.environ.get("DOCKER_HOST")
    if from_environment:
        return from_environment
    for socket_path in _DEFAULT_SOCKETS:
        if socket_path.is_socket():
            return f"unix://{socket_path}"
    return f"unix://{_DEFAULT_SOCKETS[-1]}"


def check_reachable(host: str | None = None, *, timeout: float = 5.0) -> str:
    """Synchronous ``GET /_ping`` of the engine at :func:`docker_address`; return
    that address, or raise ``DockerUnavailable`` naming it.

    For callers that must fail before any event loop exists (the library's
    constructors, like the code they replace). Addresses other than ``unix://``,
    ``tcp://`` and ``http://`` (ssh, TLS) are not checked here: the engine's first
    call reports them."""
    address = docker_address(host)
    try:
        if address.startswith("unix://"):
            path = address.removeprefix("unix://")
            if not os.path.exists(path):
                # Checked first: httpcore leaks the socket of a failed unix connect.
                raise FileNotFoundError(f"no socket at {path}")
            transport = httpx.HTTPTransport(uds=path)
            with httpx.Client(transport=transport, timeout=timeout) as client:
                client.get("http://docker/_ping").raise_for_status()
        elif address.startswith(("tcp://", "http://")):
            base = "http://" + address.split("://", 1)[1]
            with httpx.Client(timeout=timeout) as client:
                client.get(base.rstrip("/") + "/_ping").raise_for_status()
    except (httpx.HTTPError, OSError) as exc:
        raise errors.DockerUnavailable(
            f"Docker is not reachable at {address}: {exc} (is dockerd running?)"
        ) from exc
    return address


def _carries(found: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(found.get(key) == value for key, value in wanted.items())


def _port_problem(fixed: Sequence[tuple[str, int]], address: str) -> str:
    """Name the fixed host ports a failed start asked for, and which one is in use
    when that can be known: only for a local engine, by trying to bind it."""
    named = ", ".join(f"{ip}:{port}" for ip, port in fixed)
    if address.startswith("unix://"):
        for ip, port in fixed:
            if _in_use(ip, port):
                return f"host port {ip}:{port} is already in use"
    return f"could not publish host port {named}"


def _in_use(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _label_filters(labels: Mapping[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in sorted(labels.items())]


def _create_config(spec: ContainerSpec) -> dict[str, Any]:
    host_config: dict[str, Any] = {}
    config: dict[str, Any] = {
        "Image": spec.image,
        "Labels": dict(spec.labels),
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "HostConfig": host_config,
    }
    if spec.command is not None:
        config["Cmd"] = list(spec.command)
    if spec.port is not None:
        port_key = f"{spec.port}/tcp"
        config["ExposedPorts"] = {port_key: {}}
        # Empty HostPort: Docker picks a free ephemeral port at start.
        host_port = str(spec.host_port) if spec.host_port else ""
        host_config["PortBindings"] = {
            port_key: [{"HostIp": spec.publish_host, "HostPort": host_port}]
        }
    if spec.network is not None:
        host_config["NetworkMode"] = spec.network
    if spec.memory is not None:
        host_config["Memory"] = spec.memory
        host_config["MemorySwap"] = spec.memory if spec.memory_swap is None else spec.memory_swap
    elif spec.memory_swap is not None:
        host_config["MemorySwap"] = spec.memory_swap
    if spec.cpus is not None:
        host_config["NanoCpus"] = round(spec.cpus * 1e9)
    if spec.pids_limit is not None:
        host_config["PidsLimit"] = spec.pids_limit
    if spec.no_new_privileges:
        host_config["SecurityOpt"] = ["no-new-privileges"]
    if spec.binds:
        host_config["Binds"] = list(spec.binds)
    if spec.extra_hosts:
        host_config["ExtraHosts"] = list(spec.extra_hosts)
    if spec.cap_drop:
        host_config["CapDrop"] = list(spec.cap_drop)
    if spec.cap_add:
        host_config["CapAdd"] = list(spec.cap_add)
    if spec.read_only_rootfs:
        host_config["ReadonlyRootfs"] = True
    if spec.tmpfs:
        host_config["Tmpfs"] = {path: "rw,nosuid,nodev,size=64m" for path in spec.tmpfs}
    if spec.user:
        config["User"] = spec.user
    host_config["CgroupnsMode"] = "private" if spec.private_cgroupns else "host"
    return config


def _env_replacing(current: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    """Env for a commit body so the image ends up with ``wanted``: Docker keeps
    every key of the container's Env that the body omits, so those are blanked."""
    wanted_keys = {entry.split("=", 1)[0] for entry in wanted}
    blanked = [
        f"{key}="
        for key in dict.fromkeys(e.split("=", 1)[0] for e in current)
        if key not in wanted_keys
    ]
    return [*wanted, *blanked]


def _container_state(data: Mapping[str, Any]) -> ContainerState:
    state = data.get("State") or {}
    config = data.get("Config") or {}
    network = data.get("NetworkSettings") or {}
    status = str(state.get("Status", ""))
    running = bool(state.get("Running", False))
    health_status = (state.get("Health") or {}).get("Status")
    exit_info = None
    if not running and status != "created":
        exit_info = ExitInfo(
            exit_code=int(state.get("ExitCode", 0)),
            oom_killed=bool(state.get("OOMKilled", False)),
            error=str(state.get("Error") or ""),
            finished_at=_docker_time(state.get("FinishedAt")),
        )
    host_ip, host_port = _first_published_port(network.get("Ports") or {})
    ip_address = None
    for settings in (network.get("Networks") or {}).values():
        ip_address = (settings or {}).get("IPAddress") or None
        break
    return ContainerState(
        id=str(data["Id"]),
        name=str(data.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        labels=dict(config.get("Labels") or {}),
        status=status,
        running=running,
        paused=bool(state.get("Paused", False)),
        health=_HEALTH_BY_DOCKER_STATUS.get(str(health_status), SessionHealth.UNKNOWN),
        exit=exit_info,
        started_at=_docker_time(state.get("StartedAt")),
        host_port=host_port,
        host_ip=host_ip,
        ip_address=ip_address,
        env=tuple(config.get("Env") or ()),
    )


def _first_published_port(ports: Mapping[str, Any]) -> tuple[str | None, int | None]:
    for bindings in ports.values():
        for binding in bindings or ():
            if binding.get("HostPort"):
                return binding.get("HostIp") or None, int(binding["HostPort"])
    return None, None


def _docker_time(value: object) -> str | None:
    if not value or value == _ZERO_TIME:
        return None
    return str(value)


def _container_info(row: aiodocker.containers.DockerContainer) -> ContainerInfo:
    """One row of ``GET /containers/json``, which aiodocker wraps (``row[key]`` reads it)."""
    return ContainerInfo(
        id=str(row.id),
        name=str((_field(row, "Names", None) or [""])[0]).lstrip("/"),
        image=str(_field(row, "Image", "")),
        labels=dict(_field(row, "Labels", None) or {}),
        status=str(_field(row, "State", "")),
        created_at=float(_field(row, "Created", 0)),
    )


def _field(row: aiodocker.containers.DockerContainer, key: str, default: Any) -> Any:
    try:
        return row[key]
    except KeyError:
        return default


def _runtime_event(data: Mapping[str, Any]) -> RuntimeEvent:
    actor = data.get("Actor") or {}
    attributes: Mapping[str, str] = actor.get("Attributes") or {}
    # "health_status: healthy", "exec_start: sh" → the part before the colon.
    kind, _, detail = str(data.get("Action", "")).partition(":")
    kind = kind.strip()
    exit_code = attributes.get("exitCode")
    return RuntimeEvent(
        kind=kind,
        container_id=str(actor.get("ID") or data.get("id") or ""),
        labels={k: v for k, v in attributes.items() if k not in _NON_LABEL_ATTRIBUTES},
        exit_code=int(exit_code) if exit_code is not None else None,
        health=_HEALTH_BY_DOCKER_STATUS.get(detail.strip()) if kind == "health_status" else None,
        time=_time_nano(data) / 1e9,
    )


def _time_nano(data: Mapping[str, Any]) -> int:
    """An event's time in integer nanoseconds (floats lose ~256 ns at this scale)."""
    if data.get("timeNano") is not None:
        return int(data["timeNano"])
    return int(data.get("time", 0)) * 1_000_000_000
