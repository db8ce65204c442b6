"""uvicorn (its h11 protocol) and an aiohttp server as the agent, through the proxy,
message delivery and probes (engine on FakeRuntime, real agent HTTP client).

Both frame with Content-Length or chunked and keep connections alive; each test
runs against both, with the same app: ``/health``, ``/messages`` (JSON echo),
``/stream`` (a chunked answer held open until the test releases it),
``/upload`` (counts a streamed request body), ``/big`` (1 MiB) and ``/ws``
(WebSocket echo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web

from roost import serving
from tests.conformance.conftest import NAME, Rig, host_rig
from tests.conftest import site_port, wait_until

BIG = bytes(range(256)) * 4096  # 1 MiB


class Controls:
    """What a test can see and steer in the agent app."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.first_upload_chunk = asyncio.Event()
        self.port = 0
        self.message_ids: list[str] = []


# --------------------------------------------------------------------------- uvicorn


def uvicorn_app(controls: Controls) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                if message.get("text") is not None:
                    await send({"type": "websocket.send", "text": "echo:" + message["text"]})
                else:
                    await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})
            return
        path = scope["path"]
        body = b""
        if path == "/upload":
            total = 0
            while True:
                message = await receive()
                total += len(message.get("body", b""))
                controls.first_upload_chunk.set()
                if not message.get("more_body"):
                    break
            await _send(send, 200, json.dumps({"bytes": total}).encode())
            return
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/health":
            await _send(send, 200, b'{"ok": true}')
        elif path == "/messages":
            headers = dict(scope["headers"])
            controls.message_ids.append(headers[b"roost-message-id"].decode())
            await _send(send, 200, json.dumps({"echo": json.loads(body)}).encode())
        elif path == "/big":
            await _send(send, 200, BIG, content_type=b"application/octet-stream")
        elif path == "/stream":
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)  # no Content-Length: uvicorn sends it chunked
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            await controls.release.wait()
            await send({"type": "http.response.body", "body": b"second\n"})
        else:
            await _send(send, 404, b"{}")

    return app


async def _send(
    send: Any, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def uvicorn_agent(controls: Controls) -> AsyncIterator[None]:
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        uvicorn_app(controls), http="h11", lifespan="off", log_config=None, access_log=False
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test.agent.uvicorn")
    try:
        await wait_until(lambda: server.started or task.done(), timeout=10, what="uvicorn")
        controls.port = sock.getsockname()[1]
        yield
    finally:
        controls.release.set()
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
        sock.close()


# --------------------------------------------------------------------------- aiohttp


@contextlib.asynccontextmanager
async def aiohttp_agent(controls: Controls) -> AsyncIterator[None]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def messages(request: web.Request) -> web.Response:
        controls.message_ids.append(request.headers["Roost-Message-Id"])
        return web.json_response({"echo": await request.json()})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG, content_type="application/octet-stream")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # no Content-Length: aiohttp sends it chunked
        await response.write(b"first\n")
        await controls.release.wait()
        await response.write(b"second\n")
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            controls.first_upload_chunk.set()
        return web.json_response({"bytes": total})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/messages", messages)
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app.router.add_post("/upload", upload)
    app.router.add_get("/ws", websocket)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    controls.port = site_port(site)
    try:
        yield
    finally:
        controls.release.set()
        await runner.cleanup()


# --------------------------------------------------------------------------- rig


@pytest.fixture(params=["uvicorn", "aiohttp"])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[Controls]:
    controls = Controls()
    serve = uvicorn_agent if request.param == "uvicorn" else aiohttp_agent
    async with serve(controls):
        yield controls


@pytest.fixture
async def rig(tmp_path: Path, agent: Controls) -> AsyncIterator[Rig]:
    async with host_rig(tmp_path, agent.port) as running:
        await running.running()  # readiness: the probe got 200 from /health
        yield running


# --------------------------------------------------------------------------- tests


async def test_probe_is_ok_when_agent_answers_health(rig: Rig) -> None:
    result = await rig.probe()
    assert result.ok
    assert result.status == 200
    missing = await rig.probe("/nothing-here")
    assert not missing.ok
    assert missing.status == 404


async def test_delivery_gets_json_reply_with_message_id_when_agent_echoes(
    rig: Rig, agent: Controls
) -> None:
    result = await rig.deliver({"hello": [1, 2]})
    assert result["status"] == "delivered"
    assert result["reply"] == {"echo": {"hello": [1, 2]}}
    assert agent.message_ids == [result["id"]]


async def test_proxy_relays_large_body_intact_when_agent_answers_1_mib(rig: Rig) -> None:
    status, headers, body = await rig.proxy("GET", "/big")
    assert status == 200
    assert headers["Content-Length"] == str(len(BIG))
    assert body == BIG


async def test_proxy_streams_chunked_answer_before_it_ends_when_agent_streams(
    rig: Rig, agent: Controls
) -> None:
    async with rig.http.get(f"{rig.url}/agents/{NAME}/stream") as response:
        assert response.status == 200
        assert await asyncio.wait_for(response.content.readline(), timeout=10) == b"first\n"
        agent.release.set()
        assert await response.content.read() == b"second\n"


async def test_proxy_streams_upload_before_it_ends_when_client_sends_chunks(
    rig: Rig, agent: Controls
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 70_000
        # Only a streaming proxy lets the agent see this before the upload ends.
        await asyncio.wait_for(agent.first_upload_chunk.wait(), timeout=10)
        yield b"b" * 70_000

    status, _, body = await rig.proxy("POST", "/upload", data=chunks())
    assert status == 200
    assert json.loads(body) == {"bytes": 140_000}


async def test_proxy_reuses_one_connection_when_requests_follow(rig: Rig, agent: Controls) -> None:
    for _ in range(5):
        status, _, _ = await rig.proxy("GET", "/health")
        assert status == 200
    assert rig.client.idle_connections == 1


async def test_proxy_relays_websocket_both_ways_when_agent_accepts(rig: Rig) -> None:
    async with rig.http.ws_connect(f"{rig.url.replace('http', 'ws')}/agents/{NAME}/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=10)).data == "echo:hi"
        await ws.send_bytes(b"\x01\x02")
        assert (await ws.receive(timeout=10)).data == b"\x02\x01"
