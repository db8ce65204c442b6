"""How one delivery attempt of a message ended, whatever the delivery mode.

Role: the common answer of the three ways a message reaches an agent (a POST in
push mode, a lease in pull mode, a frame on the agent's WebSocket), so the
delivery lane (``roost.reactor.delivering``) decides what comes next in one
place: ``delivered``, ``failed``, a retry, or ``dead`` after ``max_attempts``.

- ``reply``: the agent answered; ``value`` is the reply as a JSON text, bytes
  (→ ``delivered``);
- ``error``: the agent answered that it failed the message (push: a 4xx; pull:
  ``complete`` with ``error``; WebSocket: an ``error`` frame) — final (→ ``failed``);
- ``server_error``: push only, a 5xx: retried, up to the dispatcher's limit;
- ``no_answer``: nothing came back (no connection, a timeout, an expired lease, a
  WebSocket closed before the reply) — retried;
- ``settled``: someone else recorded the outcome already (a pull agent completed
  the message while it was between leases): the lane just moves on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["Outcome", "OutcomeKind"]

OutcomeKind = Literal["reply", "error", "server_error", "no_answer", "settled"]


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    #: the reply's JSON text (``reply``), or what went wrong (the other kinds).
    value: Any = None

    @classmethod
    def reply(cls, text: bytes) -> Outcome:
        """The agent's reply, a JSON text (stored as it is)."""
        return cls("reply", text)

    @classmethod
    def error(cls, text: str) -> Outcome:
        return cls("error", text)

    @classmethod
    def no_answer(cls, text: str) -> Outcome:
        return cls("no_answer", text)
