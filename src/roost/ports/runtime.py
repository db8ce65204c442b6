"""The container runtime port: everything Roost asks of Docker.

Invariants every implementation keeps (checked by tests/contract):
- ``create`` never pulls; ``ensure_image`` pulls only when the image is absent and
  raises ``ImageUnavailable`` when it cannot be had.
- Errors are Roost's own: ``ContainerNotFound`` for a missing container,
  ``DockerUnavailable`` when the engine cannot be reached, ``ContainerError``
  otherwise.
- ``remove`` and ``stop`` of a container that is already gone are no-ops.
- ``ensure_network`` / ``ensure_volume`` create only what is absent and never
  change or remove an existing network or volume; ``remove_network`` /
  ``remove_volume`` remove one only when it carries every label asked for, so a
  caller removes only what its own instance created. A network created
  ``isolated`` has inter-container traffic off: its containers reach the host
  (its gateway) but not each other.
- A spec with a fixed ``host_port`` publishes exactly that port; when it is
  taken, ``start`` raises ``ContainerError`` naming it and the container stays
  ``created``.
- ``events`` never blocks the engine: it reads continuously, reconnects on its
  own, yields a ``lost`` event when the stream breaks (the engine may be going
  away) and a ``gap`` event after every reconnect (events may have been lost, so
  the caller must re-list and reconcile).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Protocol

from roost.core.records import ExitInfo, SessionHealth

__all__ = [
    "ContainerInfo",
    "ContainerRuntime",
    "ContainerSpec",
    "ContainerState",
    "RuntimeEvent",
]


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What to create. Limits default to safe values; None means "no limit"."""

    image: str
    labels: Mapping[str, str]
    name: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    command: tuple[str, ...] | None = None
    #: container port to publish on ``publish_host``.
    port: int | None = None
    publish_host: str = "127.0.0.1"
    #: host port ``port`` is published on; None: an ephemeral one Docker picks at start.
    host_port: int | None = None
    network: str | None = None
    memory: int | None = 512 * 1024 * 1024
    #: None: same as memory (no swap).
    memory_swap: int | None = None
    cpus: float | None = None
    pids_limit: int | None = 512
    no_new_privileges: bool = True
    #: "volume:/path[:ro]" or "/host:/path[:ro]".
    binds: tuple[str, ...] = ()
    #: "host:ip" entries, e.g. "host.docker.internal:host-gateway".
    extra_hosts: tuple[str, ...] = ()
    #: Linux capabilities dropped (e.g. ("ALL",)) and then added back.
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    #: the root filesystem is read-only; ``tmpfs`` paths are writable in-memory mounts.
    read_only_rootfs: bool = False
    tmpfs: tuple[str, ...] = ()
    #: "user[:group]" the process runs as; "": the image's own.
    user: str = ""
    #: a cgroup namespace of its own (it cannot see the host's cgroup tree).
    private_cgroupns: bool = True
    #: The image's own HEALTHCHECK is not used for readiness (readiness is probed
    #: over HTTP); its verdicts arrive as ``health_status`` events.


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerInfo:
    """One row of ``list``."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    #: created | running | paused | restarting | removing | exited | dead
    status: str
    created_at: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerState:
    """What ``inspect`` tells."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    status: str
    running: bool
    paused: bool
    health: SessionHealth
    exit: ExitInfo | None
    started_at: str | None = None
    #: host port published for the spec's ``port``; None when not published.
    host_port: int | None = None
    host_ip: str | None = None
    #: the container's address on its first network.
    ip_address: str | None = None
    env: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeEvent:
    """A container event. ``kind`` is Docker's action (``die``, ``oom``, ``start``,
    ``pause``, ``unpause``, ``stop``, ``kill``, ``destroy``, ``create``,
    ``health_status``), ``lost`` (the stream broke) or ``gap`` (the stream
    reconnected; re-list)."""

    kind: str
    container_id: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    #: for ``health_status``: the verdict of the image's own HEALTHCHECK.
    health: SessionHealth | None = None
    #: seconds since the epoch (Docker's timeNano / 1e9).
    time: float = 0.0
    #: for ``node_lost`` (an agent backend whose units span nodes, ``ports.backend``):
    #: the node that went down, by its address or id.
    node: str = ""


