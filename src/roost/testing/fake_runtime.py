"""``FakeRuntime``: an in-memory ``ContainerRuntime`` that behaves like Docker.

Role: lets the reactor, the edge (proxy) and the API be tested without a Docker Engine. It
passes the same contract suite (tests/contract) as ``DockerRuntime``, so what
holds against the fake holds against Docker.

Invariants (each mirrors dockerd 20.10, as measured for the Docker adapter):
- Statuses are Docker's: ``created``, ``running``, ``paused``, ``exited``; a
  paused container is still ``running`` in ``inspect``. ``exit`` is None while
  running or never started.
- Errors are Docker's, translated as ``DockerRuntime`` translates them:
  ``ContainerNotFound`` for an unknown id; ``stop``/``remove`` of a gone
  container and ``stop`` of a stopped one are no-ops; ``start`` of a running one
  is a no-op; pausing, killing or unpausing a container in the wrong state and
  removing a running one without ``force`` raise ``ContainerError``; ``create``
  with a taken name raises ``Conflict`` and with an absent image
  ``ImageUnavailable``. ``ensure_image`` pulls only images in ``pullable``.
- Events are the ones Docker emits, in Docker's order, for each operation:
  create; start; pause; unpause; stop → kill, die, stop (a paused one: kill,
  unpause, die, stop); kill → kill, die; force remove of a running one → kill,
  die, destroy; OOM → oom, die; commit of a running container → pause, commit,
  unpause (Docker pauses it to commit). ``emit_gap`` queues a ``gap`` as after a
  reconnect.
- Processes are not run: ``command`` is stored, never executed. Tests make a
  container exit with ``crash`` and give it output with ``log_lines``. A test
  that needs a real app behind a container runs it on the host and names its
  port in ``endpoints[image]``: containers of that image then publish that
  port (as Docker publishes a fixed ``HostPort``) instead of a counted one, and
  have no address of their own (the real app is only behind that port). Other
  containers get an own address from the IPv6 documentation prefix
  (``2001:db8::/32``, never routed: a real client never reaches anything there),
  at which ``answering`` finds them on their container port, as a client on
  Docker's host reaches a container on a bridge network. Any
  terminating signal ends the process with 128 + signal number; ``stop`` ends it
  with ``stop_exit_code`` (an app that handles SIGTERM, 0 by default).
- Like Docker, ``commit`` merges Env and Labels with the container's by key:
  ``env`` replaces values, and keys it omits are kept with an empty value.
- Networks ``bridge``, ``host`` and ``none`` exist from the start;
  ``ensure_network``/``ensure_volume`` create a labelled one only when the name
  is absent and leave an existing one as it is (``networks``/``volumes`` hold
  their labels for assertions, ``isolated_networks`` the names created with
  inter-container traffic off). Every bridge network's gateway is ``gateway``
  (loopback by default, so a test's agent listener binds where it can).
  ``remove_network``/``remove_volume`` remove only one carrying the labels asked
  for, and refuse (``ContainerError``) while a running container uses the
  network or any container mounts the volume, or for a predefined network.
- A spec's ``host_port`` is published as given; starting a second container on
  a host port a running one holds fails (``ContainerError`` naming the port,
  status 500) and leaves it ``created``. Ports bound by other processes are not
  seen: the fake has no host.
- Images have no HEALTHCHECK of their own: ``inspect`` reports ``health``
  unknown until a test calls ``report_health``, which also emits Docker's
  ``health_status`` event.
- An engine that is stopping (``begin_stopping``, as dockerd after SIGTERM) no
  longer accepts connections, which ``ping`` always opens anew, so ``ping``
  raises ``DockerUnavailable``; calls on connections already open still answer
  and events still flow, but ``start`` fails (500: dockerd refuses new sandboxes
  then). ``go_down`` ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import itertools
import secrets
import signal as signals
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping

from roost import errors
from roost.core.records import ExitInfo, SessionHealth
from roost.ports.runtime import ContainerInfo, ContainerSpec, ContainerState, RuntimeEvent

__all__ = ["FakeRuntime"]

_API_VERSION = "1.41"
_FIRST_HOST_PORT = 32768
#: Signals whose default action does not end a process.
_NON_TERMINATING_SIGNALS = frozenset({"SIGCHLD", "SIGCONT", "SIGURG", "SIGWINCH"})
_DEFAULT_IMAGE_SIZE = 2 * 1024 * 1024
_PREDEFINED_NETWORKS = ("bridge", "host", "none")


@dataclasses.dataclass(slots=True)
class _FakeImage:
    id: str
    env: tuple[str, ...] = ()
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    size: int = _DEFAULT_IMAGE_SIZE


@dataclasses.dataclass(slots=True)
class _FakeContainer:
    id: str
    name: str
    spec: ContainerSpec
    labels: dict[str, str]
    env: tuple[str, ...]
    created_at: float
    status: str = "created"
    exit_code: int = 0
    oom_killed: bool = False
    started_at: str | None = None
    finished_at: str | None = None
    host_port: int | None = None
    ip_address: str | None = None
    health: SessionHealth = SessionHealth.UNKNOWN
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: set when the container printed something (log followers wake).
    output: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.status in ("running", "paused")


@dataclasses.dataclass(slots=True)
class _Subscriber:
    labels: dict[str, str]
    #: None: every kind.
    kinds: frozenset[str] | None = None
    queue: asyncio.Queue[RuntimeEvent] = dataclasses.field(default_factory=asyncio.Queue)


class FakeRuntime:
    """In-memory ``ContainerRuntime``. See the module docstring for what it mirrors.

    Test hooks: ``images`` (present images), ``pullable`` (what ``ensure_image``
    can fetch), ``endpoints[image]`` (the host port its containers publish),
    ``log_lines[container_id]``, ``stop_exit_code``, ``crash(...)``,
    ``report_health(...)``, ``emit_gap()``, ``begin_stopping()``, ``go_down()`` /
    ``come_back()`` (an engine outage), and ``calls`` — every operation as
    ``(method, container id or image)`` in call order.
    """

    def __init__(
        self,
        *,
        images: Iterable[str] = (),
        pullable: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.images: set[str] = set(images)
        self.pullable: set[str] = set(pullable)
        self.log_lines: dict[str, list[str]] = {}
        #: image (as the spec names it) → host port its containers publish.
        self.endpoints: dict[str, int] = {}
        self.stop_exit_code = 0
        self.calls: list[tuple[str, str]] = []
        self.closed = False
        self._clock = clock
        self._containers: dict[str, _FakeContainer] = {}
        self._image_meta: dict[str, _FakeImage] = {}
        self._subscribers: list[_Subscriber] = []
        self._host_ports = itertools.count(_FIRST_HOST_PORT)
        #: network name → (id, labels); volume name → labels.
        self.networks: dict[str, tuple[str, dict[str, str]]] = {
            name: (secrets.token_hex(32), {}) for name in _PREDEFINED_NETWORKS
        }
        self.volumes: dict[str, dict[str, str]] = {}
        self.isolated_networks: set[str] = set()
        #: the gateway address of every bridge network (``network_gateway``).
        self.gateway = "127.0.0.1"
        self._addresses = itertools.count()
        #: the engine is unreachable: every call raises DockerUnavailable.
        self.down = False
        #: the engine is shutting down: new connections (``ping``) are refused.
        self.stopping = False

    # -- test hooks --------------------------------------------------------------

    def crash(self, container_id: str, exit_code: int = 1, *, oom: bool = False) -> None:
        """Make a running (or paused) container exit on its own, as Docker reports
        it: ``oom`` (when ``oom``) then ``die`` with ``exit_code``."""
        container = self._get(container_id)
        if not container.running:
            raise errors.ContainerError(f"container {container_id} is not running")
        if oom:
            self._emit("oom", container)
        self._exit(container, exit_code, oom_killed=oom)

    def report_health(self, container_id: str, health: SessionHealth) -> None:
        """Give a running container the verdict its image's HEALTHCHECK would, and
        emit Docker's ``health_status`` event when it changes."""
        container = self._get(container_id)
        if not container.running:
            raise errors.ContainerError(f"container {container_id} is not running")
        if container.health is health:
            return  # Docker reports a change, not every check
        container.health = health
        self._emit("health_status", container, health=health)

    def emit_gap(self) -> None:
        """Queue a ``gap`` for every subscriber, as after an events reconnect."""
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(RuntimeEvent(kind="gap", time=self._clock()))

    def begin_stopping(self) -> None:
        """The engine begins to stop (see the module docstring): ``ping`` raises, other
        calls answer, ``start`` fails with 500; the containers are still running."""
        self.stopping = True

    def go_down(
        self, *, kill_containers: bool = False, exit_code: int = 143, unseen: bool = False
    ) -> None:
        """The engine stops: with ``kill_containers`` (a daemon stop without
        live-restore) its running containers exit first, reported as ``die`` like
        the real daemon does before it closes (``unseen``: not reported, as when
        they end after its event stream broke); then the event stream is ``lost``
        and every call raises ``DockerUnavailable`` until ``come_back``."""
        if unseen:
            for subscriber in self._subscribers:
                subscriber.queue.put_nowait(RuntimeEvent(kind="lost", time=self._clock()))
        if kill_containers:
            for container in list(self._containers.values()):
                if container.running:
                    self._exit(container, exit_code, report=not unseen)
        self.down = True
        self.stopping = False
        if not unseen:
            for subscriber in self._subscribers:
                subscriber.queue.put_nowait(RuntimeEvent(kind="lost", time=self._clock()))

    def come_back(self) -> None:
        """The engine answers again: the event stream reconnects (``gap``)."""
        self.down = False
        self.emit_gap()

    def serves(self, port: int) -> bool:
        """Whether a running, unpaused container publishes ``port`` — what a client
        of the agent sees, whether or not the engine's API answers."""
        return any(c.status == "running" and c.host_port == port for c in self._containers.values())

    def answering(self, host: str | None, port: int) -> int | None:
        """The published port of the running, unpaused container a client reaches at
        ``host:port``: one publishing ``port``, or one whose own address is ``host``
        and whose container port is ``port``. None when nobody answers there."""
        for c in self._containers.values():
            if c.status != "running" or c.host_port is None:
                continue
            if c.host_port == port and (host is None or c.ip_address != host):
                return c.host_port
            if c.ip_address is not None and c.ip_address == host and c.spec.port == port:
                return c.host_port
        return None

    def container_spec(self, container_id: str) -> ContainerSpec:
        """The spec a container was created from (for assertions on limits)."""
        return self._get(container_id).spec

    # -- engine and images ---------------------------------------------------------

    async def ping(self) -> str:
        self._record("ping", "")
        if self.stopping:
            raise errors.DockerUnavailable(
                "Cannot connect to the Docker daemon (the fake engine is stopping)"
            )
        return _API_VERSION

    async def image_exists(self, image: str) -> bool:
        self._record("image_exists", image)
        return self._find_image(image) is not None

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        self._record("ensure_image", image)
        if self._find_image(image) is not None:
            return
        if _normalized(image) not in {_normalized(name) for name in self.pullable}:
            raise errors.ImageUnavailable(
                f"image {image!r} is not present and could not be pulled: "
                "not found in any reachable registry"
            )
        self.images.add(image)

    async def remove_image(self, image: str) -> None:
        self._record("remove_image", image)
        name = self._find_image(image)
        if name is None:
            return
        users = [c.id for c in self._containers.values() if _normalized(c.spec.image) == name]
        if users:
            raise errors.ContainerError(
                f"cannot remove image {image}: in use by container {users[0][:12]}", status=409
            )
        self.images = {i for i in self.images if _normalized(i) != name}
        self._image_meta.pop(name, None)

    async def image_size(self, image: str) -> int:
        self._record("image_size", image)
        name = self._find_image(image)
        if name is None:
            raise errors.ContainerNotFound(f"cannot inspect image {image}: No such image")
        return self._meta(name).size

    # -- containers ------------------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        image = self._find_image(spec.image)
        if image is None:
            self._record("create", "")
            raise errors.ImageUnavailable(
                f"image {spec.image!r} is not present (create never pulls; call ensure_image first)"
            )
        container_id = secrets.token_hex(32)
        name = spec.name or f"fake_{container_id[:12]}"
        if any(c.name == name for c in self._containers.values()):
            self._record("create", "")
            raise errors.Conflict(f"container name {spec.name!r} is already taken")
        meta = self._meta(image)
        container = _FakeContainer(
            id=container_id,
            name=name,
            spec=spec,
            labels={**meta.labels, **spec.labels},
            env=_merged_env(meta.env, [f"{k}={v}" for k, v in spec.env.items()]),
            created_at=self._clock(),
        )
        self._containers[container_id] = container
        self._record("create", container_id)
        self._emit("create", container)
        return container_id

    async def start(self, container_id: str) -> None:
        self._record("start", container_id)
        container = self._get(container_id)
        if container.status == "running":
            return  # Docker answers 304
        if self.stopping:
            raise errors.ContainerError(
                f"cannot start container {container_id}: failed to update the store "
                "state of sandbox (the fake engine is stopping)",
                status=500,
            )
        if container.status == "paused":
            raise errors.ContainerError(
                f"cannot start container {container_id}: "
                "cannot start a paused container, try unpause instead",
                status=409,
            )
        if container.spec.port is not None and container.spec.host_port:
            self._claim_host_port(container)
        container.status = "running"
        container.exit_code = 0
        container.oom_killed = False
        container.started_at = self._timestamp()
        container.finished_at = None
        container.health = SessionHealth.UNKNOWN
        container.exited = asyncio.Event()
        if container.spec.port is not None:
            container.host_port = (
                container.spec.host_port
                or self.endpoints.get(container.spec.image)
                or next(self._host_ports)
            )
        endpoint = container.spec.image in self.endpoints
        if container.spec.network not in ("host", "none") and not endpoint:
            container.ip_address = f"2001:db8::{next(self._addresses) + 2:x}"
        self._emit("start", container)

    async def pause(self, container_id: str) -> None:
        self._record("pause", container_id)
        container = self._get(container_id)
        if container.status == "paused":
            raise errors.ContainerError(f"container {container_id} is already paused", status=409)
        if container.status != "running":
            raise errors.ContainerError(f"container {container_id} is not running", status=409)
        container.status = "paused"
        self._emit("pause", container)

    async def unpause(self, container_id: str) -> None:
        self._record("unpause", container_id)
        container = self._get(container_id)
        if container.status != "paused":
            # Docker answers 500 here, not 409 (measured on dockerd 20.10).
            raise errors.ContainerError(f"container {container_id} is not paused", status=500)
        container.status = "running"
        self._emit("unpause", container)

    async def stop(self, container_id: str, *, grace: float) -> None:
        self._record("stop", container_id)
        container = self._containers.get(container_id)
        if container is None or not container.running:
            return  # gone: no-op; not running: Docker answers 304
        self._emit("kill", container, signal=str(int(signals.SIGTERM)))
        if container.status == "paused":
            container.status = "running"
            self._emit("unpause", container)
        self._exit(container, self.stop_exit_code)
        self._emit("stop", container)

    async def kill(self, container_id: str, *, signal: str = "SIGKILL") -> None:
        self._record("kill", container_id)
        container = self._get(container_id)
        if not container.running:
            raise errors.ContainerError(
                f"cannot kill container {container_id}: container is not running", status=409
            )
        number = _signal_number(signal)
        self._emit("kill", container, signal=str(number))
        name = signals.Signals(number).name
        if name in _NON_TERMINATING_SIGNALS:
            return
        if container.status == "paused" and number != signals.SIGKILL:
            return  # a frozen process receives the signal only when unpaused
        self._exit(container, 128 + number)

    async def remove(self, container_id: str, *, force: bool = True) -> None:
        self._record("remove", container_id)
        container = self._containers.get(container_id)
        if container is None:
            return
        if container.running:
            if not force:
                raise errors.ContainerError(
                    f"cannot remove container {container_id}: it is running "
                    "(stop it first or force remove)",
                    status=409,
                )
            self._emit("kill", container, signal=str(int(signals.SIGKILL)))
            self._exit(container, 128 + signals.SIGKILL)
        del self._containers[container_id]
        self.log_lines.pop(container_id, None)
        self._emit("destroy", container)

    async def inspect(self, container_id: str) -> ContainerState:
        self._record("inspect", container_id)
        container = self._get(container_id)
        exit_info = None
        if not container.running and container.status != "created":
            exit_info = ExitInfo(
                exit_code=container.exit_code,
                oom_killed=container.oom_killed,
                finished_at=container.finished_at,
            )
        published = container.running and container.host_port is not None
        return ContainerState(
            id=container.id,
            name=container.name,
            image=container.spec.image,
            labels=dict(container.labels),
            status=container.status,
            running=container.running,
            paused=container.status == "paused",
            health=container.health,
            exit=exit_info,
            started_at=container.started_at,
            host_port=container.host_port if published else None,
            host_ip=container.spec.publish_host if published else None,
            ip_address=container.ip_address if container.running else None,
            env=container.env,
        )

    async def wait(self, container_id: str) -> int:
        self._record("wait", container_id)
        container = self._get(container_id)
        if container.running:
            await container.exited.wait()
        return container.exit_code

    async def logs_tail(self, container_id: str, *, lines: int = 50) -> str:
        self._record("logs_tail", container_id)
        self._get(container_id)
        tail = self.log_lines.get(container_id, [])[-lines:] if lines > 0 else []
        return "".join(f"{line}\n" for line in tail)

    def write_log(self, container_id: str, line: str) -> None:
        """The container prints ``line`` (followers of its logs see it at once)."""
        self.log_lines.setdefault(container_id, []).append(line)
        self._get(container_id).output.set()

    async def logs(
        self,
        container_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        self._record("logs", container_id)
        container = self._get(container_id)
        lines = self.log_lines.get(container_id, [])
        sent = max(0, len(lines) - tail) if tail is not None else 0
        stamp = f"{self._timestamp()} " if timestamps else ""
        while True:
            container.output.clear()
            lines = self.log_lines.get(container_id, [])
            for line in lines[sent:]:
                yield f"{stamp}{line}\n"
            sent = len(lines)
            if not follow or not container.running:
                return
            waiting = asyncio.ensure_future(container.output.wait())
            ending = asyncio.ensure_future(container.exited.wait())
            try:
                await asyncio.wait((waiting, ending), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                ending.cancel()

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        self._record("list", "")
        return [
            ContainerInfo(
                id=c.id,
                name=c.name,
                image=c.spec.image,
                labels=dict(c.labels),
                status=c.status,
                created_at=c.created_at,
            )
            for c in self._containers.values()
            if _carries(c.labels, labels)
        ]

    async def commit(
        self,
        container_id: str,
        *,
        repository: str,
        tag: str,
        labels: Mapping[str, str],
        env: tuple[str, ...] | None = None,
    ) -> str:
        self._record("commit", container_id)
        container = self._get(container_id)
        was_running = container.status == "running"
        if was_running:
            self._emit("pause", container)
        image_env = container.env if env is None else _replacing_env(container.env, env)
        digest = hashlib.sha256(f"{container_id}:{repository}:{tag}:{self._clock()}".encode())
        image = _FakeImage(
            id=f"sha256:{digest.hexdigest()}",
            env=image_env,
            labels={**container.labels, **labels},
        )
        name = _normalized(f"{repository}:{tag}")
        self.images.add(name)
        self._image_meta[name] = image
        self._emit("commit", container)
        if was_running:
            self._emit("unpause", container)
        return image.id

    def events(
        self, labels: Mapping[str, str], *, kinds: Collection[str] | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        # Subscribed at the call, like DockerRuntime (which asks for events since then).
        subscriber = _Subscriber(
            labels=dict(labels), kinds=None if kinds is None else frozenset(kinds)
        )
        self._subscribers.append(subscriber)
        return self._event_stream(subscriber)

    async def _event_stream(self, subscriber: _Subscriber) -> AsyncIterator[RuntimeEvent]:
        try:
            while True:
                yield await subscriber.queue.get()
        finally:
            self._subscribers.remove(subscriber)

    async def ensure_network(
        self, name: str, *, labels: Mapping[str, str], isolated: bool = False
    ) -> str:
        self._record("ensure_network", name)
        if name not in self.networks:
            self.networks[name] = (secrets.token_hex(32), dict(labels))
            if isolated:
                self.isolated_networks.add(name)
        return self.networks[name][0]

    async def network_gateway(self, name: str) -> str | None:
        self._record("network_gateway", name)
        if name not in self.networks:
            raise errors.ContainerNotFound(f"no such network: {name}")
        return None if name in ("host", "none") else self.gateway

    async def ensure_volume(self, name: str, *, labels: Mapping[str, str]) -> str:
        self._record("ensure_volume", name)
        self.volumes.setdefault(name, dict(labels))
        return name

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        self._record("volume_labels", name)
        found = self.volumes.get(name)
        return None if found is None else dict(found)

    async def remove_network(self, name: str, *, labels: Mapping[str, str]) -> bool:
        self._record("remove_network", name)
        found = self.networks.get(name)
        if found is None or not _carries(found[1], labels):
            return False
        if name in _PREDEFINED_NETWORKS:
            raise errors.ContainerError(
                f"cannot remove network {name}: {name} is a pre-defined network", status=403
            )
        users = [c.id for c in self._containers.values() if c.running and c.spec.network == name]
        if users:
            raise errors.ContainerError(
                f"cannot remove network {name}: it has active endpoints ({users[0][:12]})",
                status=403,
            )
        del self.networks[name]
        return True

    async def remove_volume(self, name: str, *, labels: Mapping[str, str]) -> bool:
        self._record("remove_volume", name)
        found = self.volumes.get(name)
        if found is None or not _carries(found, labels):
            return False
        users = [
            c.id
            for c in self._containers.values()
            if any(bind.split(":", 1)[0] == name for bind in c.spec.binds)
        ]
        if users:
            raise errors.ContainerError(
                f"cannot remove volume {name}: volume is in use - [{users[0]}]", status=409
            )
        del self.volumes[name]
        return True

    async def close(self) -> None:
        self._record("close", "")
        self.closed = True

    # -- internals ---------------------------------------------------------------------

    def _record(self, method: str, target: str) -> None:
        if self.down and method != "close":
            raise errors.DockerUnavailable(
                "Cannot connect to the Docker daemon (the fake engine is down)"
            )
        self.calls.append((method, target))

    def _get(self, container_id: str) -> _FakeContainer:
        container = self._containers.get(container_id)
        if container is None:
            raise errors.ContainerNotFound(f"No such container: {container_id}")
        return container

    def _find_image(self, image: str) -> str | None:
        """The normalized name of a present image, found by name or id."""
        present = {_normalized(name) for name in self.images}
        if _normalized(image) in present:
            return _normalized(image)
        for name, meta in self._image_meta.items():
            if name in present and image in (meta.id, meta.id.removeprefix("sha256:")):
                return name
        return None

    def _meta(self, name: str) -> _FakeImage:
        return self._image_meta.get(name) or _FakeImage(id=f"sha256:{_sha(name)}")

    def _exit(
        self,
        container: _FakeContainer,
        exit_code: int,
        *,
        oom_killed: bool = False,
        report: bool = True,
    ) -> None:
        container.status = "exited"
        container.exit_code = exit_code
        container.oom_killed = oom_killed
        container.finished_at = self._timestamp()
        container.host_port = None
        container.exited.set()
        if report:
            self._emit("die", container, exitCode=str(exit_code))

    def _claim_host_port(self, container: _FakeContainer) -> None:
        """Refuse a host port another running container publishes, as Docker does."""
        wanted = container.spec.host_port
        for other in self._containers.values():
            if other is container or not other.running or other.host_port != wanted:
                continue
            ips = {container.spec.publish_host, other.spec.publish_host}
            if len(ips) == 1 or "0.0.0.0" in ips:
                raise errors.ContainerError(
                    f"cannot start container {container.id[:12]}: host port "
                    f"{container.spec.publish_host}:{wanted} is already in use",
                    status=500,
                )

    def _emit(
        self,
        kind: str,
        container: _FakeContainer,
        *,
        health: SessionHealth | None = None,
        **attributes: str,
    ) -> None:
        event = RuntimeEvent(
            kind=kind,
            container_id=container.id,
            labels=dict(container.labels),
            exit_code=int(attributes["exitCode"]) if "exitCode" in attributes else None,
            health=health,
            time=self._clock(),
        )
        for subscriber in self._subscribers:
            if _carries(container.labels, subscriber.labels) and (
                subscriber.kinds is None or kind in subscriber.kinds
            ):
                subscriber.queue.put_nowait(event)

    def _timestamp(self) -> str:
        moment = datetime.datetime.fromtimestamp(self._clock(), tz=datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _carries(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _normalized(image: str) -> str:
    """``name`` → ``name:latest``, as Docker resolves references without a tag."""
    if "@" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last else f"{image}:latest"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _signal_number(signal: str) -> int:
    text = signal.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signals.Signals[name])
    except KeyError as exc:
        raise errors.ContainerError(f"invalid signal: {signal}") from exc


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def _merged_env(base: Iterable[str], overrides: Iterable[str]) -> tuple[str, ...]:
    """Docker's Env merge: keys of ``overrides`` replace those of ``base`` in place."""
    merged: dict[str, str] = {_env_key(entry): entry for entry in base}
    for entry in overrides:
        merged[_env_key(entry)] = entry
    return tuple(merged.values())


def _replacing_env(current: Iterable[str], wanted: Iterable[str]) -> tuple[str, ...]:
    """What Docker's commit produces from Env ``wanted``: keys of the container that
    ``wanted`` omits survive, blanked (DockerRuntime sends them as ``KEY=``)."""
    wanted = tuple(wanted)
    wanted_keys = {_env_key(entry) for entry in wanted}
    blanked = [f"{key}=" for key in dict.fromkeys(map(_env_key, current)) if key not in wanted_keys]
    return (*wanted, *blanked)
