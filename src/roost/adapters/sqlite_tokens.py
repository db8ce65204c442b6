"""``SqliteTokenStore``: the ``TokenStore`` port on the ``agent_tokens`` table.

Role: a repository on ``roost.adapters.sqlite_database.Database``'s public
methods (migration step 5 creates the table). It stores each agent's current
container token as a sha256 hex digest, never the token itself.

Invariants:
- ``put`` is one upsert, committed before it returns (the token goes into the
  container's environment only after its hash is durable).
- The ``Database`` is opened and closed by its owner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from roost.adapters.sqlite_database import Database

__all__ = ["SqliteTokenStore"]

_PUT: Final = (
    "INSERT INTO agent_tokens (agent, token_hash, issued_at) VALUES (?, ?, ?) "
    "ON CONFLICT (agent) DO UPDATE SET token_hash = excluded.token_hash, "
    "issued_at = excluded.issued_at"
)


class SqliteTokenStore:
    """The ``TokenStore`` port on ``database`` (opened by its owner)."""

    def __init__(self, database: Database, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._wall_clock = wall_clock

    async def open(self) -> None:
        """Nothing to load ahead: ``load`` reads the table."""

    async def close(self) -> None:
        """Writes are awaited by their callers; nothing is left to flush."""

    async def load(self) -> dict[str, str]:
        rows = await self._db.fetch_all("SELECT agent, token_hash FROM agent_tokens")
        return {str(agent): str(token_hash) for agent, token_hash in rows}

    async def put(self, agent: str, token_hash: str) -> None:
        await self._db.execute(
            "store agent token hash", _PUT, (agent, token_hash, self._wall_clock())
        )

    async def forget(self, agent: str) -> None:
        await self._db.execute(
            "forget agent token", "DELETE FROM agent_tokens WHERE agent = ?", (agent,)
        )
