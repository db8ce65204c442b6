"""``roost up`` as a real process, for the kill tests: start it, see it answer,
SIGKILL it, and look at a container with the ``docker`` CLI (not through Roost)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT

__all__ = ["answers_health", "docker_state", "roost_process"]


@contextlib.asynccontextmanager
async def roost_process(
    config: Path, log: Path, *, stop_timeout: float = 30
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``roost --config CONFIG up``, its output appended to ``log``; stopped with
    SIGTERM on exit unless the test killed it (SIGKILL after ``stop_timeout``)."""
    roost = Path(sys.executable).parent / "roost"
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            str(roost),
            "--config",
            str(config),
            "up",
            stdout=output,
            stderr=output,
            cwd=str(ROOT),
            env={**os.environ, "ROOST_TOKEN": ""},
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(stop_timeout):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def answers_health(client: httpx.AsyncClient) -> bool:
    """Whether the daemon behind ``client`` answers ``/healthz`` with 200."""
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def docker_state(container: str) -> dict[str, Any]:
    """``State`` of ``docker inspect CONTAINER``; the container must exist."""
    process = await asyncio.create_subprocess_exec(
        "docker", "inspect", container, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, f"container {container} is gone"
    state: dict[str, Any] = json.loads(out)[0]["State"]
    return state
