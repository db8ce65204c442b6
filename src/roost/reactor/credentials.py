"""Agent credentials: one ``ROOST_AGENT_TOKEN`` per container, known to Roost only
as a hash.

Role: the start procedure asks ``issue(agent)`` for a fresh token just before it
creates a container and puts it in that container's environment; the agent
listener asks ``verify(token)`` which agent a request comes from. A token is
valid only for its own agent's endpoints (``roost.edge.agent_app`` enforces it).

Invariants:
- A token is 256 random bits (``secrets``); Roost stores and compares only its
  sha256 (``TokenStore``), loaded at start, so a container adopted after a Roost
  restart still authenticates, and the state database never holds a token.
- One valid token per agent: ``issue`` replaces the previous one (its container is
  being replaced), and tells every listener (``on_revoke``) so open WebSockets
  authenticated with the old token are closed. ``forget`` (agent deleted) does
  the same without a new token.
- ``issue`` (``install``) returns only once the new hash is durable. The start
  procedure creates a container while its token's hash is being stored and
  records the container (the only way Roost ever adopts one) after the store
  returned: a container Roost would adopt never holds a token that a restarted
  Roost would not know (an unrecorded one is an orphan, removed by the reconcile).
- Tokens are never logged, labelled or passed on a command line; ``Credentials``
  itself keeps no token, only hashes.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable

from roost.ports.tokens import TokenStore

__all__ = ["TOKEN_ENV", "Credentials", "digest"]

log = logging.getLogger("roost.credentials")

#: The container environment variable holding the agent's token.
TOKEN_ENV = "ROOST_AGENT_TOKEN"


def digest(token: str) -> str:
    """The sha256 hex of a token: what Roost stores and compares."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Credentials:
    """Every agent's current token hash (see the module docstring)."""

    def __init__(self, store: TokenStore) -> None:
        self._store = store
        self._agent_by_hash: dict[str, str] = {}
        self._hash_by_agent: dict[str, str] = {}
        self._on_revoke: list[Callable[[str], None]] = []

    async def load(self) -> None:
        """Read the stored hashes (start-up)."""
        self._hash_by_agent = await self._store.load()
        self._agent_by_hash = {h: agent for agent, h in self._hash_by_agent.items()}

    def on_revoke(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(agent)`` whenever the agent's token stops being valid."""
        self._on_revoke.append(listener)

    async def issue(self, agent: str) -> str:
        """A fresh token for the agent's next container; the previous one is invalid
        from now on. Returns once its hash is stored."""
        token = self.mint()
        await self.install(agent, token)
        return token

    @staticmethod
    def mint() -> str:
        """A fresh token, not valid yet: ``install`` makes it the agent's."""
        return secrets.token_urlsafe(32)

    async def install(self, agent: str, token: str) -> None:
        """Make ``token`` (from ``mint``) the agent's one valid token; the previous one
        is invalid from now on. Returns once its hash is stored. (The start procedure
        creates the container meanwhile, and records it only after this returned.)"""
        hashed = digest(token)
        await self._store.put(agent, hashed)
        self._drop(agent)
        self._hash_by_agent[agent] = hashed
        self._agent_by_hash[hashed] = agent
        self._revoked(agent)

    async def forget(self, agent: str) -> None:
        """The agent is gone: its token is no longer valid."""
        await self._store.forget(agent)
        self._drop(agent)
        self._revoked(agent)

    def verify(self, token: str) -> str | None:
        """The agent whose current token this is, or None."""
        if not token:
            return None
        return self._agent_by_hash.get(digest(token))

    def current(self, agent: str) -> str | None:
        """The agent's current token hash, or None."""
        return self._hash_by_agent.get(agent)

    def _drop(self, agent: str) -> None:
        old = self._hash_by_agent.pop(agent, None)
        if old is not None:
            self._agent_by_hash.pop(old, None)

    def _revoked(self, agent: str) -> None:
        for listener in self._on_revoke:
            try:
                listener(agent)
            except Exception:
                log.exception("agent %s: a token revocation listener failed", agent)
