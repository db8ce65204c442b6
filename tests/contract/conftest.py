"""Fixtures for the ContainerRuntime contract suite: one ``runtime`` per backend.

``runtime`` is parametrized over ``FakeRuntime`` and ``DockerRuntime`` (the latter
marked ``docker``); ``harness`` wraps it with what a test needs to drive each
backend the same way: specs labelled with a fresh random instance id, and the
few things only the backend can do (make a process crash, run out of memory,
print log lines, drop the events connection).

Invariants:
- Every Docker container, network and volume a test creates carries
  ``roost.instance=<random>``; teardown force-removes every container, network
  and volume with that label and every image the test committed, so tests never
  touch other people's.
- The Docker test images ``roost-contract-busybox:latest`` and
  ``roost-contract-unhealthy:latest`` (the same with a HEALTHCHECK that always
  fails) are imported from Debian's busybox-static once, only when absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError

from roost.adapters.docker_runtime import DockerRuntime
from roost.core.records import SessionHealth
from roost.ports.runtime import ContainerRuntime, ContainerSpec, RuntimeEvent
from roost.testing.fake_runtime import FakeRuntime

BUSYBOX_IMAGE = "roost-contract-busybox:latest"
#: Busybox whose own HEALTHCHECK fails: Docker reports it unhealthy after ~1 s.
UNHEALTHY_IMAGE = "roost-contract-unhealthy:latest"
UNHEALTHY_CHANGES = ('HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD ["false"]',)
BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "sleep", "tail", "cat", "echo", "true", "false", "env", "kill")
#: The process every contract container runs unless a test says otherwise: it
#: exits 0 on SIGTERM (an app that shuts down cleanly) and 3 on SIGUSR1 (how the
#: Docker harness makes it "crash").
SERVE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; trap 'exit 3' USR1; sleep 3600 & wait")
CRASH_EXIT_CODE = 3
EVENT_TIMEOUT = 15.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Limits:
    memory: int | None
    memory_swap: int | None
    pids_limit: int | None
    nano_cpus: int | None
    no_new_privileges: bool


class Harness:
    """Drives one runtime; subclasses do what only their backend can."""

    kind = ""

    def __init__(self, runtime: ContainerRuntime, image: str) -> None:
        self.runtime = runtime
        self.image = image
        self.instance = f"contract-{secrets.token_hex(6)}"
        self.labels = {"roost.managed": "true", "roost.instance": self.instance}

    def spec(self, **overrides: Any) -> ContainerSpec:
        fields: dict[str, Any] = {
            "image": self.image,
            "labels": dict(self.labels),
            "command": SERVE_COMMAND,
        }
        fields.update(overrides)
        return ContainerSpec(**fields)

    async def started(self, **overrides: Any) -> str:
        container_id = await self.runtime.create(self.spec(**overrides))
        await self.runtime.start(container_id)
        return container_id

    def snapshot_reference(self) -> tuple[str, str]:
        return "roost-contract-snapshot", self.instance

    async def crash(self, container_id: str) -> None:
        """Make a running container's process exit with ``CRASH_EXIT_CODE``."""
        raise NotImplementedError

    async def started_printing(self, lines: list[str]) -> str:
        """A running container whose output is ``lines``."""
        raise NotImplementedError

    async def started_out_of_memory(self) -> str:
        """A container that gets OOM-killed right after it starts."""
        raise NotImplementedError

    async def started_unhealthy(self) -> str:
        """A running container whose image's own HEALTHCHECK fails."""
        raise NotImplementedError

    async def limits(self, container_id: str) -> Limits:
        raise NotImplementedError

    async def sever_event_streams(self) -> None:
        """Break the runtime's events connection so it has to reconnect."""
        raise NotImplementedError

    async def network_labels(self, name: str) -> dict[str, str] | None:
        """The labels of network ``name``; None when there is no such network."""
        raise NotImplementedError

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        """The labels of volume ``name``; None when there is no such volume."""
        raise NotImplementedError

    async def network_isolated(self, name: str) -> bool:
        """Whether network ``name`` has inter-container traffic off."""
        raise NotImplementedError

    async def networks_of(self, container_id: str) -> list[str]:
        """Names of the networks a container is attached to."""
        raise NotImplementedError


