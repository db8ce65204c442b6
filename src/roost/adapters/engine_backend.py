"""``EngineBackend``: the agent backend port over one Docker Engine's container runtime.

Role: a thin layer over any ``ContainerRuntime`` (``DockerRuntime``, or
``FakeRuntime`` in tests): a unit is a container, and each operation is the
runtime call (or the short sequence of calls) the supervisor made itself before
the port existed, so behaviour and numbers are the engine's own:

- ``ensure`` = ``create``; ``wake`` = ``start``, or ``unpause`` when it was paused;
- ``sleep(pause)`` = ``pause``; ``sleep(stop)`` = thaw a paused container first (a
  frozen process cannot handle SIGTERM), then ``stop``;
- ``status`` = ``inspect``; ``endpoint`` = the published port from ``inspect``
  (``0.0.0.0`` read as loopback); ``observe`` = the runtime's ``events`` of the
  kinds the supervisor acts on (``CONTAINER_EVENT_KINDS``: Docker sends no others).

Invariants:
- Nothing here adds a Docker call the supervisor did not make before: each
  method is the runtime call it names (one coroutine frame more, no I/O).
- Every capability is there: pause, commit, loopback-only ports, swap limits,
  no-new-privileges, OOM flags; one host, so volumes are shared and units never
  change node.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from roost import errors
from roost.ports.backend import CONTAINER_EVENT_KINDS, Capabilities, Endpoint, SleepMode
from roost.ports.runtime import (
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    RuntimeEvent,
)

__all__ = ["ENGINE_CAPABILITIES", "EngineBackend"]

ENGINE_CAPABILITIES = Capabilities(
    can_pause=True,
    can_commit=True,
    publishes_on_loopback=True,
    no_new_privileges=True,
    limits_swap=True,
    reports_oom=True,
    shared_volumes=True,
    spans_nodes=False,
)
#: An address a port published on every interface is reached at from this host.
_ANY_ADDRESS = ("", "0.0.0.0")


class EngineBackend:
    """``AgentBackend`` over one engine's ``ContainerRuntime`` (see the module docstring)."""

    kind = "engine"
    capabilities = ENGINE_CAPABILITIES

    def __init__(self, runtime: ContainerRuntime) -> None:
        self.runtime = runtime

    async def ping(self) -> str:
        return await self.runtime.ping()

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        await self.runtime.ensure_image(image, pull_timeout=pull_timeout)

    async def ensure(self, spec: ContainerSpec, *, placement: tuple[str, ...] = ()) -> str:
        # One engine places nothing: roost.config refuses placement on this backend.
        return await self.runtime.create(spec)

    async def wake(self, unit_id: str, *, paused: bool = False, timeout: float = 120.0) -> None:
        # An engine's start returns once the process runs; it needs no deadline of ours.
        if paused:
            await self.runtime.unpause(unit_id)
        else:
            await self.runtime.start(unit_id)

    async def sleep(self, unit_id: str, *, mode: SleepMode, grace: float = 10.0) -> None:
        if mode == "pause":
            await self.runtime.pause(unit_id)
            return
        with contextlib.suppress(errors.ContainerNotFound):
            state = await self.runtime.inspect(unit_id)
            if state.paused:
                # A frozen process cannot handle SIGTERM: thaw it first.
                await self.runtime.unpause(unit_id)
        await self.runtime.stop(unit_id, grace=grace)

    async def remove(self, unit_id: str) -> None:
        await self.runtime.remove(unit_id, force=True)

    async def status(self, unit_id: str) -> ContainerState:
        return await self.runtime.inspect(unit_id)

    async def endpoint(self, unit_id: str) -> Endpoint | None:
        state = await self.runtime.inspect(unit_id)
        if state.host_port is None:
            return None
        host = state.host_ip if state.host_ip not in (None, *_ANY_ADDRESS) else "127.0.0.1"
        assert host is not None
        return Endpoint(host, state.host_port, state.ip_address or None)

    async def logs_tail(self, unit_id: str, *, lines: int = 50) -> str:
        return await self.runtime.logs_tail(unit_id, lines=lines)

    def logs(
        self,
        unit_id: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[str]:
        return self.runtime.logs(
            unit_id, follow=follow, tail=tail, since=since, timestamps=timestamps
        )

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        return await self.runtime.list(labels)

    def observe(self, labels: Mapping[str, str]) -> AsyncIterator[RuntimeEvent]:
        return self.runtime.events(labels, kinds=CONTAINER_EVENT_KINDS)

    async def close(self) -> None:
        """The runtime is shared with the job runner: its owner (the engine) closes it."""
