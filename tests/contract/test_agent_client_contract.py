"""The ``AgentClient`` contract, held by ``FakeAgentClient`` and ``HttpAgentClient`` alike.

The fake "serves" a URL when a running FakeRuntime container publishes its port
and then behaves like an echo agent; the real client talks to a real aiohttp
echo agent on this host that behaves the same way. Both are driven by the same
tests, so the fake cannot drift from what the real client does: bytes in and
bytes out, ``AgentHTTPError`` for a refused connection, streamed bodies, a body
stream's own error passed through unchanged, WebSocket echo and close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from roost import errors
from roost.adapters.http_agent_client import HttpAgentClient
from roost.ports.agent_http import AgentClient
from roost.ports.runtime import ContainerSpec
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import free_port, site_port

JSON = ((b"content-type", b"application/json"),)


@dataclasses.dataclass
class Agent:
    client: AgentClient
    #: ``http://host:port`` of an agent that answers, and of one nobody serves.
    origin: str
    dead: str


@contextlib.asynccontextmanager
async def fake_agent() -> AsyncIterator[Agent]:
    runtime = FakeRuntime(images=["echo:latest"])
    container = await runtime.create(
        ContainerSpec(image="echo:latest", labels={"roost.managed": "true"}, port=8000)
    )
    await runtime.start(container)
    port = (await runtime.inspect(container)).host_port
    assert port is not None
    client = FakeAgentClient(runtime)
    yield Agent(client, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1000}")
    await client.close()


@contextlib.asynccontextmanager
async def http_agent() -> AsyncIterator[Agent]:
    """A real echo agent: what FakeAgentClient's served URLs pretend to be."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def echo(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        return web.json_response({"echo": body})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site_port(site)
    client = HttpAgentClient(connect_timeout=5)
    try:
        yield Agent(client, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}")
    finally:
        await client.close()
        await runner.cleanup()


@pytest.fixture(params=["fake", "http"])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    make = fake_agent if request.param == "fake" else http_agent
    async with make() as running:
        yield running


async def _whole(agent: Agent, body: Any) -> tuple[int, bytes]:
    async with agent.client.stream(
        "POST", agent.origin, b"/messages", headers=JSON, body=body, answer_timeout=10
    ) as answer:
        chunks = []
        while chunk := await answer.read():
            chunks.append(chunk)
        assert answer.complete
        return answer.status, b"".join(chunks)


async def test_probe_is_ok_when_agent_serves_and_refused_when_nobody_does(agent: Agent) -> None:
    served = await agent.client.probe(agent.origin + "/health", timeout=5)
    assert (served.ok, served.status) == (True, 200)
    dead = await agent.client.probe(agent.dead + "/health", timeout=5)
    assert (dead.ok, dead.status) == (False, None)
    assert dead.detail


async def test_request_echoes_json_bytes_when_agent_serves(agent: Agent) -> None:
    response = await agent.client.request(
        "POST", agent.origin + "/messages", body=b'{"a": [1, 2]}', headers=JSON, timeout=5
    )
    assert response.status == 200
    assert isinstance(response.body, bytes)
    assert json.loads(response.body) == {"echo": {"a": [1, 2]}}
    assert (response.header(b"content-type") or b"").startswith(b"application/json")


async def test_request_answers_400_when_body_is_not_json(agent: Agent) -> None:
    response = await agent.client.request(
        "POST", agent.origin + "/messages", body=b"not json", timeout=5
    )
    assert response.status == 400


async def test_request_raises_agent_http_error_when_nobody_serves(agent: Agent) -> None:
    with pytest.raises(errors.AgentHTTPError) as raised:
        await agent.client.request("POST", agent.dead + "/messages", body=b"{}", timeout=5)
    assert isinstance(raised.value, ConnectionError)


async def test_stream_echoes_body_when_body_is_whole_or_streamed(agent: Agent) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"streamed": '
        yield b"true}"

    assert await _whole(agent, b'{"whole": true}') == (200, b'{"echo": {"whole": true}}')
    status, body = await _whole(agent, chunks())
    assert (status, json.loads(body)) == (200, {"echo": {"streamed": True}})


async def test_stream_passes_body_streams_error_through_unchanged_when_it_fails(
    agent: Agent,
) -> None:
    class Gone(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"{"
        raise Gone

    with pytest.raises(Gone):
        await _whole(agent, failing())


async def test_stream_raises_agent_http_error_when_nobody_serves(agent: Agent) -> None:
    with pytest.raises(errors.AgentHTTPError):
        async with agent.client.stream("GET", agent.dead, b"/", answer_timeout=5):
            pass


async def test_websocket_echoes_and_closes_when_agent_serves(agent: Agent) -> None:
    ws = await agent.client.websocket(
        agent.origin, b"/ws", protocols=("chat",), max_message_size=1 << 20
    )
    assert ws.subprotocol == "chat"
    await ws.send("text")
    assert await ws.receive() == "text"
    await ws.send(b"\x00bytes")
    assert await ws.receive() == b"\x00bytes"
    await ws.close(code=1000)
    assert await ws.receive() is None
    assert ws.close_code == 1000


async def test_websocket_raises_agent_http_error_when_nobody_serves(agent: Agent) -> None:
    with pytest.raises(errors.AgentHTTPError):
        await agent.client.websocket(agent.dead, b"/ws", max_message_size=1 << 20)