class FakeHarness(Harness):
    kind = "fake"
    runtime: FakeRuntime

    async def crash(self, container_id: str) -> None:
        self.runtime.crash(container_id, exit_code=CRASH_EXIT_CODE)

    async def started_printing(self, lines: list[str]) -> str:
        container_id = await self.runtime.create(self.spec())
        self.runtime.log_lines[container_id] = list(lines)
        await self.runtime.start(container_id)
        return container_id

    async def started_out_of_memory(self) -> str:
        container_id = await self.started(memory=16 * 1024 * 1024)
        self.runtime.crash(container_id, exit_code=137, oom=True)
        return container_id

    async def started_unhealthy(self) -> str:
        container_id = await self.started()
        self.runtime.report_health(container_id, SessionHealth.UNHEALTHY)
        return container_id

    async def limits(self, container_id: str) -> Limits:
        spec = self.runtime.container_spec(container_id)
        return Limits(
            memory=spec.memory,
            memory_swap=spec.memory if spec.memory_swap is None else spec.memory_swap,
            pids_limit=spec.pids_limit,
            nano_cpus=None if spec.cpus is None else round(spec.cpus * 1e9),
            no_new_privileges=spec.no_new_privileges,
        )

    async def sever_event_streams(self) -> None:
        self.runtime.emit_gap()

    async def network_labels(self, name: str) -> dict[str, str] | None:
        found = self.runtime.networks.get(name)
        return None if found is None else dict(found[1])

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        found = self.runtime.volumes.get(name)
        return None if found is None else dict(found)

    async def network_isolated(self, name: str) -> bool:
        return name in self.runtime.isolated_networks

    async def networks_of(self, container_id: str) -> list[str]:
        return [self.runtime.container_spec(container_id).network or "bridge"]