class ContainerRuntime(Protocol):
    async def ping(self) -> str:
        """Return the engine's API version; raise DockerUnavailable if unreachable."""
        ...

    async def image_exists(self, image: str) -> bool: ...

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        """Pull ``image`` only if absent. ImageUnavailable if it cannot be had."""
        ...

    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; return its id."""
        ...

    async def start(self, container_id: str) -> None: ...

    async def pause(self, container_id: str) -> None: ...

    async def unpause(self, container_id: str) -> None: ...

    async def stop(self, container_id: str, *, grace: float) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL. Gone already: no-op."""
        ...

    async def kill(self, container_id: str, *, signal: str = "SIGKILL") -> None: ...

    async def remove(self, container_id: str, *, force: bool = True) -> None:
        """Remove the container (and its anonymous volumes). Gone already: no-op."""
        ...

    async def inspect(self, container_id: str) -> ContainerState:
        """ContainerNotFound if absent."""
        ...

    async def wait(self, container_id: str) -> int:
        """Block until the container exits; return its exit code."""
        ...

    async def logs_tail(self, container_id: str, *, lines: int = 50) -> str: ...

    def logs(
        self,
        container_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        """The container's output (stdout and stderr) as text: the last ``tail`` lines
        (None: all) written at or after ``since`` (epoch seconds), each prefixed with
        its time when ``timestamps``; with ``follow``, then new output as it comes
        until the container stops. ContainerNotFound if absent."""
        ...

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """All containers (any status) carrying every one of ``labels``."""
        ...

    def events(
        self, labels: Mapping[str, str], *, kinds: Collection[str] | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        """Container events for containers carrying ``labels``, forever, reconnecting.
        ``kinds``: only events of these kinds (and always ``lost`` and ``gap``); None:
        every kind."""
        ...

    async def commit(
        self,
        container_id: str,
        *,
        repository: str,
        tag: str,
        labels: Mapping[str, str],
        env: tuple[str, ...] | None = None,
    ) -> str:
        """Commit the container as ``repository:tag``; ``env`` replaces the image's
        Env (used to scrub secrets). Return the image id."""
        ...

    async def remove_image(self, image: str) -> None:
        """Remove an image; absent already: no-op."""
        ...

    async def image_size(self, image: str) -> int:
        """Size in bytes; ContainerNotFound if absent."""
        ...

    async def ensure_network(
        self, name: str, *, labels: Mapping[str, str], isolated: bool = False
    ) -> str:
        """Create the bridge network ``name`` carrying ``labels`` unless a network of
        that name exists (then it is used as it is, labels untouched); return its id.
        ``isolated``: created with inter-container traffic off. Concurrent calls for
        one name end with one network."""
        ...

    async def network_gateway(self, name: str) -> str | None:
        """The IPv4 gateway of network ``name`` (the host's address on it), or None
        when it has none (``host``, ``none``). ContainerNotFound if absent."""
        ...

    async def ensure_volume(self, name: str, *, labels: Mapping[str, str]) -> str:
        """Create the local volume ``name`` carrying ``labels`` unless it exists (then
        it is used as it is, labels untouched); return its name."""
        ...

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        """The labels of volume ``name``; None when there is no such volume."""
        ...

    async def remove_network(self, name: str, *, labels: Mapping[str, str]) -> bool:
        """Remove network ``name`` if it carries every one of ``labels``; True when
        removed. Absent, or not carrying them: False, nothing touched. Still used by
        a container: ``ContainerError``."""
        ...

    async def remove_volume(self, name: str, *, labels: Mapping[str, str]) -> bool:
        """Remove volume ``name`` if it carries every one of ``labels``; True when
        removed. Absent, or not carrying them: False, nothing touched. Still mounted
        by a container: ``ContainerError``."""
        ...

    async def close(self) -> None: ...
