"""The store port: agents' durable intent, state history and latest exits (messages
and jobs have ports of their own: ``ports.inbox``, ``ports.jobs``).

Invariants every implementation keeps (checked by tests/contract):
- Updates are compare-and-set on ``AgentRecord.version``: a write based on a
  stale version raises ``Conflict`` and changes nothing.
- A record update and the history rows of its state changes commit together.
- Specs are stored as JSON objects exactly as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from roost.core.records import AgentRecord, ExitInfo, StateChange

__all__ = ["HistoryEntry", "Store", "StoredAgent"]


@dataclasses.dataclass(frozen=True, slots=True)
class StoredAgent:
    record: AgentRecord
    #: the agent's spec as a JSON object (roost.config.AgentConfig.model_dump()).
    spec: dict[str, Any]
    #: "config" (from roost.toml) or "api" (registered at run time).
    source: str = "config"


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryEntry:
    agent: str
    change: StateChange
    seq: int


class Store(Protocol):
    async def open(self) -> None:
        """Make the store ready (create or migrate the schema, or check that the
        database it is built on was opened and migrated by its owner). Idempotent."""
        ...

    async def close(self) -> None: ...

    async def get_agent(self, name: str) -> StoredAgent | None: ...

    async def list_agents(self) -> list[StoredAgent]: ...

    async def insert_agent(
        self, record: AgentRecord, spec: dict[str, Any], *, source: str = "config"
    ) -> AgentRecord:
        """Insert a new agent; Conflict if the name exists. Returns it at version 1."""
        ...

    async def update_agent(
        self,
        record: AgentRecord,
        *,
        changes: Sequence[StateChange] = (),
        exit: ExitInfo | None = None,
    ) -> AgentRecord:
        """Write ``record`` if the stored version equals ``record.version``; append
        ``changes`` to history in the same transaction, and ``exit`` to the exit
        history (completing the row of the same container); return the record with the
        version bumped. Conflict (nothing written) if the version moved; NotFound if
        the agent is gone."""
        ...

    async def exits(self, name: str, *, limit: int = 10) -> list[ExitInfo]:
        """The agent's latest exits (at most ``limit``, 10 are kept), newest first."""
        ...

    async def update_spec(self, name: str, spec: dict[str, Any], *, source: str) -> None:
        """Replace an agent's spec (config reload, re-registration)."""
        ...

    async def delete_agent(self, name: str) -> bool:
        """Delete the agent and its history; False if it did not exist."""
        ...

    async def history(self, name: str, *, limit: int = 100) -> list[HistoryEntry]:
        """Newest last."""
        ...
