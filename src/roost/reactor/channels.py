"""WebSocket back-channels: agents with ``delivery = "websocket"`` connected to Roost.

Role: an agent in WebSocket mode runs no HTTP server; it connects to
``GET /api/agents/{name}/ws`` (``roost.api.agent_endpoints`` serves it and feeds
every frame here) and gets its messages as frames over that connection:

    Roost → agent   {"type": "message", "id", "body", "event_type", "attempt"}
    agent → Roost   {"type": "reply", "id", "reply"}
                    {"type": "error", "id", "error"}
                    {"type": "heartbeat"}

This module knows nothing of Starlette: a connection is a :class:`Link` (send a
text frame, close). A message frame carries the stored body spliced in unparsed
(``spliced_json``); a reply frame's ``reply`` is kept as its JSON text. The supervisor asks :meth:`Channels.wait_connected` whether
a started container is ready (running *and* connected) and :meth:`connected`
for liveness; the delivery lane sends with :meth:`Channels.request`.

Invariants:
- At most one channel per agent: a new connection replaces the old one, which is
  closed (code 4000). A channel whose token was revoked (its container was
  replaced, or the agent deleted) is closed too.
- A message sent on a channel is answered at most once there; when the channel
  closes first, its request ends as ``no_answer`` and the lane sends it again on
  the next connection (``attempt`` + 1). Replies naming no message in flight on
  that channel are ignored (a late reply from before a reconnect).
- Waits run on the injected clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from roost import aio
from roost.ports.clock import Clock
from roost.ports.inbox import Message, spliced_json
from roost.reactor.attempts import Outcome

__all__ = ["CLOSE_REPLACED", "CLOSE_REVOKED", "Channel", "Channels", "Link"]

log = logging.getLogger("roost.channels")

#: Close codes Roost uses (4000-4999 are the application's).
CLOSE_REPLACED = 4000
CLOSE_REVOKED = 4001
CLOSE_SHUTDOWN = 1001


class Link(Protocol):
    """One open WebSocket, as the channel sees it."""

    async def send_text(self, frame: str) -> None:
        """Send one text frame (a JSON object)."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class Channel:
    """One agent's open connection and the messages in flight on it."""

    def __init__(self, agent: str, link: Link, *, token_hash: str | None) -> None:
        self.agent = agent
        self.link = link
        #: the token it authenticated with; None: the admin token (never revoked).
        self.token_hash = token_hash
        self.pending: dict[str, asyncio.Future[Outcome]] = {}
        self.closed = False


