"""The token store port: each agent's current container token, kept as a hash.

Every agent container gets its own ``ROOST_AGENT_TOKEN`` (see
``roost.reactor.credentials``); Roost keeps only the token's sha256, so a
container adopted after a Roost restart still authenticates, and nothing that
reads the state database learns a token.

Invariants every implementation keeps:
- At most one hash per agent: ``put`` replaces the previous one (the container it
  belonged to is being replaced).
- ``put`` returns once the hash is durable: the token is handed to a container
  only after that.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["TokenStore"]


class TokenStore(Protocol):
    async def open(self) -> None:
        """Ready the store (its schema comes with the database it shares). Idempotent."""
        ...

    async def close(self) -> None: ...

    async def load(self) -> dict[str, str]:
        """Every agent's current token hash: agent name → sha256 hex."""
        ...

    async def put(self, agent: str, token_hash: str) -> None:
        """Make ``token_hash`` the agent's only valid one (durable on return)."""
        ...

    async def forget(self, agent: str) -> None:
        """The agent has no valid token any more (deleted)."""
        ...
