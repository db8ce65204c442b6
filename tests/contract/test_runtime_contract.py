"""The ContainerRuntime contract, run against FakeRuntime and DockerRuntime alike.

Every test here takes the parametrized ``harness`` (or ``runtime``) fixture, so a
behaviour the fake shows is a behaviour Docker shows: the fake cannot lie. The
few tests at the end that take neither check one backend's own hooks or
failure modes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from roost import errors
from roost.adapters import docker_runtime
from roost.adapters.docker_runtime import DockerRuntime
from roost.core.records import SessionHealth
from roost.ports.runtime import ContainerRuntime, ContainerSpec, RuntimeEvent
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import free_port

from .conftest import CRASH_EXIT_CODE, Harness, eventually, watching

MIB = 1024 * 1024


def _absent_image() -> str:
    return f"roost-contract-absent-{secrets.token_hex(4)}:latest"


def _is(kind: str, container_id: str) -> Callable[[RuntimeEvent], bool]:
    return lambda event: event.kind == kind and event.container_id == container_id


# -- engine and images ----------------------------------------------------------------


async def test_ping_returns_api_version_when_engine_answers(runtime: ContainerRuntime) -> None:
    assert re.fullmatch(r"\d+\.\d+", await runtime.ping())


async def test_ensure_image_returns_when_image_present(harness: Harness) -> None:
    await harness.runtime.ensure_image(harness.image)

    assert await harness.runtime.image_exists(harness.image)


async def test_ensure_image_raises_image_unavailable_when_absent_and_unpullable(
    runtime: ContainerRuntime,
) -> None:
    image = _absent_image()

    with pytest.raises(errors.ImageUnavailable) as raised:
        await runtime.ensure_image(image, pull_timeout=30.0)

    message = str(raised.value)
    assert image in message
    assert "not present" in message
    assert "could not be pulled" in message
    assert not await runtime.image_exists(image)


async def test_ensure_image_fails_every_caller_when_concurrent_pulls_fail(
    runtime: ContainerRuntime,
) -> None:
    image = _absent_image()

    results = await asyncio.gather(
        *(runtime.ensure_image(image, pull_timeout=30.0) for _ in range(3)),
        return_exceptions=True,
    )

    assert all(isinstance(result, errors.ImageUnavailable) for result in results), results


async def test_image_size_raises_not_found_when_image_absent(runtime: ContainerRuntime) -> None:
    with pytest.raises(errors.ContainerNotFound):
        await runtime.image_size(_absent_image())


async def test_remove_image_is_noop_when_image_absent(runtime: ContainerRuntime) -> None:
    await runtime.remove_image(_absent_image())


# -- create ---------------------------------------------------------------------------


async def test_create_carries_labels_env_and_limits_when_spec_sets_them(harness: Harness) -> None:
    spec = harness.spec(
        labels={**harness.labels, "roost.agent": "echo"},
        env={"GREETING": "hello", "MODE": "echo"},
        memory=64 * MIB,
        pids_limit=64,
        cpus=0.5,
    )

    container_id = await harness.runtime.create(spec)
    state = await harness.runtime.inspect(container_id)
    limits = await harness.limits(container_id)

    assert state.id == container_id
    assert state.status == "created"
    assert not state.running
    assert state.exit is None
    assert state.image == harness.image
    assert state.labels["roost.agent"] == "echo"
    assert state.labels["roost.instance"] == harness.instance
    assert {"GREETING=hello", "MODE=echo"} <= set(state.env)
    assert limits.memory == 64 * MIB
    assert limits.memory_swap == 64 * MIB  # no swap
    assert limits.pids_limit == 64
    assert limits.nano_cpus == 500_000_000
    assert limits.no_new_privileges


async def test_create_raises_image_unavailable_when_image_absent(harness: Harness) -> None:
    image = _absent_image()

    with pytest.raises(errors.ImageUnavailable, match=re.escape(image)):
        await harness.runtime.create(harness.spec(image=image))


async def test_create_raises_conflict_when_name_taken(harness: Harness) -> None:
    name = f"{harness.instance}-taken"
    await harness.runtime.create(harness.spec(name=name))

    with pytest.raises(errors.Conflict):
        await harness.runtime.create(harness.spec(name=name))

    assert len(await harness.runtime.list(harness.labels)) == 1


# -- lifecycle ------------------------------------------------------------------------


async def test_start_runs_container_and_publishes_port_when_spec_has_port(
    harness: Harness,
) -> None:
    container_id = await harness.started(port=8000)

    state = await harness.runtime.inspect(container_id)

    assert state.status == "running"
    assert state.running
    assert not state.paused
    assert state.exit is None
    assert state.health is SessionHealth.UNKNOWN  # readiness is probed over HTTP
    assert state.started_at
    assert state.host_ip == "127.0.0.1"
    assert isinstance(state.host_port, int)
    assert state.host_port > 0
    assert state.ip_address


async def test_start_publishes_fixed_host_port_when_spec_names_one(harness: Harness) -> None:
    host_port = free_port()

    container_id = await harness.started(port=8000, host_port=host_port)
    state = await harness.runtime.inspect(container_id)

    assert (state.host_ip, state.host_port) == ("127.0.0.1", host_port)


async def test_start_raises_container_error_naming_port_when_host_port_taken(
    harness: Harness,
) -> None:
    host_port = free_port()
    await harness.started(port=8000, host_port=host_port)
    second = await harness.runtime.create(harness.spec(port=8000, host_port=host_port))

    with pytest.raises(errors.ContainerError) as raised:
        await harness.runtime.start(second)

    assert f"127.0.0.1:{host_port} is already in use" in str(raised.value)
    state = await harness.runtime.inspect(second)
    assert (state.status, state.running) == ("created", False)


async def test_start_is_noop_when_container_running(harness: Harness) -> None:
    container_id = await harness.started()

    await harness.runtime.start(container_id)

    assert (await harness.runtime.inspect(container_id)).status == "running"


async def test_pause_and_unpause_toggle_status_when_running(harness: Harness) -> None:
    container_id = await harness.started()

    await harness.runtime.pause(container_id)
    paused = await harness.runtime.inspect(container_id)
    await harness.runtime.unpause(container_id)
    resumed = await harness.runtime.inspect(container_id)

    assert (paused.status, paused.running, paused.paused) == ("paused", True, True)
    assert paused.exit is None
    assert (resumed.status, resumed.running, resumed.paused) == ("running", True, False)


async def test_pause_raises_container_error_when_not_running(harness: Harness) -> None:
    container_id = await harness.runtime.create(harness.spec())

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.pause(container_id)
    assert caught.value.status == 409  # Docker's HTTP status


async def test_pause_raises_container_error_when_already_paused(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.pause(container_id)

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.pause(container_id)
    assert caught.value.status == 409  # Docker's HTTP status


async def test_unpause_raises_container_error_when_not_paused(harness: Harness) -> None:
    container_id = await harness.started()

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.unpause(container_id)
    assert caught.value.status == 500  # Docker's HTTP status


async def test_start_raises_container_error_when_paused(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.pause(container_id)

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.start(container_id)
    assert caught.value.status == 409  # Docker's HTTP status


async def test_stop_exits_with_exit_info_when_running(harness: Harness) -> None:
    container_id = await harness.started(port=8000)

    await harness.runtime.stop(container_id, grace=5.0)
    state = await harness.runtime.inspect(container_id)

    assert state.status == "exited"
    assert not state.running
    assert state.exit is not None
    assert state.exit.exit_code == 0  # the process handled SIGTERM
    assert not state.exit.oom_killed
    assert state.exit.finished_at
    assert state.host_port is None


async def test_stop_exits_when_paused(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.pause(container_id)

    await harness.runtime.stop(container_id, grace=5.0)
    state = await harness.runtime.inspect(container_id)

    assert state.status == "exited"
    assert state.exit is not None
    assert state.exit.exit_code == 0


async def test_stop_is_noop_when_container_already_exited(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.stop(container_id, grace=5.0)

    await harness.runtime.stop(container_id, grace=5.0)

    assert (await harness.runtime.inspect(container_id)).status == "exited"


async def test_kill_exits_with_137_when_running(harness: Harness) -> None:
    container_id = await harness.started()

    await harness.runtime.kill(container_id)
    state = await harness.runtime.inspect(container_id)

    assert state.status == "exited"
    assert state.exit is not None
    assert state.exit.exit_code == 137
    assert not state.exit.oom_killed


async def test_kill_raises_container_error_when_not_running(harness: Harness) -> None:
    container_id = await harness.runtime.create(harness.spec())

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.kill(container_id)
    assert caught.value.status == 409  # Docker's HTTP status


async def test_restart_after_exit_runs_again_when_started(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.kill(container_id)

    await harness.runtime.start(container_id)
    state = await harness.runtime.inspect(container_id)

    assert state.status == "running"
    assert state.exit is None


async def test_remove_deletes_container_when_running(harness: Harness) -> None:
    container_id = await harness.started()

    await harness.runtime.remove(container_id)

    with pytest.raises(errors.ContainerNotFound):
        await harness.runtime.inspect(container_id)
    assert await harness.runtime.list(harness.labels) == []


async def test_remove_raises_container_error_when_running_and_not_forced(
    harness: Harness,
) -> None:
    container_id = await harness.started()

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.remove(container_id, force=False)
    assert caught.value.status == 409  # Docker's HTTP status

    assert (await harness.runtime.inspect(container_id)).running


async def test_stop_and_remove_are_noops_when_container_gone(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.remove(container_id)

    await harness.runtime.stop(container_id, grace=1.0)
    await harness.runtime.remove(container_id)

    with pytest.raises(errors.ContainerNotFound):
        await harness.runtime.inspect(container_id)


@pytest.mark.parametrize(
    "operation", ["inspect", "start", "pause", "unpause", "kill", "wait", "logs_tail", "logs"]
)
async def test_operation_raises_container_not_found_when_container_unknown(
    runtime: ContainerRuntime, operation: str
) -> None:
    unknown = secrets.token_hex(32)

    async def call() -> object:
        if operation == "logs":
            return [chunk async for chunk in runtime.logs(unknown)]
        return await getattr(runtime, operation)(unknown)

    with pytest.raises(errors.ContainerNotFound):
        await call()


# -- wait, logs, list -----------------------------------------------------------------


async def test_wait_returns_exit_code_when_container_crashes(harness: Harness) -> None:
    container_id = await harness.started()
    waiting = asyncio.create_task(harness.runtime.wait(container_id))

    await harness.crash(container_id)

    async with asyncio.timeout(15):
        assert await waiting == CRASH_EXIT_CODE


async def test_wait_returns_at_once_when_container_already_exited(harness: Harness) -> None:
    container_id = await harness.started()
    await harness.runtime.kill(container_id)

    async with asyncio.timeout(15):
        assert await harness.runtime.wait(container_id) == 137


async def test_logs_tail_returns_last_lines_when_container_printed(harness: Harness) -> None:
    container_id = await harness.started_printing(["one", "two", "three"])

    tail = await eventually(
        lambda: harness.runtime.logs_tail(container_id, lines=2),
        lambda text: text.count("\n") == 2,
    )

    assert tail.splitlines() == ["two", "three"]


async def test_logs_give_the_last_lines_when_asked_without_follow(harness: Harness) -> None:
    container_id = await harness.started_printing(["one", "two", "three"])
    await eventually(
        lambda: harness.runtime.logs_tail(container_id, lines=3),
        lambda text: text.count("\n") == 3,
    )

    text = "".join([chunk async for chunk in harness.runtime.logs(container_id, tail=2)])
    everything = "".join([chunk async for chunk in harness.runtime.logs(container_id)])

    assert text.splitlines() == ["two", "three"]
    assert everything.splitlines() == ["one", "two", "three"]


async def test_followed_logs_end_when_the_container_stops(harness: Harness) -> None:
    container_id = await harness.started_printing(["first"])
    await eventually(
        lambda: harness.runtime.logs_tail(container_id, lines=1),
        lambda text: text.strip() == "first",
    )
    seen: list[str] = []

    async def follow() -> None:
        async for chunk in harness.runtime.logs(container_id, follow=True, tail=10):
            seen.append(chunk)

    following = asyncio.create_task(follow())
    await eventually(lambda: _joined(seen), lambda text: "first" in text)
    await harness.crash(container_id)
    async with asyncio.timeout(15):
        await following  # ends on its own once the container is gone
    assert "first" in "".join(seen)


async def _joined(chunks: list[str]) -> str:
    return "".join(chunks)


async def test_list_returns_only_containers_carrying_all_labels(harness: Harness) -> None:
    wanted = {**harness.labels, "roost.agent": "alpha"}
    alpha = await harness.runtime.create(harness.spec(labels=wanted))
    beta = await harness.runtime.create(
        harness.spec(labels={**harness.labels, "roost.agent": "beta"})
    )
    await harness.runtime.start(beta)

    only_alpha = await harness.runtime.list(wanted)
    both = await harness.runtime.list(harness.labels)

    assert [info.id for info in only_alpha] == [alpha]
    assert only_alpha[0].labels["roost.agent"] == "alpha"
    assert only_alpha[0].status == "created"
    assert only_alpha[0].image == harness.image
    assert only_alpha[0].name
    assert {info.id: info.status for info in both} == {alpha: "created", beta: "running"}


# -- events ---------------------------------------------------------------------------


async def test_events_report_die_with_exit_code_when_container_crashes(harness: Harness) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        container_id = await harness.started()
        await harness.crash(container_id)

        died = await watch.until(_is("die", container_id))

    assert died.exit_code == CRASH_EXIT_CODE
    assert died.labels["roost.instance"] == harness.instance
    assert died.time > 0
    kinds = watch.kinds(container_id)
    assert kinds.index("create") < kinds.index("start") < kinds.index("die")


async def test_events_report_kill_die_stop_when_container_stopped(harness: Harness) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        container_id = await harness.started()
        await harness.runtime.stop(container_id, grace=5.0)

        await watch.until(_is("stop", container_id))

    kinds = [k for k in watch.kinds(container_id) if k in ("kill", "die", "stop")]
    assert kinds == ["kill", "die", "stop"]
    died = next(e for e in watch.seen if e.kind == "die")
    assert died.exit_code == 0


async def test_events_report_pause_unpause_kill_die_destroy_in_order(harness: Harness) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        container_id = await harness.started()
        await harness.runtime.pause(container_id)
        await harness.runtime.unpause(container_id)
        await harness.runtime.kill(container_id)
        await harness.runtime.remove(container_id)

        await watch.until(_is("destroy", container_id))

    assert watch.kinds(container_id) == [
        "create",
        "start",
        "pause",
        "unpause",
        "kill",
        "die",
        "destroy",
    ]
    assert next(e for e in watch.seen if e.kind == "die").exit_code == 137


async def test_events_report_only_the_kinds_asked_for(harness: Harness) -> None:
    async with watching(
        harness.runtime, harness.labels, kinds=frozenset({"die", "destroy"})
    ) as watch:
        container_id = await harness.started()
        await harness.runtime.pause(container_id)
        await harness.runtime.unpause(container_id)
        await harness.runtime.kill(container_id)
        await harness.runtime.remove(container_id)

        await watch.until(_is("destroy", container_id))

    assert watch.kinds(container_id) == ["die", "destroy"]
    assert next(e for e in watch.seen if e.kind == "die").exit_code == 137


async def test_events_report_health_status_when_asked_for_by_kind(harness: Harness) -> None:
    # Docker's Action is "health_status: unhealthy"; the kind asked for is the part
    # before the colon.
    async with watching(
        harness.runtime, harness.labels, kinds=frozenset({"health_status"})
    ) as watch:
        container_id = await harness.started_unhealthy()

        reported = await watch.until(_is("health_status", container_id))

    assert reported.health is SessionHealth.UNHEALTHY
    assert watch.kinds(container_id) == ["health_status"] * len(watch.kinds(container_id))


async def test_events_exclude_containers_when_labels_differ(harness: Harness) -> None:
    mine = {**harness.labels, "roost.agent": "mine"}
    async with watching(harness.runtime, mine) as watch:
        other = await harness.started(labels={**harness.labels, "roost.agent": "other"})
        container_id = await harness.started(labels=mine)

        await watch.until(_is("start", container_id))

    assert other not in {event.container_id for event in watch.seen}


async def test_events_report_oom_then_die_when_memory_limit_exceeded(harness: Harness) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        container_id = await harness.started_out_of_memory()

        died = await watch.until(_is("die", container_id))
    state = await harness.runtime.inspect(container_id)

    assert "oom" in watch.kinds(container_id)
    assert died.exit_code == 137
    assert state.exit is not None
    assert state.exit.oom_killed
    assert state.exit.exit_code == 137


async def test_events_report_health_status_when_image_healthcheck_fails(
    harness: Harness,
) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        container_id = await harness.started_unhealthy()

        reported = await watch.until(_is("health_status", container_id))

    assert reported.health is SessionHealth.UNHEALTHY
    assert reported.labels["roost.instance"] == harness.instance
    state = await harness.runtime.inspect(container_id)
    assert state.running
    assert state.health is SessionHealth.UNHEALTHY


async def test_events_yield_gap_then_continue_when_stream_reconnects(harness: Harness) -> None:
    async with watching(harness.runtime, harness.labels) as watch:
        first = await harness.runtime.create(harness.spec())
        await watch.until(_is("create", first))

        await harness.sever_event_streams()
        second = await harness.runtime.create(harness.spec())

        await watch.until(_is("create", second))

    kinds = [(e.kind, e.container_id) for e in watch.seen]
    assert ("gap", "") in kinds
    assert kinds.count(("create", first)) == 1  # not replayed after the reconnect
    assert kinds.count(("create", second)) == 1


async def test_events_reader_stops_when_consumer_cancelled(harness: Harness) -> None:
    stream = harness.runtime.events(harness.labels)
    first_event: asyncio.Future[RuntimeEvent] = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        async for event in stream:
            if not first_event.done():
                first_event.set_result(event)

    consumer = asyncio.create_task(consume())
    await harness.runtime.create(harness.spec())
    async with asyncio.timeout(15):
        await first_event
    consumer.cancel()
    await asyncio.wait([consumer])

    leftovers = [t for t in asyncio.all_tasks() if "events" in t.get_name()]
    assert consumer.cancelled()
    assert leftovers == []
    assert await harness.runtime.ping()


# -- commit ---------------------------------------------------------------------------


async def test_commit_creates_image_with_labels_and_scrubbed_env(harness: Harness) -> None:
    container_id = await harness.started(env={"SECRET": "s3cr3t", "KEEP": "1"})
    before = await harness.runtime.inspect(container_id)
    scrubbed = tuple(entry for entry in before.env if not entry.startswith("SECRET="))
    repository, tag = harness.snapshot_reference()

    image_id = await harness.runtime.commit(
        container_id,
        repository=repository,
        tag=tag,
        labels={"roost.snapshot": "yes"},
        env=scrubbed,
    )
    reference = f"{repository}:{tag}"
    from_snapshot = await harness.runtime.create(harness.spec(image=reference))
    state = await harness.runtime.inspect(from_snapshot)

    assert image_id.startswith("sha256:")
    assert await harness.runtime.image_exists(reference)
    assert await harness.runtime.image_size(reference) > 0
    assert state.labels["roost.snapshot"] == "yes"
    assert "KEEP=1" in state.env
    assert not any(entry.startswith("SECRET=s3cr3t") for entry in state.env)
    assert "SECRET=" in state.env  # Docker keeps the key; its value is gone


async def test_remove_image_raises_container_error_when_image_in_use(harness: Harness) -> None:
    container_id = await harness.started()
    repository, tag = harness.snapshot_reference()
    await harness.runtime.commit(container_id, repository=repository, tag=tag, labels={})
    reference = f"{repository}:{tag}"
    user = await harness.runtime.create(harness.spec(image=reference))

    with pytest.raises(errors.ContainerError) as caught:
        await harness.runtime.remove_image(reference)
    assert caught.value.status == 409  # Docker's HTTP status

    await harness.runtime.remove(user)
    await harness.runtime.remove_image(reference)
    assert not await harness.runtime.image_exists(reference)


# -- networks and volumes --------------------------------------------------------------


async def test_ensure_network_creates_labelled_network_when_absent(harness: Harness) -> None:
    name = f"{harness.instance}-net"
    assert await harness.network_labels(name) is None

    network_id = await harness.runtime.ensure_network(name, labels=harness.labels)

    assert re.fullmatch(r"[0-9a-f]{64}", network_id)
    assert await harness.network_labels(name) == harness.labels


async def test_ensure_network_keeps_existing_network_when_present(harness: Harness) -> None:
    name = f"{harness.instance}-net"
    first = await harness.runtime.ensure_network(name, labels=harness.labels)

    again = await harness.runtime.ensure_network(name, labels={**harness.labels, "other": "x"})

    assert again == first
    assert await harness.network_labels(name) == harness.labels


async def test_ensure_network_makes_one_network_when_called_concurrently(
    harness: Harness,
) -> None:
    name = f"{harness.instance}-net"

    ids = await asyncio.gather(
        *(harness.runtime.ensure_network(name, labels=harness.labels) for _ in range(4))
    )

    assert len(set(ids)) == 1


async def test_ensure_network_returns_predefined_network_when_name_is_bridge(
    harness: Harness,
) -> None:
    network_id = await harness.runtime.ensure_network("bridge", labels=harness.labels)

    assert re.fullmatch(r"[0-9a-f]{64}", network_id)
    assert await harness.network_labels("bridge") == {}


async def test_start_attaches_network_and_publishes_port_when_spec_names_network(
    harness: Harness,
) -> None:
    name = f"{harness.instance}-net"
    await harness.runtime.ensure_network(name, labels=harness.labels)

    container_id = await harness.started(network=name, port=8000)
    state = await harness.runtime.inspect(container_id)

    assert await harness.networks_of(container_id) == [name]
    assert state.host_port is not None
    assert state.host_ip == "127.0.0.1"
    assert state.ip_address is not None


async def test_ensure_network_turns_inter_container_traffic_off_when_isolated(
    harness: Harness,
) -> None:
    isolated, open_ = f"{harness.instance}-iso", f"{harness.instance}-open"

    await harness.runtime.ensure_network(isolated, labels=harness.labels, isolated=True)
    await harness.runtime.ensure_network(open_, labels=harness.labels)

    assert await harness.network_isolated(isolated)
    assert not await harness.network_isolated(open_)


async def test_network_gateway_is_an_ipv4_address_when_network_is_a_bridge(
    harness: Harness,
) -> None:
    name = f"{harness.instance}-net"
    await harness.runtime.ensure_network(name, labels=harness.labels, isolated=True)

    for network in (name, "bridge"):
        gateway = await harness.runtime.network_gateway(network)
        assert gateway is not None
        assert ipaddress.ip_address(gateway).version == 4
    assert await harness.runtime.network_gateway("host") is None
    with pytest.raises(errors.ContainerNotFound):
        await harness.runtime.network_gateway(f"{harness.instance}-absent")


async def test_ensure_volume_creates_labelled_volume_when_absent(harness: Harness) -> None:
    name = f"{harness.instance}-vol"
    assert await harness.volume_labels(name) is None

    created = await harness.runtime.ensure_volume(name, labels=harness.labels)

    assert created == name
    assert await harness.volume_labels(name) == harness.labels


async def test_ensure_volume_keeps_existing_volume_when_present(harness: Harness) -> None:
    name = f"{harness.instance}-vol"
    await harness.runtime.ensure_volume(name, labels=harness.labels)

    again = await harness.runtime.ensure_volume(name, labels={**harness.labels, "other": "x"})

    assert again == name
    assert await harness.volume_labels(name) == harness.labels


async def test_remove_network_removes_it_when_it_carries_the_labels(harness: Harness) -> None:
    name = f"{harness.instance}-net"
    await harness.runtime.ensure_network(name, labels=harness.labels)

    assert await harness.runtime.remove_network(name, labels=harness.labels) is True

    assert await harness.network_labels(name) is None
    assert await harness.runtime.remove_network(name, labels=harness.labels) is False


async def test_remove_network_keeps_it_when_labels_differ(harness: Harness) -> None:
    name = f"{harness.instance}-net"
    await harness.runtime.ensure_network(name, labels=harness.labels)
    other = {**harness.labels, "roost.instance": "someone-else"}

    assert await harness.runtime.remove_network(name, labels=other) is False
    assert await harness.runtime.remove_network("bridge", labels=harness.labels) is False

    assert await harness.network_labels(name) == harness.labels


async def test_remove_network_raises_container_error_when_a_running_container_uses_it(
    harness: Harness,
) -> None:
    name = f"{harness.instance}-net"
    await harness.runtime.ensure_network(name, labels=harness.labels)
    await harness.started(network=name)

    with pytest.raises(errors.ContainerError):
        await harness.runtime.remove_network(name, labels=harness.labels)

    assert await harness.network_labels(name) == harness.labels


async def test_remove_volume_removes_it_when_it_carries_the_labels(harness: Harness) -> None:
    name = f"{harness.instance}-vol"
    await harness.runtime.ensure_volume(name, labels=harness.labels)

    assert await harness.runtime.remove_volume(name, labels=harness.labels) is True

    assert await harness.volume_labels(name) is None
    assert await harness.runtime.remove_volume(name, labels=harness.labels) is False


async def test_remove_volume_keeps_it_when_labels_differ(harness: Harness) -> None:
    name = f"{harness.instance}-vol"
    await harness.runtime.ensure_volume(name, labels=harness.labels)

    other = {**harness.labels, "roost.instance": "someone-else"}
    assert await harness.runtime.remove_volume(name, labels=other) is False

    assert await harness.volume_labels(name) == harness.labels


async def test_remove_volume_raises_container_error_when_a_container_mounts_it(
    harness: Harness,
) -> None:
    name = f"{harness.instance}-vol"
    await harness.runtime.ensure_volume(name, labels=harness.labels)
    await harness.runtime.create(harness.spec(binds=(f"{name}:/data",)))

    with pytest.raises(errors.ContainerError):
        await harness.runtime.remove_volume(name, labels=harness.labels)

    assert await harness.volume_labels(name) == harness.labels


# -- one backend's own behaviour -------------------------------------------------------


async def test_docker_runtime_raises_docker_unavailable_when_socket_missing(
    tmp_path: Path,
) -> None:
    runtime = DockerRuntime(f"unix://{tmp_path}/no-docker.sock")
    try:
        with pytest.raises(errors.DockerUnavailable):
            await runtime.ping()
        with pytest.raises(errors.DockerUnavailable):
            await runtime.inspect("anything")
    finally:
        await runtime.close()


def test_docker_address_prefers_run_then_var_run_socket_when_no_host_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    run, var_run = tmp_path / "run.sock", tmp_path / "var-run.sock"
    monkeypatch.setattr(docker_runtime, "_DEFAULT_SOCKETS", (run, var_run))
    assert docker_runtime.docker_address() == f"unix://{var_run}"  # none: the usual place

    with socket.socket(socket.AF_UNIX) as second:
        second.bind(str(var_run))
        assert docker_runtime.docker_address() == f"unix://{var_run}"
        with socket.socket(socket.AF_UNIX) as first:
            first.bind(str(run))
            assert docker_runtime.docker_address() == f"unix://{run}"
            monkeypatch.setenv("DOCKER_HOST", "tcp://docker.example:2375")
            assert docker_runtime.docker_address() == "tcp://docker.example:2375"
            assert docker_runtime.docker_address("unix:///given.sock") == "unix:///given.sock"


def test_check_reachable_raises_docker_unavailable_naming_the_address_when_nothing_answers(
    tmp_path: Path,
) -> None:
    address = f"unix://{tmp_path}/no-docker.sock"

    with pytest.raises(errors.DockerUnavailable, match=re.escape(address)):
        docker_runtime.check_reachable(address)


@pytest.mark.docker
def test_check_reachable_returns_the_address_when_docker_answers() -> None:
    assert docker_runtime.check_reachable() == docker_runtime.docker_address()


async def test_fake_ensure_image_pulls_when_image_pullable() -> None:
    fake = FakeRuntime(pullable={"roost-mimic"})

    await fake.ensure_image("roost-mimic:latest")

    assert await fake.image_exists("roost-mimic")
    assert ("ensure_image", "roost-mimic:latest") in fake.calls


async def test_fake_records_calls_when_operations_run() -> None:
    fake = FakeRuntime(images={"busybox"})
    container_id = await fake.create(
        ContainerSpec(image="busybox", labels={"roost.managed": "true"})
    )
    await fake.start(container_id)
    await fake.stop(container_id, grace=1.0)

    assert fake.calls == [
        ("create", container_id),
        ("start", container_id),
        ("stop", container_id),
    ]


async def test_fake_crash_raises_when_container_not_running() -> None:
    fake = FakeRuntime(images={"busybox"})
    container_id = await fake.create(ContainerSpec(image="busybox", labels={}))

    with pytest.raises(errors.ContainerError):
        fake.crash(container_id)
