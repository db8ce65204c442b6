"""``DockerAgentRunner``'s contract, on a FakeRuntime engine (no Docker needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import roost
from roost import errors
from roost import library as library_module
from roost.engine import Engine
from roost.ports.runtime import ContainerSpec
from roost.runner import DockerAgentRunner
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime

IMAGE = "roost-mimic:latest"
OTHER_IMAGE = "roost-other:1"


class FakeRunner(DockerAgentRunner):
    """The runner with its engine on a FakeRuntime."""

    def __init__(self, runtime: FakeRuntime, **options: Any) -> None:
        super().__init__(**options)
        self.runtime = runtime

    def _new_engine(self) -> Engine:
        return Engine(
            self._settings, runtime=self.runtime, agent_client=FakeAgentClient(self.runtime)
        )


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime(images=[IMAGE, OTHER_IMAGE])


@pytest.fixture
async def runner(
    tmp_path: Path, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeRunner]:
    monkeypatch.setattr(library_module, "_docker_ping", lambda host: None)
    made = FakeRunner(
        runtime,
        coordinator_url="http://coordinator:9000",
        network="swarm-net",
        volume="swarm-data",
        state_dir=tmp_path / "state",
        restart_backoff=0.05,
        startup_timeout=5.0,
    )
    yield made
    await made.stop_all()


def test_runner_is_exported_when_imported_from_roost() -> None:
    assert roost.DockerAgentRunner is DockerAgentRunner
    assert "DockerAgentRunner" in roost.__all__


def test_construction_raises_container_error_when_docker_unreachable(tmp_path: Path) -> None:
    with pytest.raises(roost.ContainerError):
        DockerAgentRunner(docker_host=f"unix://{tmp_path}/no-docker.sock")


def test_properties_report_configuration_when_constructed(runner: FakeRunner) -> None:
    assert runner.coordinator_url == "http://coordinator:9000"
    assert runner.network == "swarm-net"
    assert runner.volume == "swarm-data"
    assert runner.default_image == IMAGE
    assert runner.instance.startswith("swarm-")


async def test_spawn_returns_running_agent_description_when_healthy(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1", agent_id="w-1", capabilities="code,review")

    assert set(spawned) >= {"container_id", "agent_id", "name", "image", "capabilities"}
    assert spawned["name"] == "worker-1"
    assert spawned["agent_id"] == "w-1"
    assert spawned["image"] == IMAGE
    assert spawned["capabilities"] == "code,review"
    state = await runtime.inspect(spawned["container_id"])
    assert state.running
    spec: ContainerSpec = runtime.container_spec(spawned["container_id"])
    env = dict(spec.env)
    assert env["COORDINATOR_URL"] == "http://coordinator:9000"
    assert env["AGENT_NAME"] == "worker-1"
    assert env["AGENT_ID"] == "w-1"
    assert env["AGENT_CAPABILITIES"] == "code,review"
    assert spec.network == "swarm-net"
    assert spec.binds == ("swarm-data:/data",)
    assert spec.labels["roost.instance"] == runner.instance
    assert runtime.networks["swarm-net"][1]["roost.instance"] == runner.instance
    assert runtime.volumes["swarm-data"]["roost.managed"] == "true"


async def test_spawn_uses_given_image_and_defaults_agent_id_when_none(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1", image=OTHER_IMAGE)

    assert spawned["image"] == OTHER_IMAGE
    assert spawned["agent_id"] == "worker-1"
    assert runtime.container_spec(spawned["container_id"]).image == OTHER_IMAGE


async def test_spawn_raises_and_leaves_nothing_when_image_unavailable(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    with pytest.raises(errors.ContainerError, match="roost-absent"):
        await runner.spawn("worker-1", image="roost-absent:1")

    assert await runner.list_containers() == []
    assert await runtime.list({"roost.instance": runner.instance}) == []


async def test_spawn_raises_conflict_when_name_taken(runner: FakeRunner) -> None:
    await runner.spawn("worker-1")

    with pytest.raises(errors.Conflict):
        await runner.spawn("worker-1")


async def test_spawn_raises_config_error_naming_name_when_not_a_dns_label(
    runner: FakeRunner,
) -> None:
    with pytest.raises(errors.ConfigError) as raised:
        await runner.spawn("Worker_1")

    assert raised.value.key == "name"


async def test_list_containers_describes_each_agent_when_spawned(runner: FakeRunner) -> None:
    one = await runner.spawn("worker-1", agent_id="w-1", capabilities="code")
    two = await runner.spawn("worker-2")

    rows = await runner.list_containers()

    assert [row["name"] for row in rows] == ["worker-1", "worker-2"]
    assert rows[0]["container_id"] == one["container_id"]
    assert rows[0]["agent_id"] == "w-1"
    assert rows[0]["state"] == "running"
    assert rows[0]["url"] == one["url"]
    assert rows[0]["capabilities"] == "code"
    assert rows[1]["container_id"] == two["container_id"]


async def test_is_running_tells_state_when_asked(runner: FakeRunner, runtime: FakeRuntime) -> None:
    spawned = await runner.spawn("worker-1")
    cid = spawned["container_id"]

    assert await runner.is_running(cid)
    assert await runner.is_running(cid[:12])
    assert not await runner.is_running("0" * 64)
    assert not await runner.is_running("")
    await runtime.pause(cid)
    assert not await runner.is_running(cid)


async def test_is_running_is_false_when_container_belongs_to_another_instance(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")  # starts the engine
    foreign = await runtime.create(
        ContainerSpec(image=IMAGE, labels={"roost.managed": "true", "roost.instance": "other"})
    )
    await runtime.start(foreign)

    assert not await runner.is_running(foreign)


async def test_stop_returns_true_and_removes_container_when_agent_running(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1")
    cid = spawned["container_id"]

    assert await runner.stop(cid) is True

    with pytest.raises(errors.ContainerNotFound):
        await runtime.inspect(cid)
    assert await runner.list_containers() == []
    assert not await runner.is_running(cid)
    again = await runner.spawn("worker-1")  # the name is free again
    assert again["container_id"] != cid


async def test_stop_returns_false_when_id_unknown(runner: FakeRunner) -> None:
    await runner.spawn("worker-1")

    assert await runner.stop("f" * 64) is False
    assert await runner.stop("") is False
    assert len(await runner.list_containers()) == 1


async def test_stop_returns_false_when_nothing_was_ever_spawned(runner: FakeRunner) -> None:
    assert await runner.stop("f" * 64) is False


async def test_stop_returns_false_when_already_stopped(runner: FakeRunner) -> None:
    spawned = await runner.spawn("worker-1")
    assert await runner.stop(spawned["container_id"]) is True

    assert await runner.stop(spawned["container_id"]) is False


async def test_stop_returns_false_and_keeps_container_when_it_belongs_to_another_instance(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")
    foreign = await runtime.create(
        ContainerSpec(image=IMAGE, labels={"roost.managed": "true", "roost.instance": "other"})
    )

    assert await runner.stop(foreign) is False
    assert (await runtime.inspect(foreign)).id == foreign


async def test_stop_returns_false_when_docker_fails_to_remove(
    runner: FakeRunner, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = await runner.spawn("worker-1")
    cid = spawned["container_id"]

    async def failing_remove(container_id: str, *, force: bool = True) -> None:
        raise errors.ContainerError(f"cannot remove container {container_id}: driver failed")

    monkeypatch.setattr(runtime, "remove", failing_remove)

    assert await runner.stop(cid) is False  # never a false success
    monkeypatch.undo()
    assert (await runtime.inspect(cid)).id == cid
    # A retry finds the leftover by its labels and finishes the job.
    assert await runner.stop(cid) is True
    with pytest.raises(errors.ContainerNotFound):
        await runtime.inspect(cid)


async def test_stop_all_returns_count_and_removes_every_container_when_agents_spawned(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    ids = [(await runner.spawn(f"worker-{n}"))["container_id"] for n in range(3)]

    assert await runner.stop_all() == 3

    assert await runtime.list({"roost.instance": runner.instance}) == []
    assert runner.engine is None
    assert await runner.stop_all() == 0  # idempotent
    assert [await runner.is_running(cid) for cid in ids] == [False, False, False]


async def test_spawn_works_again_when_called_after_stop_all(
    runner: FakeRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")
    await runner.stop_all()

    spawned = await runner.spawn("worker-1")

    assert (await runtime.inspect(spawned["container_id"])).running