class Channels:
    """Every connected WebSocket agent (see the module docstring)."""

    def __init__(self, *, clock: Clock) -> None:
        self._clock = clock
        self._current: dict[str, Channel] = {}
        #: per agent: set (and replaced) whenever a channel attaches.
        self._attached: dict[str, asyncio.Event] = {}
        self._closing = aio.TaskSet(log)

    # -- connections -------------------------------------------------------------

    def attach(self, agent: str, link: Link, *, token_hash: str | None) -> Channel:
        """A connection of ``agent`` opened: it is the agent's channel from now on."""
        old = self._current.get(agent)
        if old is not None:
            self._drop(old, "replaced by a newer connection")
            self._close_link(old, CLOSE_REPLACED, "replaced by a newer connection")
        channel = Channel(agent, link, token_hash=token_hash)
        self._current[agent] = channel
        event = self._attached.pop(agent, None)
        if event is not None:
            event.set()
        log.info("agent %s: WebSocket connected", agent)
        return channel

    def detach(self, channel: Channel, reason: str) -> None:
        """The connection closed (or failed): what was in flight on it gets no answer."""
        if not channel.closed:
            log.info("agent %s: WebSocket closed (%s)", channel.agent, reason)
        self._drop(channel, reason)

    def revoke(self, agent: str, token_hash: str | None) -> None:
        """The agent's valid token is now ``token_hash`` (None: none): close a channel
        that authenticated with another agent token."""
        channel = self._current.get(agent)
        if channel is None or channel.token_hash is None or channel.token_hash == token_hash:
            return
        self._drop(channel, "its token was revoked")
        self._close_link(channel, CLOSE_REVOKED, "token revoked: the container was replaced")

    def connected(self, agent: str) -> bool:
        return agent in self._current

    async def wait_connected(self, agent: str, timeout: float) -> bool:
        """True once the agent has a channel; False when ``timeout`` passes first."""
        deadline = self._clock.monotonic() + timeout
        while agent not in self._current:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return False
            event = self._attached.setdefault(agent, asyncio.Event())
            await aio.sleep(self._clock, remaining, wakeup=event)
        return True

    async def close(self) -> None:
        """Shutdown: close every channel (agents reconnect to the next Roost)."""
        for channel in list(self._current.values()):
            self._drop(channel, "roost is shutting down")
            self._close_link(channel, CLOSE_SHUTDOWN, "roost is shutting down")
        await self._closing.join()

    # -- messages ----------------------------------------------------------------

    async def request(
        self, agent: str, message: Message, *, attempt: int, timeout: float
    ) -> Outcome:
        """Send the message on the agent's channel and wait for its reply frame."""
        channel = self._current.get(agent)
        if channel is None:
            return Outcome.no_answer("the agent's WebSocket is not connected")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        channel.pending[message.id] = future
        frame = spliced_json(
            {
                "type": "message",
                "id": message.id,
                "event_type": message.event_type,
                "attempt": attempt,
            },
            {"body": message.body},
        ).decode()
        try:
            try:
                await channel.link.send_text(frame)
            except Exception as exc:  # the connection broke under us
                self._drop(channel, f"send failed: {type(exc).__name__}")
                return Outcome.no_answer(f"the WebSocket failed while sending: {exc!r}")
            answered = asyncio.Event()
            future.add_done_callback(lambda _: answered.set())
            await aio.sleep(self._clock, timeout, wakeup=answered)
            if not future.done():
                return Outcome.no_answer(f"no reply on the WebSocket within {timeout:g}s")
            return future.result()
        finally:
            if channel.pending.get(message.id) is future:
                del channel.pending[message.id]

    def received(self, channel: Channel, frame: Any) -> str | None:
        """Handle one frame from the agent. Returns why the connection must be
        closed (a frame that breaks the protocol), or None."""
        if not isinstance(frame, dict):
            return "a frame must be a JSON object"
        kind = frame.get("type")
        if kind == "heartbeat":
            return None
        if kind not in ("reply", "error"):
            return f"unknown frame type {kind!r}: expected 'reply', 'error' or 'heartbeat'"
        message_id = frame.get("id")
        if not isinstance(message_id, str):
            return f"a {kind!r} frame needs the message's 'id' (a string)"
        future = channel.pending.get(message_id)
        if future is None or future.done():
            log.debug(
                "agent %s: reply for %s, not in flight here; ignored", channel.agent, message_id
            )
            return None
        if kind == "reply":
            future.set_result(Outcome.reply(json.dumps(frame.get("reply")).encode()))
        else:
            error = frame.get("error")
            future.set_result(Outcome.error(error if isinstance(error, str) else repr(error)))
        return None

    # -- internals ---------------------------------------------------------------

    def _drop(self, channel: Channel, reason: str) -> None:
        channel.closed = True
        if self._current.get(channel.agent) is channel:
            del self._current[channel.agent]
        for future in channel.pending.values():
            if not future.done():
                future.set_result(Outcome.no_answer(f"the WebSocket closed: {reason}"))
        channel.pending.clear()

    def _close_link(self, channel: Channel, code: int, reason: str) -> None:
        async def close() -> None:
            try:
                await channel.link.close(code, reason)
            except Exception as exc:
                log.debug("agent %s: closing its WebSocket: %r", channel.agent, exc)

        self._closing.spawn(close(), f"roost.ws-close[{channel.agent}]")
