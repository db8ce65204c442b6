"""What a swarm can say about an exit, read through ``SwarmBackend`` on the real swarm.

- Without the node's own API (no ``node_hosts``) an OOM kill is only "exit code
  137": the exit says the OOM flag is unknown, and why, instead of claiming False.
- With it, the OOM flag comes from the node (the contract suite checks that half:
  tests/contract/test_backend_contract.py).
"""

from __future__ import annotations

import json
import secrets

import aiohttp
import pytest

from roost.adapters.swarm_backend import SwarmBackend
from roost.ports.runtime import ContainerSpec
from tests.conftest import MIMIC_IMAGE, wait_until

from .conftest import Swarm

pytestmark = pytest.mark.swarm

TIMEOUT = 60.0


async def test_oom_flag_is_reported_unknown_when_the_node_api_is_not_reachable(
    swarm: Swarm,
) -> None:
    backend = SwarmBackend(swarm.manager_url)  # no node_hosts: the nodes' APIs unknown
    instance = f"ts-{secrets.token_hex(4)}"
    labels = {"roost.managed": "true", "roost.instance": instance, "roost.agent": "hog"}
    spec = ContainerSpec(
        image=MIMIC_IMAGE,
        labels=labels,
        name=f"roost-{instance}-hog",
        env={"MODE": "echo"},
        port=8000,
        memory=64 * 1024 * 1024,
    )
    unit = await backend.ensure(spec)
    try:
        await backend.wake(unit, timeout=TIMEOUT)
        endpoint = await backend.endpoint(unit)
        assert endpoint is not None
        async with aiohttp.ClientSession() as http:

            async def answers() -> bool:
                try:
                    async with http.get(endpoint.url + "/health") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(answers, timeout=TIMEOUT, what="GET /health")
            try:
                async with http.post(
                    endpoint.url + "/messages",
                    data=json.dumps({"cmd": "oom"}),
                    timeout=aiohttp.ClientTimeout(total=30),
                ):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass  # it died answering

        async def ended() -> bool:
            return (await backend.status(unit)).exit is not None

        await wait_until(ended, timeout=TIMEOUT, interval=0.2, what="the exit")
        state = await backend.status(unit)
        assert state.exit is not None
        assert state.exit.exit_code == 137
        assert state.exit.oom_killed is False
        assert "whether by the OOM killer is unknown" in state.exit.error
        assert "docker.node_hosts" in state.exit.error
    finally:
        await backend.remove(unit)
        await backend.close()