class SeverableDockerRuntime(DockerRuntime):
    """DockerRuntime that remembers its events responses so a test can cut them."""

    def __init__(self) -> None:
        super().__init__()
        self.event_responses: list[aiohttp.ClientResponse] = []

    @contextlib.asynccontextmanager
    async def _open_event_stream(
        self, filters: Any, since: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        async with super()._open_event_stream(filters, since) as response:
            self.event_responses.append(response)
            yield response


class DockerHarness(Harness):
    kind = "docker"
    runtime: SeverableDockerRuntime

    def __init__(
        self,
        runtime: SeverableDockerRuntime,
        image: str,
        raw: aiodocker.Docker,
        *,
        unhealthy_image: str,
    ) -> None:
        super().__init__(runtime, image)
        self.raw = raw
        self.unhealthy_image = unhealthy_image

    async def started_unhealthy(self) -> str:
        return await self.started(image=self.unhealthy_image)

    async def crash(self, container_id: str) -> None:
        await self.runtime.kill(container_id, signal="SIGUSR1")

    async def started_printing(self, lines: list[str]) -> str:
        script = "; ".join(f"echo {line}" for line in lines)
        return await self.started(command=("sh", "-c", f"{script}; {SERVE_COMMAND[2]}"))

    async def started_out_of_memory(self) -> str:
        # tail buffers /dev/zero looking for a newline that never comes. The
        # delay is Docker's, not the test's: dockerd 20.10 (cgroup v1) missed the
        # OOM (no ``oom`` event, OOMKilled false, just exit 137) in 8 of 30 runs
        # when the kill came within milliseconds of start, 1 of 30 at 0.3 s, 0 of
        # 30 at 1 s.
        return await self.started(
            memory=16 * 1024 * 1024, command=("sh", "-c", "sleep 1; exec tail /dev/zero")
        )

    async def limits(self, container_id: str) -> Limits:
        host_config = (await self.raw.containers.container(container_id).show())["HostConfig"]
        return Limits(
            memory=host_config["Memory"] or None,
            memory_swap=host_config["MemorySwap"] or None,
            pids_limit=host_config["PidsLimit"],
            nano_cpus=host_config["NanoCpus"] or None,
            no_new_privileges="no-new-privileges" in (host_config["SecurityOpt"] or []),
        )

    async def sever_event_streams(self) -> None:
        for response in self.runtime.event_responses:
            response.close()

    async def network_labels(self, name: str) -> dict[str, str] | None:
        try:
            data = await (await self.raw.networks.get(name)).show()
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(data.get("Labels") or {})

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        try:
            data = await self.raw._query_json(f"volumes/{name}")
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(data.get("Labels") or {})

    async def network_isolated(self, name: str) -> bool:
        data = await (await self.raw.networks.get(name)).show()
        options = data.get("Options") or {}
        return bool(options.get("com.docker.network.bridge.enable_icc") == "false")

    async def networks_of(self, container_id: str) -> list[str]:
        data = await self.raw.containers.container(container_id).show()
        return sorted(data["NetworkSettings"]["Networks"])

    async def clean_up(self) -> None:
        rows = await self.raw.containers.list(
            all=True, filters={"label": [f"roost.instance={self.instance}"]}
        )
        for row in rows:
            await row.delete(force=True, v=True)
        mine = {"label": [f"roost.instance={self.instance}"]}
        for network in await self.raw.networks.list(filters=mine):
            with contextlib.suppress(DockerError):
                await self.raw._query_json(f"networks/{network['Id']}", "DELETE")
        volumes = await self.raw._query_json("volumes", params={"filters": json.dumps(mine)})
        for volume in volumes.get("Volumes") or ():
            with contextlib.suppress(DockerError):
                await self.raw._query_json(f"volumes/{volume['Name']}", "DELETE")
        repository, tag = self.snapshot_reference()
        with contextlib.suppress(DockerError):
            await self.raw.images.delete(f"{repository}:{tag}", force=True)


# -- fixtures -------------------------------------------------------------------------


def _import_busybox(tag: str, changes: tuple[str, ...], workdir: Path) -> str:
    """Import busybox-static as ``tag`` unless that image is already there."""
    docker = shutil.which("docker") or "docker"
    present = subprocess.run([docker, "image", "inspect", tag], capture_output=True, check=False)
    if present.returncode == 0:
        return tag
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        for directory in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(directory)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        tar.add(BUSYBOX_BINARY, arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    command = [docker, "import", "--change", "ENV PATH=/bin"]
    for change in changes:
        command += ["--change", change]
    subprocess.run([*command, str(archive), tag], check=True, capture_output=True)
    return tag


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Import the busybox test image unless it is already there."""
    return _import_busybox(BUSYBOX_IMAGE, (), tmp_path_factory.mktemp("busybox"))


@pytest.fixture(scope="session")
def unhealthy_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Import busybox with an always-failing HEALTHCHECK unless it is already there."""
    return _import_busybox(UNHEALTHY_IMAGE, UNHEALTHY_CHANGES, tmp_path_factory.mktemp("unhealthy"))


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "fake":
        image = "roost-contract-busybox:latest"
        fake = FakeRuntime(images={image})
        yield FakeHarness(fake, image)
        await fake.close()
        return
    image = request.getfixturevalue("busybox_image")
    unhealthy = request.getfixturevalue("unhealthy_image")
    runtime = SeverableDockerRuntime()
    raw = aiodocker.Docker()
    docker_harness = DockerHarness(runtime, image, raw, unhealthy_image=unhealthy)
    try:
        yield docker_harness
    finally:
        try:
            await docker_harness.clean_up()
        finally:
            await runtime.close()
            await raw.close()


@pytest.fixture
def runtime(harness: Harness) -> ContainerRuntime:
    return harness.runtime


# -- helpers for tests ----------------------------------------------------------------


class EventWatch:
    """Reads a runtime's event stream with deadlines; collects what it saw."""

    def __init__(self, stream: AsyncIterator[RuntimeEvent]) -> None:
        self._stream = stream
        self.seen: list[RuntimeEvent] = []

    async def until(
        self, predicate: Callable[[RuntimeEvent], bool], *, timeout: float = EVENT_TIMEOUT
    ) -> RuntimeEvent:
        async with asyncio.timeout(timeout):
            async for event in self._stream:
                self.seen.append(event)
                if predicate(event):
                    return event
        raise AssertionError("the event stream ended")

    def kinds(self, container_id: str) -> list[str]:
        return [event.kind for event in self.seen if event.container_id == container_id]

    async def close(self) -> None:
        stream = self._stream
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()


@contextlib.asynccontextmanager
async def watching(
    runtime: ContainerRuntime, labels: dict[str, str], *, kinds: frozenset[str] | None = None
) -> AsyncIterator[EventWatch]:
    watch = EventWatch(runtime.events(labels, kinds=kinds))
    try:
        yield watch
    finally:
        await watch.close()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float = EVENT_TIMEOUT,
    interval: float = 0.05,
) -> T:
    """Poll ``probe`` until ``accept`` holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value {value!r}")
        await asyncio.sleep(interval)
