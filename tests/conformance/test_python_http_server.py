"""Python's ``http.server`` speaking HTTP/1.0 as the agent, in a real container (the
roost-mimic image's Python): no Content-Length anywhere, every answer ends when
the server closes the connection; through the proxy, message delivery and probes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import NAME, Rig, docker_rig

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
SERVER = r"""
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

released = threading.Event()

class Agent(BaseHTTPRequestHandler):
    # protocol_version stays "HTTP/1.0" and no answer says its length.
    def head(self, status=200, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()

    def do_GET(self):
        if self.path == "/health":
            self.head()
            self.wfile.write(b'{"ok": true}')
        elif self.path == "/big":
            self.head(kind="application/octet-stream")
            self.wfile.write(bytes(range(256)) * 4096)
        elif self.path == "/stream":
            self.head(kind="text/plain")
            self.wfile.write(b"first\n")
            released.wait(60)
            self.wfile.write(b"second\n")
        elif self.path == "/release":
            released.set()
            self.head()
            self.wfile.write(b'"released"')
        else:
            self.head(404)
            self.wfile.write(b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.head()
        self.wfile.write(json.dumps({"echo": json.loads(body), "version": self.request_version}).encode())

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("", 8000), Agent).serve_forever()
"""
SPEC: dict[str, Any] = {"port": 8000, "command": ["python3.11", "-c", SERVER]}


@pytest.fixture
async def rig(tmp_path: Path, instance: str, docker_images: dict[str, str]) -> AsyncIterator[Rig]:
    async with docker_rig(tmp_path, instance, image=docker_images["mimic"], **SPEC) as running:
        yield running


async def test_probe_is_ok_when_http10_health_answer_ends_at_close(rig: Rig) -> None:
    await rig.running()  # readiness: an HTTP/1.0 200 with no length
    result = await rig.probe()
    assert result.ok
    assert result.status == 200


async def test_delivery_gets_json_reply_when_http10_answer_ends_at_close(rig: Rig) -> None:
    result = await rig.deliver({"hello": "1.0"})
    assert result["status"] == "delivered"
    assert result["reply"] == {"echo": {"hello": "1.0"}, "version": "HTTP/1.1"}


async def test_proxy_relays_whole_body_when_http10_answer_ends_at_close(rig: Rig) -> None:
    status, _, body = await rig.proxy("GET", "/big")
    assert status == 200
    assert body == bytes(range(256)) * 4096
    status, _, body = await rig.proxy("POST", "/anything", json={"n": 1})
    assert status == 200
    assert body.startswith(b'{"echo": {"n": 1}')


async def test_proxy_streams_http10_answer_before_it_ends_when_server_writes_slowly(
    rig: Rig,
) -> None:
    async with rig.http.get(f"{rig.url}/agents/{NAME}/stream") as response:
        assert response.status == 200
        assert await asyncio.wait_for(response.content.readline(), timeout=30) == b"first\n"
        status, _, _ = await rig.proxy("GET", "/release")
        assert status == 200
        assert await asyncio.wait_for(response.content.read(), timeout=30) == b"second\n"
