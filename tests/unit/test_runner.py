"""``DockerAgentRunner``'s contract on a FakeRuntime engine (no Docker needed):
the async core, and the sync face over it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import roost
from roost import errors
from roost.library import AgentContainer, AsyncDockerAgentRunner, DockerAgentRunner
from roost.ports.runtime import ContainerSpec
from roost.testing.fake_runtime import FakeRuntime
from tests.unit.library_fakes import IMAGE, FakeAsyncRunner, FakeRunner, skip_docker_check

OTHER_IMAGE = "roost-other:1"


@pytest.fixture(autouse=True)
def _no_docker_check(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_docker_check(monkeypatch)


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime(images=[IMAGE, OTHER_IMAGE])


@pytest.fixture
async def runner(tmp_path: Path, runtime: FakeRuntime) -> AsyncIterator[FakeAsyncRunner]:
    made = FakeAsyncRunner(
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


def test_runners_are_exported_when_imported_from_roost() -> None:
    assert roost.DockerAgentRunner is DockerAgentRunner
    assert roost.AsyncDockerAgentRunner is AsyncDockerAgentRunner


def test_construction_raises_container_error_when_docker_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real check
    with pytest.raises(roost.ContainerError, match="not reachable"):
        DockerAgentRunner(docker_host=f"unix://{tmp_path}/no-docker.sock")


def test_construction_raises_config_error_when_extra_env_sets_a_reserved_name(
    runtime: FakeRuntime,
) -> None:
    with pytest.raises(errors.ConfigError) as raised:
        FakeAsyncRunner(runtime, extra_env={"AGENT_ID": "x"})

    assert raised.value.key == "extra_env.AGENT_ID"


def test_properties_report_configuration_when_constructed(runner: FakeAsyncRunner) -> None:
    assert runner.coordinator_url == "http://coordinator:9000"
    assert runner.network == "swarm-net"
    assert runner.volume == "swarm-data"
    assert runner.image == IMAGE
    assert runner.instance.startswith("swarm-")


async def test_spawn_returns_running_agent_description_when_healthy(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1", agent_id="w-1", capabilities="code,review")

    assert set(spawned) == {"container_id", "agent_id", "name", "image", "capabilities", "url"}
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


async def test_spawn_accepts_any_name_and_tells_it_to_the_agent_when_not_a_dns_label(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("Echo Bot_1", capabilities="summarise,translate")

    assert spawned["name"] == "Echo Bot_1"
    env = dict(runtime.container_spec(spawned["container_id"]).env)
    assert env["AGENT_NAME"] == "Echo Bot_1"
    assert env["AGENT_CAPABILITIES"] == "summarise,translate"
    assert env["ROOST_AGENT"].startswith("echo-bot-1-")


async def test_spawn_gives_each_call_its_own_agent_when_no_agent_id_is_given(
    runner: FakeAsyncRunner,
) -> None:
    one = await runner.spawn("Echo")
    two = await runner.spawn("Echo")

    assert one["agent_id"] != two["agent_id"]
    assert one["container_id"] != two["container_id"]
    assert [row.name for row in await runner.list_containers()] == ["Echo", "Echo"]


async def test_spawn_raises_conflict_when_agent_id_is_taken(runner: FakeAsyncRunner) -> None:
    await runner.spawn("worker", agent_id="w-1")

    with pytest.raises(errors.Conflict):
        await runner.spawn("worker", agent_id="w-1")


async def test_spawn_adds_extra_env_when_the_runner_has_some(
    tmp_path: Path, runtime: FakeRuntime
) -> None:
    async with FakeAsyncRunner(
        runtime, IMAGE, "http://coordinator:9000", {"MODE": "echo"}, state_dir=tmp_path
    ) as runner:
        spawned = await runner.spawn("worker")
        env = dict(runtime.container_spec(spawned["container_id"]).env)
        assert env["MODE"] == "echo"
        assert env["COORDINATOR_URL"] == "http://coordinator:9000"


async def test_spawn_uses_given_image_when_one_is_named(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1", image=OTHER_IMAGE)

    assert spawned["image"] == OTHER_IMAGE
    assert runtime.container_spec(spawned["container_id"]).image == OTHER_IMAGE


async def test_spawn_raises_and_leaves_nothing_when_image_unavailable(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    with pytest.raises(errors.ContainerError, match="roost-absent"):
        await runner.spawn("worker-1", image="roost-absent:1")

    assert await runner.list_containers() == []
    assert await runtime.list({"roost.instance": runner.instance}) == []


async def test_spawn_raises_config_error_naming_capabilities_when_malformed(
    runner: FakeAsyncRunner,
) -> None:
    with pytest.raises(errors.ConfigError) as raised:
        await runner.spawn("worker", capabilities="a b")

    assert raised.value.key == "capabilities"


async def test_list_containers_describes_each_agent_as_a_record_when_spawned(
    runner: FakeAsyncRunner,
) -> None:
    one = await runner.spawn("worker-1", agent_id="w-1", capabilities="code")
    two = await runner.spawn("worker-2")

    rows = await runner.list_containers()

    assert all(isinstance(row, AgentContainer) for row in rows)
    assert [row.name for row in rows] == ["worker-1", "worker-2"]
    assert rows[0].container_id == one["container_id"]
    assert rows[0].agent_id == "w-1"
    assert rows[0].image == IMAGE
    assert rows[0].state == "running"
    assert rows[0].url == one["url"]
    assert rows[0].capabilities == "code"
    assert rows[1].container_id == two["container_id"]
    assert rows[1].agent_id == two["agent_id"]


async def test_is_running_tells_state_when_asked(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1")
    cid = spawned["container_id"]

    assert await runner.is_running(cid)
    assert await runner.is_running(cid[:12])
    assert not await runner.is_running("0" * 64)
    assert not await runner.is_running("")
    await runtime.pause(cid)
    assert not await runner.is_running(cid)


async def test_is_running_is_false_when_container_belongs_to_another_instance(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")  # starts the engine
    foreign = await runtime.create(
        ContainerSpec(image=IMAGE, labels={"roost.managed": "true", "roost.instance": "other"})
    )
    await runtime.start(foreign)

    assert not await runner.is_running(foreign)


async def test_stop_returns_true_and_removes_container_when_agent_running(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    spawned = await runner.spawn("worker-1", agent_id="w-1")
    cid = spawned["container_id"]

    assert await runner.stop(cid) is True

    with pytest.raises(errors.ContainerNotFound):
        await runtime.inspect(cid)
    assert await runner.list_containers() == []
    assert not await runner.is_running(cid)
    again = await runner.spawn("worker-1", agent_id="w-1")  # the id is free again
    assert again["container_id"] != cid


async def test_stop_returns_false_when_id_unknown(runner: FakeAsyncRunner) -> None:
    await runner.spawn("worker-1")

    assert await runner.stop("f" * 64) is False
    assert await runner.stop("") is False
    assert len(await runner.list_containers()) == 1


async def test_stop_returns_false_when_nothing_was_ever_spawned(runner: FakeAsyncRunner) -> None:
    assert await runner.stop("f" * 64) is False


async def test_stop_returns_false_when_already_stopped(runner: FakeAsyncRunner) -> None:
    spawned = await runner.spawn("worker-1")
    assert await runner.stop(spawned["container_id"]) is True

    assert await runner.stop(spawned["container_id"]) is False


async def test_stop_returns_false_and_keeps_container_when_it_belongs_to_another_instance(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")
    foreign = await runtime.create(
        ContainerSpec(image=IMAGE, labels={"roost.managed": "true", "roost.instance": "other"})
    )

    assert await runner.stop(foreign) is False
    assert (await runtime.inspect(foreign)).id == foreign


async def test_stop_returns_false_when_docker_fails_to_remove(
    runner: FakeAsyncRunner, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = await runner.spawn("worker-1")
    cid = spawned["container_id"]

    async def failing_remove(container_id: str, *, force: bool = True) -> None:
        raise errors.ContainerError(f"cannot remove container {container_id}: driver failed")

    monkeypatch.setattr(runtime, "remove", failing_remove)

    assert await runner.stop(cid) is False  # never a false success
    monkeypatch.setattr(runtime, "remove", FakeRuntime.remove.__get__(runtime))
    assert (await runtime.inspect(cid)).id == cid
    # A retry finds the leftover by its labels and finishes the job.
    assert await runner.stop(cid) is True
    with pytest.raises(errors.ContainerNotFound):
        await runtime.inspect(cid)


async def test_stop_all_returns_count_and_leaves_nothing_behind_when_agents_spawned(
    tmp_path: Path, runtime: FakeRuntime
) -> None:
    runner = FakeAsyncRunner(runtime, network="swarm-net", volume="swarm-data")
    ids = [(await runner.spawn(f"worker-{n}"))["container_id"] for n in range(3)]
    engine = runner.engine
    assert engine is not None
    state_dir = engine.settings.state_path()
    assert state_dir.is_dir()

    assert await runner.stop_all() == 3

    assert await runtime.list({"roost.instance": runner.instance}) == []
    assert "swarm-net" not in runtime.networks
    assert "swarm-data" not in runtime.volumes
    assert not state_dir.exists()
    assert runner.engine is None
    assert await runner.stop_all() == 0  # idempotent
    assert [await runner.is_running(cid) for cid in ids] == [False, False, False]


async def test_stop_all_keeps_network_and_volume_when_another_instance_created_them(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    theirs = {"roost.managed": "true", "roost.instance": "someone-else"}
    await runtime.ensure_network("swarm-net", labels=theirs)
    await runtime.ensure_volume("swarm-data", labels=theirs)
    await runner.spawn("worker")

    assert await runner.stop_all() == 1

    assert runtime.networks["swarm-net"][1] == theirs
    assert runtime.volumes["swarm-data"] == theirs


async def test_spawn_works_again_when_called_after_stop_all(
    runner: FakeAsyncRunner, runtime: FakeRuntime
) -> None:
    await runner.spawn("worker-1")
    await runner.stop_all()

    spawned = await runner.spawn("worker-1")

    assert (await runtime.inspect(spawned["container_id"])).running


# -- the sync face ------------------------------------------------------------------


def _loop_threads(instance: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"roost-{instance}"]


def test_sync_runner_spawns_and_stops_with_plain_calls_when_used_from_a_script(
    runtime: FakeRuntime,
) -> None:
    runner = FakeRunner(runtime)
    info = runner.spawn("Echo", capabilities="summarise,translate")
    assert set(info) >= {"container_id", "agent_id", "name", "image", "capabilities"}
    assert info["name"] == "Echo"
    assert runner.is_running(info["container_id"])
    assert [row.name for row in runner.list_containers()] == ["Echo"]
    assert len(_loop_threads(runner.instance)) == 1

    assert runner.stop(info["container_id"]) is True
    assert runner.stop(info["container_id"]) is False
    assert runner.stop_all() == 0

    assert _loop_threads(runner.instance) == []
    assert runner.stop_all() == 0
    assert runner.list_containers() == []


def test_sync_runner_stops_everything_when_its_with_block_ends(runtime: FakeRuntime) -> None:
    with FakeRunner(runtime, IMAGE, None, {"MODE": "echo"}) as runner:
        runner.spawn("a")
        runner.spawn("b")
        instance = runner.instance

    assert _loop_threads(instance) == []
    assert asyncio.run(runtime.list({"roost.instance": instance})) == []
    assert "roost-swarm" not in runtime.networks


async def test_sync_runner_works_when_called_inside_a_running_event_loop(
    runtime: FakeRuntime,
) -> None:
    runner = FakeRunner(runtime)
    try:
        info = runner.spawn("Echo")  # blocks this loop; the engine runs on its own
        assert runner.is_running(info["container_id"])
    finally:
        assert runner.stop_all() == 1
