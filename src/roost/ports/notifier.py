"""The notifier port: how Roost tells an admin (webhook, log line, SSE)."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Notifier"]


class Notifier(Protocol):
    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        """Deliver one notification. Must not raise: failures are logged."""
        ...
