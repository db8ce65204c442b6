"""Shared test fixtures: images, a unique Roost instance per test, polling helpers.

Docker tests never skip: CI starts dockerd (scripts/setup), so a missing engine
is a failure, not a reason to pass quietly.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from roost.config import Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
MIMIC_IMAGE = "roost-mimic:latest"
#: mimic with a Docker HEALTHCHECK of its own (see images/build.py).
MIMIC_HEALTHCHECK_IMAGE = "roost-mimic-healthcheck:latest"
BUSYBOX_IMAGE = "roost-busybox:latest"
NGINX_IMAGE = "roost-nginx:latest"


def free_port() -> int:
    """A free TCP port on loopback (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def docker_images() -> dict[str, str]:
    """Build (or find cached) the local test images once per session; each named by
    the tag pinned to this checkout's inputs (``images/build.py``: another checkout
    sharing the engine may rebuild ``:latest`` meanwhile)."""
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-images")], check=True, capture_output=True, text=True
    ).stdout
    pinned = dict(re.findall(r"^([\w.-]+:latest): .* as (\S+)$", built, re.MULTILINE))
    return {
        "mimic": pinned.get(MIMIC_IMAGE, MIMIC_IMAGE),
        "mimic-healthcheck": pinned.get(MIMIC_HEALTHCHECK_IMAGE, MIMIC_HEALTHCHECK_IMAGE),
        "busybox": pinned.get(BUSYBOX_IMAGE, BUSYBOX_IMAGE),
        "nginx": pinned.get(NGINX_IMAGE, NGINX_IMAGE),
    }


@pytest.fixture
def instance() -> Iterator[str]:
    """A fresh Roost instance id; every container carrying it is removed afterwards."""
    name = f"t-{secrets.token_hex(4)}"
    yield name
    remove_instance_containers(name)


def site_port(site: web.TCPSite) -> int:
    """The port a started aiohttp ``TCPSite`` bound (it was asked for port 0)."""
    server = site._server
    assert server is not None, "the site is not started"
    sockets = server.sockets  # type: ignore[attr-defined]  # an asyncio.Server
    port: int = sockets[0].getsockname()[1]
    return port


def docker(*args: str, check: bool = True) -> str:
    """Run the docker CLI (a test's independent view of the engine); return stdout."""
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check
    ).stdout.strip()


def instance_containers(instance: str) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label=roost.instance={instance}", check=False).split()


def remove_instance_containers(instance: str) -> None:
    ids = instance_containers(instance)
    if ids:
        docker("rm", "-f", *ids, check=False)


def make_settings(
    tmp_path: Path,
    instance: str,
    *,
    agents: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Settings:
    document: dict[str, Any] = {
        # The agent listener on any free port: tests never collide on 7076 (a test
        # that restarts Roost under adopted containers pins a port of its own).
        "server": {
            "state_dir": str(tmp_path / "state"),
            "agent_listen": ":0",
            **sections.pop("server", {}),
        },
        "docker": {"instance": instance, **sections.pop("docker", {})},
        "defaults": {
            "memory": "128m",
            "startup_timeout": 30,
            "stop_timeout": 2,
            "restart_backoff": 0.05,
            **(defaults or {}),
        },
        "agents": agents or {},
        **sections,
    }
    return parse_settings(document, file=str(tmp_path / "roost.toml"), base_dir=tmp_path)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def docker_inspect(container_id: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "inspect", container_id], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out)[0]
    return result


def container_exists(container_id: str) -> bool:
    return (
        subprocess.run(
            ["docker", "inspect", container_id], capture_output=True, check=False
        ).returncode
        == 0
    )


class WebhookReceiver:
    """A real HTTP server that records JSON POSTs (the admin's webhook)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site_port(site)}/hook"

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r.get("kind") == kind]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()
