"""The fault fixtures do what fault tests rely on (a real private dockerd, a real tmpfs).

- stopping the private daemon makes its API unreachable, starting it brings
  the same data root back; without ``--live-restore`` the daemon's stop ended
  the container (SIGTERM: the mimic exits 0);
- with ``--live-restore`` a container keeps running and answering the host
  while its daemon is killed (SIGKILL, a crash) and is the same process when
  the daemon is back;
- the small tmpfs fills up: writes then fail with ENOSPC.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError

from tests.conftest import MIMIC_IMAGE, wait_until

from .conftest import PrivateDockerd, fill

pytestmark = pytest.mark.faults

MIMIC_PORT = 8000
READY_TIMEOUT = 30.0


@pytest.fixture
async def docker(private_dockerd: PrivateDockerd) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=private_dockerd.docker_host)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def docker_live_restore(
    private_dockerd_live_restore: PrivateDockerd,
) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=private_dockerd_live_restore.docker_host)
    try:
        yield client
    finally:
        await client.close()


async def run_mimic(docker: aiodocker.Docker) -> tuple[str, str]:
    """Start a mimic container; return its id and its address on the private bridge."""
    container = await docker.containers.run({"Image": MIMIC_IMAGE})
    info: dict[str, Any] = await container.show()
    return container.id, info["NetworkSettings"]["IPAddress"]


async def healthy(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_api_comes_back_with_the_data_root_when_the_daemon_restarts(
    private_dockerd: PrivateDockerd, docker: aiodocker.Docker
) -> None:
    container_id, address = await run_mimic(docker)
    # Answering means its SIGTERM handler is in place (as PID 1 it ignores
    # SIGTERM before that, and the daemon's stop would SIGKILL it after 10 s).
    url = f"http://{address}:{MIMIC_PORT}/health"
    await wait_until(lambda: healthy(url), timeout=READY_TIMEOUT, what=f"GET {url}")

    await private_dockerd.stop()

    assert (await private_dockerd.status())["state"] == "stopped"
    with pytest.raises((aiohttp.ClientConnectionError, DockerError)):
        await docker.system.info()

    await private_dockerd.start()

    state = (await (await docker.containers.get(container_id)).show())["State"]
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 0


async def test_container_keeps_serving_when_a_live_restore_daemon_is_killed(
    private_dockerd_live_restore: PrivateDockerd, docker_live_restore: aiodocker.Docker
) -> None:
    container_id, address = await run_mimic(docker_live_restore)
    url = f"http://{address}:{MIMIC_PORT}/health"
    await wait_until(lambda: healthy(url), timeout=READY_TIMEOUT, what=f"GET {url}")
    pid = (await (await docker_live_restore.containers.get(container_id)).show())["State"]["Pid"]

    await private_dockerd_live_restore.stop(kill=True)

    assert await healthy(url)
    await private_dockerd_live_restore.start()
    state = (await (await docker_live_restore.containers.get(container_id)).show())["State"]
    assert state["Running"] is True
    assert state["Pid"] == pid


def test_writes_fail_with_enospc_when_the_small_tmpfs_is_full(small_tmpfs: Path) -> None:
    written = fill(small_tmpfs)

    assert 0 < written <= 2 * 1024 * 1024
    with pytest.raises(OSError, match="No space left") as raised:
        (small_tmpfs / "one-more").write_bytes(b"x" * 4096)
    assert raised.value.errno == errno.ENOSPC
