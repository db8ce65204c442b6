"""Where Roost's own requests to an agent go: the container's own address, or its published port.

Role: an agent's URL (``record.url``) is its port published on the host, which is
what the API shows and the library hands out. Behind a published port sits Docker's
port proxy (``docker-proxy``), a process that copies every byte once more: a
delivery through it costs the proxy's CPU and a round trip longer than one straight
to the container. Where Roost can reach the container's own address on its bridge
network (Linux, Roost on the engine's host: the default), its own requests to the
agent (message delivery) go there instead. Elsewhere (a swarm's overlay network,
Docker Desktop's VM, rootless Docker, Roost in a container of its own) they keep
going through the published port.

The start procedure asks :meth:`Addresses.probe_ready` for each readiness probe of a
starting container, with the container's address from the engine when it has one.

Invariants:
- Health-gated: a container's own address is used only after it answered the
  agent's health check (200) there, for that very container (by id). Until then,
  and for any other container, Roost's requests go to ``record.url``.
- Readiness never waits for an address that may not answer: while it is not known
  whether containers' own addresses are reachable, a container is ready when its
  published port answers (as without this module), and its own address is tried
  afterwards, once, by a background probe (``LEARN_TIMEOUT``) that decides for the
  process. If that fails, no address is tried again; once one answered, readiness
  probes a container's own address first (the published port only when that
  fails), so a wake from paused is probed without the proxy too.
- A container woken from paused keeps its address: the one it answered at is
  used again without a new inspect.
- The background probes are owned here and cancelled by ``close``.
"""

from __future__ import annotations

import logging
from typing import Final

from roost.aio import TaskSet
from roost.core.records import AgentRecord
from roost.ports.agent_http import AgentClient, ProbeResult

__all__ = ["LEARN_TIMEOUT", "Addresses", "container_url"]

log = logging.getLogger("roost.addressing")

#: How long the one probe that learns whether own addresses answer may take.
LEARN_TIMEOUT: Final = 0.5


def container_url(ip_address: str | None, port: int) -> str | None:
    """The URL of ``port`` at a container's own address (None without an address)."""
    if not ip_address:
        return None
    host = f"[{ip_address}]" if ":" in ip_address else ip_address
    return f"http://{host}:{port}"


class Addresses:
    """Own addresses of containers that answered there (see the module docstring)."""

    def __init__(self, client: AgentClient) -> None:
        self._client = client
        #: None until learned; then whether containers' own addresses answer.
        self.reachable: bool | None = None
        #: agent → (container id, URL at the container's own address).
        self._direct: dict[str, tuple[str, str]] = {}
        self._probes = TaskSet(log)
        self._probing: set[str] = set()

    def url(self, record: AgentRecord) -> str | None:
        """Where Roost's own requests to the agent go: its container's own address
        when it answered its health check there, else ``record.url``."""
        entry = self._direct.get(record.name)
        if entry is not None and entry[0] == record.container_id and record.url is not None:
            return entry[1]
        return record.url

    def forget(self, name: str) -> None:
        self._direct.pop(name, None)

    async def close(self) -> None:
        """Cancel the background probes."""
        await self._probes.close()

    async def probe_ready(
        self,
        name: str,
        container_id: str,
        published: str,
        direct: str | None,
        health_path: str,
        *,
        timeout: float,
    ) -> ProbeResult:
        """One readiness probe of a starting container: at its own address first when
        those answer (``direct``, or the one it answered at before a pause), else and
        then at its published URL. Its own address is used from now on when it
        answered there (at once, or to the background probe started here)."""
        if direct is None:
            known = self._direct.get(name)
            direct = known[1] if known is not None and known[0] == container_id else None
        if direct is not None and self.reachable:
            result = await self._client.probe(direct + health_path, timeout=timeout)
            if result.ok:
                self._direct[name] = (container_id, direct)
                return result
        result = await self._client.probe(published + health_path, timeout=timeout)
        if result.ok:
            self.forget(name)  # ready; not (yet) known to answer at its own address
            if direct is not None and self.reachable is not False and name not in self._probing:
                self._probing.add(name)
                self._probes.spawn(
                    self._try(name, container_id, direct, health_path),
                    f"roost.address-probe[{name}]",
                )
        return result

    async def _try(self, name: str, container_id: str, direct: str, health_path: str) -> None:
        try:
            result = await self._client.probe(direct + health_path, timeout=LEARN_TIMEOUT)
        finally:
            self._probing.discard(name)
        entry = self._direct.get(name)
        if result.ok and (entry is None or entry[0] == container_id):
            self._direct[name] = (container_id, direct)
        if self.reachable is None:
            self.reachable = result.ok
            if result.ok:
                log.info("agents are addressed at their containers' own addresses (%s)", direct)
            else:
                log.info(
                    "agents are addressed through their published ports: %s (container %s) "
                    "did not answer there (%s)",
                    direct,
                    container_id[:12],
                    result.detail or "no answer",
                )
