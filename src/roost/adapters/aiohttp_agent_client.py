"""``AgentClient`` over aiohttp: one pooled session for probes and deliveries.

Probes use a short per-request timeout so a hung agent (accepting but never
answering) fails its probe instead of stalling the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from roost.ports.agent_http import AgentResponse, ProbeResult

__all__ = ["AiohttpAgentClient"]


class AiohttpAgentClient:
    def __init__(self, *, connection_limit: int = 256) -> None:
        self._limit = connection_limit
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, force_close=False),
                auto_decompress=False,
            )
        return self._session

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        try:
            async with self._client().get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as resp:
                await resp.read()
                return ProbeResult(resp.status == 200, resp.status, f"HTTP {resp.status}")
        except (aiohttp.ClientError, OSError) as exc:
            return ProbeResult(False, None, type(exc).__name__)
        except TimeoutError:
            return ProbeResult(False, None, f"no answer within {timeout:g}s")

    async def post_json(
        self, url: str, body: Any, *, headers: Mapping[str, str], timeout: float
    ) -> AgentResponse:
        data = json.dumps(body).encode()
        try:
            async with self._client().post(
                url,
                data=data,
                headers={"Content-Type": "application/json", **headers},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
                try:
                    decoded: Any = json.loads(raw) if raw else None
                except ValueError:
                    decoded = raw.decode(errors="replace")
                return AgentResponse(resp.status, decoded, dict(resp.headers))
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise TimeoutError(f"no answer within {timeout:g}s") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
