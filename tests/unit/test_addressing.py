"""Roost's own requests to an agent at its container's own address (roost.reactor.addressing):
learned once, health-gated per container, the published port otherwise; on fakes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost.core.records import AgentRecord
from roost.ports.agent_http import ProbeResult
from roost.ports.runtime import ContainerSpec
from roost.reactor.addressing import Addresses, container_url
from roost.testing import EngineHarness
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"


class OwnAddressesUnreachable(FakeAgentClient):
    """A client on a host that cannot reach containers' own addresses (a swarm's
    overlay network, Docker Desktop's VM): only published ports answer."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.probed: list[str] = []

    async def _serves(self, url: str) -> int | None:
        if "[2001:db8:" in url:
            return None
        return await super()._serves(url)

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        self.probed.append(url)
        return await super().probe(url, timeout=timeout)


@pytest.fixture
async def roost(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    settings = make_settings(tmp_path, "addressing", agents={"echo": {"image": IMAGE}})
    async with EngineHarness.running(settings) as harness:
        yield harness


def _client(harness: EngineHarness) -> FakeAgentClient:
    client = harness.engine.agent_client
    assert isinstance(client, FakeAgentClient)
    return client


async def _delivered_to(harness: EngineHarness, n: int) -> str:
    response = await harness.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, json={"n": n}
    )
    assert response.status_code == 200, response.text
    method, url, body = _client(harness).requests[-1]
    assert (method, json.loads(body or b"")) == ("POST", {"n": n})
    return url


async def _own_address_known(harness: EngineHarness) -> AgentRecord:
    agents = harness.engine.agents
    await agents.wake("echo", reason="test", timeout=5)
    await wait_until(
        lambda: agents.address(agents.get("echo")) != agents.get("echo").url,
        what="the container's own address answered",
    )
    return agents.get("echo")


def test_container_url_brackets_ipv6_and_is_none_without_an_address() -> None:
    assert container_url("172.18.0.5", 8000) == "http://172.18.0.5:8000"
    assert container_url("2001:db8::5", 80) == "http://[2001:db8::5]:80"
    assert container_url(None, 8000) is None
    assert container_url("", 8000) is None


async def test_messages_go_to_the_containers_own_address_when_it_answers_there(
    roost: EngineHarness,
) -> None:
    record = await _own_address_known(roost)
    own = roost.engine.agents.address(record)
    assert own is not None
    assert own.startswith("http://[2001:db8::")
    assert record.url is not None
    assert record.url.startswith("http://127.0.0.1:")  # the agent's URL is unchanged
    shown = (await roost.client.get("/api/agents/echo")).json()
    assert shown["url"] == record.url
    assert (await _delivered_to(roost, 1)).startswith(own)


async def test_a_new_container_is_addressed_at_its_own_address_once_ready_there(
    roost: EngineHarness,
) -> None:
    agents = roost.engine.agents
    first = await _own_address_known(roost)
    await agents.act("echo", "restart")
    await wait_until(
        lambda: (
            agents.get("echo").state.value == "running"
            and agents.get("echo").container_id != first.container_id
        ),
        what="restarted in a new container",
    )
    second = agents.get("echo")
    assert second.container_id != first.container_id
    own = agents.address(second)
    assert own is not None
    assert own != agents.address(first)  # the old container's address is not used
    assert own != second.url  # learned: readiness found it at its own address
    assert (await _delivered_to(roost, 2)).startswith(own)


async def test_a_container_woken_from_paused_keeps_its_own_address(roost: EngineHarness) -> None:
    agents = roost.engine.agents
    before = await _own_address_known(roost)
    await agents.act("echo", "pause")
    await wait_until(lambda: agents.get("echo").state.value == "paused", what="paused")
    url = await _delivered_to(roost, 3)  # wakes it
    after = agents.get("echo")
    assert after.container_id == before.container_id
    assert url.startswith(str(agents.address(after)))
    assert agents.address(after) == agents.address(before) != after.url


async def test_published_ports_are_used_when_own_addresses_do_not_answer(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, "addressing", agents={"echo": {"image": IMAGE}, "other": {"image": IMAGE}}
    )
    runtime = FakeRuntime(images=[IMAGE])
    client = OwnAddressesUnreachable(runtime)
    async with EngineHarness.running(settings, runtime=runtime, agent_client=client) as h:
        agents = h.engine.agents
        await agents.wake("echo", reason="test", timeout=5)
        addresses = h.engine.supervisor.addresses
        await wait_until(lambda: addresses.reachable is not None, what="learned")
        assert addresses.reachable is False
        record = agents.get("echo")
        assert agents.address(record) == record.url
        assert (await _delivered_to(h, 4)).startswith(str(record.url))
        # learned once: the next container is not probed at its own address at all
        probes = len(client.probed)
        await agents.wake("other", reason="test", timeout=5)
        assert all("[2001:db8:" not in url for url in client.probed[probes:])


async def test_own_address_is_not_used_when_it_does_not_answer_200() -> None:
    runtime = FakeRuntime(images=[IMAGE])
    client = FakeAgentClient(runtime)
    addresses = Addresses(client)
    cid = await runtime.create(ContainerSpec(image=IMAGE, labels={}, port=8000))
    await runtime.start(cid)
    state = await runtime.inspect(cid)
    assert state.host_port is not None
    published = f"http://127.0.0.1:{state.host_port}"
    direct = container_url(state.ip_address, 8000)
    client.unhealthy_ports.add(state.host_port)  # the app answers 503, however reached
    result = await addresses.probe_ready("a", cid, published, direct, "/health", timeout=1)
    assert not result.ok
    assert addresses.reachable is None
    record = AgentRecord(name="a", container_id=cid, url=published)
    assert addresses.url(record) == published
    await addresses.close()
