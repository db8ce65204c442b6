"""The Docker adapter against a daemon that stops: what Roost can tell, and when.

dockerd, told to stop, closes its listener first and then stops its containers
(up to their stop timeout: 10 s for one that ignores SIGTERM), answering all
the while on the connections already open. ``DockerRuntime.ping`` asks on a new
connection, so it reports the engine unavailable from the first moment, while a
call on a pooled connection still answers (which is how Roost once counted the
start failures of a stopping daemon against ``max_restarts``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from roost import errors
from roost.adapters.docker_runtime import DockerRuntime
from roost.ports.runtime import ContainerSpec
from tests.conftest import MIMIC_IMAGE, wait_until

from .conftest import PrivateDockerd

pytestmark = pytest.mark.faults

LABELS = {"roost.managed": "true", "roost.instance": "fault-ping"}


@pytest.fixture
async def runtime(private_dockerd: PrivateDockerd) -> AsyncIterator[DockerRuntime]:
    runtime = DockerRuntime(private_dockerd.docker_host)
    try:
        yield runtime
    finally:
        await runtime.close()


async def _unreachable(runtime: DockerRuntime) -> bool:
    try:
        await runtime.ping()
    except errors.DockerUnavailable:
        return True
    return False


async def test_ping_reports_the_engine_gone_while_a_stopping_daemon_still_serves_open_connections(
    private_dockerd: PrivateDockerd, runtime: DockerRuntime
) -> None:
    # A container that ignores SIGTERM keeps the daemon's shutdown going ~10 s.
    container = await runtime.create(
        ContainerSpec(image=MIMIC_IMAGE, labels=LABELS, env={"IGNORE_SIGTERM": "1"})
    )
    await runtime.start(container)
    assert await runtime.list(LABELS)  # a pooled connection, kept alive

    stopping = asyncio.create_task(private_dockerd.stop(), name="stop the private dockerd")
    try:
        await wait_until(lambda: _unreachable(runtime), timeout=30, what="ping to fail")
        # Meanwhile the open connection is still served: only ping could tell.
        listed = await runtime.list(LABELS)
        assert [c.id for c in listed] == [container]
        assert not stopping.done(), "the daemon stopped before the window could be seen"
    finally:
        await stopping
    assert await _unreachable(runtime)
