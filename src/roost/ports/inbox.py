"""The inbox port: durable messages addressed to agents.

A message is a JSON text stored before Roost acknowledges it, then delivered
to its agent in acceptance order and answered with the agent's reply.

Bodies and replies are bytes end to end: the body is the JSON text exactly as the
client sent it (checked once, at the API's edge: UTF-8, JSON, not too deep), stored
and delivered as those bytes; a reply is the agent's JSON text as it answered it.
Only what shows a message as JSON decodes them (``Message.to_json``,
``json_value``) or splices them into a frame unparsed (``spliced_json``).

Statuses (contract names)::

    queued ──▶ delivering ──▶ delivered        (2xx: the reply is kept)
      ▲            │  └──────▶ failed          (4xx, or too many 5xx)
      │            ▼
      └──────── queued (retry: 5xx, no answer; attempts counted)
    queued / delivering ──▶ dead               (the agent went ``failed``, or
                                                ``max_attempts`` attempts got no reply)
    dead ──▶ queued                            (``reset`` re-queues them)

Invariants every implementation keeps:
- ``seq`` orders messages by acceptance, per inbox, strictly increasing; a
  re-queued message keeps its ``seq`` (it is delivered before newer ones).
- ``enqueue`` returns only once the message is durable, and stores nothing
  when it raises (``QueueFull``).
- One ``idempotency_key`` per agent names at most one message, ever.
- On ``recover`` (start-up), every ``delivering`` message becomes ``queued``
  again: delivery is at-least-once and the agent sees the same id again.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from roost import errors

__all__ = [
    "PENDING",
    "TERMINAL",
    "Inbox",
    "Message",
    "MessageStatus",
    "QueueFull",
    "json_value",
    "spliced_json",
]


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"


#: Waiting for delivery: what ``queue_limit`` counts.
PENDING = frozenset({MessageStatus.QUEUED, MessageStatus.DELIVERING})
#: Nothing more happens to a message in these (``dead`` until a reset).
TERMINAL = frozenset({MessageStatus.DELIVERED, MessageStatus.FAILED, MessageStatus.DEAD})


class QueueFull(errors.RoostError):
    """The agent already has ``limit`` undelivered messages; nothing was stored."""

    def __init__(self, message: str, *, pending: int, limit: int) -> None:
        super().__init__(message)
        self.pending = pending
        self.limit = limit


def json_value(text: bytes | None) -> Any:
    """A stored JSON text (a body or a reply) as its value; None for None."""
    return None if text is None else json.loads(text)


def spliced_json(fields: Mapping[str, Any], texts: Mapping[str, bytes]) -> bytes:
    """One JSON object: ``fields`` encoded here, then ``texts`` spliced in as they
    are, unparsed. Each of ``texts`` must be a valid JSON text: a stored body or
    reply is (checked before it was stored)."""
    head = json.dumps(fields, separators=(",", ":")).encode()
    members = [head[1:-1]] if len(head) > 2 else []
    members.extend(json.dumps(key).encode() + b":" + text for key, text in texts.items())
    return b"{" + b",".join(members) + b"}"


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    id: str
    agent: str
    seq: int
    #: the JSON text the client sent, byte for byte (UTF-8).
    body: bytes
    status: MessageStatus
    attempts: int = 0
    #: the agent's reply as a JSON text (``delivered`` only; None before).
    reply: bytes | None = None
    error: str = ""
    idempotency_key: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    #: the event type it was routed by (``POST /api/route/{event_type}``), or None.
    event_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A message as JSON (contract: ``id``, ``agent``, ``status``, ``attempts``,
        ``reply``, ``error``); body and reply decoded."""
        return {
            "id": self.id,
            "agent": self.agent,
            "seq": self.seq,
            "status": self.status.value,
            "attempts": self.attempts,
            "reply": json_value(self.reply),
            "error": self.error or None,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "next_attempt_at": self.next_attempt_at,
            "delivered_at": self.delivered_at,
            "event_type": self.event_type,
            "body": json_value(self.body),
        }


class Inbox(Protocol):
    async def open(self) -> None:
        """Start the inbox (its schema comes with the database it shares). Idempotent."""
        ...

    async def close(self) -> None:
        """Commit every write already accepted, then stop. Idempotent."""
        ...

    async def enqueue(
        self,
        agent: str,
        body: bytes,
        *,
        idempotency_key: str | None = None,
        limit: int | None = None,
        event_type: str | None = None,
    ) -> tuple[Message, bool]:
        """Store a message durably (with the ``event_type`` it was routed by, if
        any); return it and whether it is new. ``body`` is a JSON text its caller
        has checked; it is stored and given back byte for byte (TypeError for
        anything but bytes).

        With ``idempotency_key``, a message already stored under that key for
        ``agent`` is returned unchanged (``False``). ``QueueFull`` when ``agent``
        has ``limit`` pending messages (nothing stored)."""
        ...

    async def get(self, agent: str, message_id: str) -> Message | None: ...

    async def list_messages(
        self,
        agent: str,
        *,
        status: MessageStatus | None = None,
        limit: int = 100,
        after_seq: int | None = None,
    ) -> list[Message]:
        """Oldest first: the newest ``limit`` messages (of ``status``), or with
        ``after_seq`` the first ``limit`` after that seq (paging)."""
        ...

    async def next_queued(self, agent: str, *, after_seq: int, limit: int) -> list[Message]:
        """Queued messages of ``agent`` with ``seq > after_seq``, oldest first."""
        ...

    def pending_count(self, agent: str) -> int:
        """Queued + delivering messages of ``agent`` (what ``limit`` compares with)."""
        ...

    def mark_delivering(self, message_id: str, *, attempts: int) -> Awaitable[Any]:
        """Record that delivery attempt ``attempts`` starts now. Queued at once, in
        order before any later write of this inbox; it may commit later, with the
        next write (await the result to know it is durable)."""
        ...

    async def mark_delivered(self, message: Message, reply: bytes) -> None:
        """Delivered, with the agent's ``reply`` (a JSON text, stored as it is)."""
        ...

    async def mark_failed(self, message: Message, error: str) -> None: ...

    async def mark_dead(self, message: Message, error: str) -> bool:
        """A pending message becomes ``dead`` (``max_attempts`` reached); False when it
        was no longer pending (nothing changed)."""
        ...

    async def mark_retry(self, message_id: str, error: str, *, next_attempt_at: float) -> None:
        """Back to ``queued`` after a failed attempt, with the error and when to retry."""
        ...

    async def kill_pending(self, agent: str, reason: str) -> Sequence[str]:
        """Every queued/delivering message of ``agent`` becomes ``dead``; their ids."""
        ...

    async def requeue_dead(self, agent: str) -> Sequence[str]:
        """Every dead message of ``agent`` becomes ``queued`` (same id and seq); their ids."""
        ...

    async def recover(self) -> list[str]:
        """Start-up: ``delivering`` → ``queued``; the agents that have pending messages."""
        ...
