"""Notifier adapters: a log line always, plus an optional JSON webhook.

Role: implement :class:`roost.ports.notifier.Notifier`. ``notify(kind, payload)``
writes one line to the ``roost.notify`` logger (WARNING for ``agent.failed``,
INFO otherwise) and, when a URL is configured, POSTs
``{"kind": kind, "at": <ISO-8601 UTC>, **payload}`` as JSON.

Invariants:
- ``notify`` never raises (only cancellation propagates): every failure is logged.
- The log line is one line and carries only chosen fields (agent, exit code,
  OOM flag, restart count, error, first/last line of the log tail), never env
  values or the whole log tail.
- A failed POST (connection error, timeout, 5xx, 429) is retried after each delay
  of ``retry`` (a ``Backoff`` budget, default 0.5, 1, 2 s: three retries); other
  4xx are not retried. One attempt takes at most ``timeout`` seconds, so ``notify``
  returns within ``timeout * (1 + budget) + sum(delays)``. Retry pauses run on the
  injected clock.
- One aiohttp ``ClientSession``, created on first use inside the loop, closed by
  ``aclose()``; after ``aclose()`` notifications are only logged.
- A notification that is given up (every attempt failed, or not retryable) is
  reported to ``on_failure(kind)`` when given (metrics count them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import logging
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from roost.adapters.system_clock import SystemClock
from roost.core.backoff import Backoff
from roost.ports.clock import Clock
from roost.ports.notifier import Notifier

__all__ = ["DEFAULT_RETRY", "LogNotifier", "MultiNotifier", "WebhookNotifier"]

DEFAULT_RETRY = Backoff((0.5, 1.0, 2.0))
NOTIFY_LOGGER = "roost.notify"
_MAX_FIELD_CHARS = 200
_USER_AGENT = "roost-notifier/0.1"


# --------------------------------------------------------------------------- log line


def _clip(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the input
    return text if len(text) <= _MAX_FIELD_CHARS else text[: _MAX_FIELD_CHARS - 1] + "…"


def _tail_edges(log_tail: str) -> tuple[str, str, int]:
    lines = [line for line in log_tail.splitlines() if line.strip()]
    if not lines:
        return "", "", 0
    return lines[0], lines[-1], len(lines)


def describe(kind: str, payload: dict[str, Any]) -> str:
    """One log line for a notification: selected fields only (never env, never the full tail)."""
    parts = [f"notify {kind}"]
    for field in ("agent", "job", "exit_code", "oom_killed", "restart_count", "max_restarts"):
        if field in payload and payload[field] is not None:
            value = payload[field]
            shown = str(value).lower() if isinstance(value, bool) else _clip(str(value))
            parts.append(f"{field}={shown}")
    error = payload.get("error")
    if error:
        parts.append(f"error={json.dumps(_clip(str(error)), ensure_ascii=False)}")
    log_tail = payload.get("log_tail")
    if isinstance(log_tail, str):
        first, last, count = _tail_edges(log_tail)
        if count:
            parts.append(f"log_first={json.dumps(_clip(first), ensure_ascii=False)}")
            if count > 1:
                parts.append(f"log_last={json.dumps(_clip(last), ensure_ascii=False)}")
            parts.append(f"log_lines={count}")
    return " ".join(parts)


def _level(kind: str) -> int:
    return logging.WARNING if kind == "agent.failed" else logging.INFO


def _log_notification(logger: logging.Logger, kind: str, payload: dict[str, Any]) -> None:
    try:
        logger.log(_level(kind), "%s", describe(kind, payload))
    except Exception:  # a notifier must not raise, not even for an odd payload
        logger.exception("could not format notification %s", kind)


# --------------------------------------------------------------------------- JSON body


def _jsonable(value: object) -> Any:
    """``json.dumps`` fallback for what payloads may carry besides plain JSON."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class _PostFailed(Exception):
    """One delivery attempt failed; ``retry`` says whether another may help."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


# --------------------------------------------------------------------------- notifiers


class LogNotifier:
    """Log-only notifier: one line per notification on ``roost.notify``."""

    def __init__(self, *, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(NOTIFY_LOGGER)

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        _log_notification(self._logger, kind, payload)

    async def aclose(self) -> None:
        """Nothing to release (symmetry with the other notifiers)."""


class WebhookNotifier:
    """Logs every notification and, if ``url`` is set, POSTs it as JSON.

    ``clock`` supplies the ``at`` timestamp and the retry pauses, so tests can run
    retries on fake time.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        logger: logging.Logger | None = None,
        retry: Backoff = DEFAULT_RETRY,
        clock: Clock | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self._on_failure = on_failure
        self.timeout = timeout
        if retry.repeat:
            raise ValueError("webhook retries are a budget: pass a Backoff without repeat")
        self.retry = retry
        self._logger = logger or logging.getLogger(NOTIFY_LOGGER)
        self._clock: Clock = clock or SystemClock()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        _log_notification(self._logger, kind, payload)
        if not self.url:
            return
        if self._closed:
            self._logger.warning("webhook notifier is closed; %s not delivered", kind)
            return
        try:
            body = self._body(kind, payload)
        except Exception:
            self._logger.exception("webhook: could not encode %s as JSON; not delivered", kind)
            if self._on_failure is not None:
                self._on_failure(kind)
            return
        await self._deliver(kind, body)

    async def aclose(self) -> None:
        """Close the HTTP session. Idempotent; later notifications are only logged."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- internals ----------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock.now(), tz=dt.UTC)

    def _body(self, kind: str, payload: dict[str, Any]) -> bytes:
        document = {"kind": kind, "at": self._now().isoformat(), **payload}
        return json.dumps(document, default=_jsonable, ensure_ascii=False).encode()

    def _session_for_loop(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": _USER_AGENT},
            )
        return self._session

    async def _deliver(self, kind: str, body: bytes) -> None:
        # One id for every attempt, so a receiver can drop duplicates of a retried POST.
        delivery_id = uuid.uuid4().hex
        attempts = 1 + len(self.retry.delays)
        for attempt in range(1, attempts + 1):
            try:
                await self._post(body, delivery_id)
                if attempt > 1:
                    self._logger.info("webhook: %s delivered on attempt %d", kind, attempt)
                return
            except _PostFailed as exc:
                if not exc.retry or attempt == attempts:
                    self._logger.warning(
                        "webhook: %s not delivered to %s after %d attempt(s): %s",
                        kind,
                        self._safe_url(),
                        attempt,
                        exc,
                    )
                    if self._on_failure is not None:
                        self._on_failure(kind)
                    return
                self._logger.info(
                    "webhook: %s attempt %d failed (%s); retrying", kind, attempt, exc
                )
                await self._clock.sleep(self.retry.delays[attempt - 1])

    async def _post(self, body: bytes, delivery_id: str) -> None:
        try:
            session = self._session_for_loop()
            async with session.post(
                self.url,
                data=body,
                headers={"Content-Type": "application/json", "X-Roost-Delivery": delivery_id},
            ) as response:
                await response.read()
                if response.status >= 400:
                    raise _PostFailed(f"HTTP {response.status}", retry=_retryable(response.status))
        except TimeoutError as exc:
            raise _PostFailed(f"timed out after {self.timeout:g}s", retry=True) from exc
        except aiohttp.InvalidURL as exc:
            raise _PostFailed("invalid URL", retry=False) from exc
        except aiohttp.ClientError as exc:
            raise _PostFailed(f"{type(exc).__name__}: {exc}", retry=True) from exc
        except _PostFailed:
            raise
        except Exception as exc:  # never let a notifier raise into the reactor
            raise _PostFailed(f"{type(exc).__name__}: {exc}", retry=False) from exc

    def _safe_url(self) -> str:
        # Webhook URLs often carry a secret in the path or query (Slack, Discord):
        # log the origin only.
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class MultiNotifier:
    """Fans one notification out to several notifiers, concurrently."""

    def __init__(self, *notifiers: Notifier, logger: logging.Logger | None = None) -> None:
        self.notifiers = notifiers
        self._logger = logger or logging.getLogger(NOTIFY_LOGGER)

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        results = await asyncio.gather(
            *(notifier.notify(kind, payload) for notifier in self.notifiers),
            return_exceptions=True,
        )
        for notifier, result in zip(self.notifiers, results, strict=True):
            if isinstance(result, BaseException):
                self._logger.error(
                    "notifier %s raised on %s", type(notifier).__name__, kind, exc_info=result
                )

    async def aclose(self) -> None:
        for notifier in self.notifiers:
            aclose = getattr(notifier, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    self._logger.exception("closing notifier %s failed", type(notifier).__name__)
