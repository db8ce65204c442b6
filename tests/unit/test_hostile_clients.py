"""Hostile clients at the edge, against a served daemon on fakes: deeply nested JSON,
slowloris connections, and the connection cap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from roost.config import Settings
from roost.testing import EngineHarness
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"


def _settings(tmp_path: Path, **server: object) -> Settings:
    return make_settings(tmp_path, "hostile", agents={"echo": {"image": IMAGE}}, server=server)


async def test_deeply_nested_message_answers_400_and_stores_nothing_when_posted(
    tmp_path: Path,
) -> None:
    async with EngineHarness.running(_settings(tmp_path)) as h:
        body = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
        response = await h.client.post(
            "/api/agents/echo/messages", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert "nested more than 128 levels" in response.json()["error"]
        listed = await h.client.get("/api/agents/echo/messages")
        assert listed.json()["messages"] == []
        fine = {"a": json.loads("[" * 100 + "]" * 100)}
        assert (await h.client.post("/api/agents/echo/messages", json=fine)).status_code == 202


async def _dribble(port: int, stop: asyncio.Event) -> bool:
    """A slowloris client: sends a header line now and then, never ends the head.
    True when the server cut it off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(1024), timeout=0.1)
            except ConnectionError:
                return True  # reset by the server
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")
                try:
                    await writer.drain()
                except ConnectionError:
                    return True
                continue
            if not data:
                return True  # closed by the server
        return False
    finally:
        writer.close()


async def test_slowloris_clients_are_cut_off_while_healthz_stays_answering_when_heads_dribble(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, header_timeout=0.5)
    async with EngineHarness.served(settings) as h:
        port = int(h.url.rsplit(":", 1)[1])
        stop = asyncio.Event()
        clients = [asyncio.create_task(_dribble(port, stop)) for _ in range(200)]
        try:
            for _ in range(5):  # the daemon keeps answering meanwhile
                assert (await h.client.get("/healthz")).status_code == 200
            await wait_until(
                lambda: all(c.done() for c in clients), timeout=30, what="every slow client cut"
            )
            assert all(c.result() for c in clients)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)


async def test_connections_beyond_the_cap_answer_503_when_max_connections_is_reached(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, max_connections=3, header_timeout=30)
    async with EngineHarness.served(settings) as h:
        port = int(h.url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(h.url + "/healthz")
            assert response.status_code == 503
        finally:
            for _, writer in held:
                writer.close()
        async with httpx.AsyncClient() as client:

            async def answers() -> bool:
                return (await client.get(h.url + "/healthz")).status_code == 200

            await wait_until(answers, timeout=10, what="healthz again once the others left")
