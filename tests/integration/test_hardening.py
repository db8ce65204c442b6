"""Hardened containers by default, seen from inside a real container: capabilities
dropped (NET_RAW gone, the small documented set kept), a private cgroup namespace,
and, when asked for, a read-only root filesystem and another user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.config.agents import DEFAULT_CAP_ADD
from roost.engine import Engine
from tests.conftest import make_settings

pytestmark = pytest.mark.docker

#: Bit numbers of Linux capabilities (include/uapi/linux/capability.h).
CAP_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "NET_BIND_SERVICE": 10,
    "NET_RAW": 13,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
}


async def ask(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url + "/messages", json=body)


async def read(url: str, path: str) -> str:
    response = await ask(url, {"cmd": "read_file", "path": path})
    assert response.status_code == 200, response.text
    content: str = response.json()["content"]
    return content


def effective_capabilities(status: str) -> set[str]:
    line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    bits = int(line.split()[1], 16)
    return {name for name, bit in CAP_BITS.items() if bits >> bit & 1}


async def test_agent_runs_with_few_capabilities_in_its_own_cgroup_namespace_by_default(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(tmp_path, instance, agents={"echo": {"image": docker_images["mimic"]}})
    async with Engine(settings) as engine:
        record = await engine.agents.wake("echo", reason="test", timeout=30)
        assert record.url is not None
        caps = effective_capabilities(await read(record.url, "/proc/self/status"))
        assert "NET_RAW" not in caps
        assert "MKNOD" not in caps
        assert "SYS_CHROOT" not in caps
        assert caps == {name for name in DEFAULT_CAP_ADD if name in CAP_BITS}
        # A private cgroup namespace: the process sees itself at the root.
        assert (await read(record.url, "/proc/self/cgroup")).strip().endswith(":/")
        # The root filesystem stays writable unless asked otherwise.
        assert (
            await ask(record.url, {"cmd": "write_file", "path": "/x", "content": "1"})
        ).is_success


async def test_read_only_root_and_another_user_apply_when_configured(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agent = {"image": docker_images["mimic"], "read_only_rootfs": True, "user": "65534:65534"}
    settings = make_settings(tmp_path, instance, agents={"locked": agent})
    async with Engine(settings) as engine:
        record = await engine.agents.wake("locked", reason="test", timeout=30)
        assert record.url is not None
        denied = await ask(record.url, {"cmd": "write_file", "path": "/app/x", "content": "1"})
        assert denied.status_code == 500
        assert "Read-only file system" in denied.json()["error"]
        allowed = await ask(record.url, {"cmd": "write_file", "path": "/tmp/x", "content": "1"})
        assert allowed.status_code == 200, allowed.text
        status = await read(record.url, "/proc/self/status")
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] == "65534"


async def test_capabilities_can_be_given_back_when_an_agent_needs_them(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    agent = {"image": docker_images["mimic"], "cap_add": [*DEFAULT_CAP_ADD, "NET_RAW"]}
    settings = make_settings(tmp_path, instance, agents={"pinger": agent})
    async with Engine(settings) as engine:
        record = await engine.agents.wake("pinger", reason="test", timeout=30)
        assert record.url is not None
        assert "NET_RAW" in effective_capabilities(await read(record.url, "/proc/self/status"))
