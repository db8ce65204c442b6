"""Mimic: the test agent that runs inside the ``roost-mimic`` image.

It follows DESIGN.md's "Agent container contract" and can be told, by
environment or by message, to misbehave the ways real agents do, so Roost's
tests and benchmarks can provoke every lifecycle path against a real engine.

Standard library only (the image holds a trimmed Debian Python and nothing
else). Endpoints:

- ``GET $HEALTH_PATH`` (default ``/health``): 200 ``{"ok": true}`` when ready;
  503 while ``STARTUP_DELAY`` has not passed; 500 once unhealthy.
- ``POST $MESSAGE_PATH`` (default ``/messages``): a JSON message; the reply is
  JSON. ``{"cmd": ...}`` in the message picks a behaviour, else env ``MODE``
  does (default ``echo``). Commands: ``echo`` (the reply carries ``event_type``
  when the message came with ``Roost-Event-Type``), ``exit`` (``code``),
  ``unhealthy``, ``healthy``, ``hang``, ``oom``, ``sleep`` (``seconds``),
  ``fail`` (``status``, default 500), ``fetch`` (``url``, optional ``method``
  and JSON ``body``: the agent calls that URL and replies with its ``status``
  and ``body`` — how a swarm test sees an agent reach its coordinator),
  ``write_file`` (``path``, ``content``) and ``read_file`` (``path``; 404 when
  absent) — how a test sees two agents share a volume; ``flaky`` (``failures``,
  ``status``, default 503): the first ``failures`` arrivals of this
  ``Roost-Message-Id`` answer ``status``, later ones echo — how a test sees
  Roost retry; ``gather`` (``count``, ``seconds``, default 10): wait until
  ``count`` messages were handled at once while this one is (or ``seconds``
  pass), then reply ``{"gathered": bool, "in_flight": n}`` (n: the most at once
  meanwhile) — how a test sees concurrent delivery.
- ``GET /seen``: every ``Roost-Message-Id`` received, in arrival order
  (redeliveries included), how many are distinct, and the most messages ever
  handled at once (``max_in_flight``).
- ``GET /talkback``: ``{"delivery", "nudges", "connections"}`` (below).
- ``GET /env``: the process environment.
- ``GET /stream?n=N&interval=S``: N chunked JSON lines, S seconds apart.
- ``POST /sleep?seconds=S``: replies after S seconds.

Environment: ``PORT`` (8000), ``HEALTH_PATH``, ``MESSAGE_PATH``, ``MODE``,
``ROOST_AGENT``, ``STARTUP_DELAY``, ``EXIT_AFTER`` + ``EXIT_CODE``,
``UNHEALTHY_AFTER``, ``OOM=1``, ``IGNORE_SIGTERM=1``, ``DELIVERY``.

``DELIVERY`` (default ``push``) picks how messages arrive (DESIGN.md, "Agent
container contract"); the HTTP server above runs in every mode (for ``/seen``
and ``/env``), but only push mode takes messages over it:

- ``pull``: ``PULLERS`` threads (default 1) long-poll
  ``$ROOST_URL/api/agents/$ROOST_AGENT/queue/next?wait=$POLL_WAIT`` (default 20)
  with ``Authorization: Bearer $ROOST_AGENT_TOKEN``, heartbeat while a message
  takes long, and answer it with ``.../queue/{id}/complete``; a complete that
  finds Roost gone is sent again until Roost answers. ``POST /task`` (the nudge)
  is counted (``GET /talkback``: the mode, nudges, WebSocket connections made).
- ``websocket``: a client of ``$ROOST_URL/api/agents/$ROOST_AGENT/ws`` written on
  ``socket`` (RFC 6455: handshake with its accept check, masked client frames,
  fragments, ping/pong, close), reconnecting with backoff, sending a heartbeat
  frame every ``HEARTBEAT_INTERVAL`` seconds (default 10).

Both answer a message with the commands ``echo``, ``sleep``, ``fail`` (an error
answer), ``exit`` (after the answer is sent) and ``gather``; their ids go into
``/seen`` like push mode's.

Invariants:

- The port listens from the first moment; readiness is only ever signalled by
  the health status (never by "port open", which Docker's proxy fakes anyway).
- Once hung, no request gets a response again: every handler blocks forever.
  Signals still work, so ``docker stop`` stays fast.
- A reply to ``exit`` / ``oom`` / ``hang`` is fully written before the process
  dies or stops answering.
- SIGTERM exits 0 at once (unless ``IGNORE_SIGTERM=1``).
- ``oom`` never grows past ``OOM_UNLIMITED_CAP_BYTES`` when the container has
  no memory limit: the host is shared, only a limited cgroup may be exhausted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

MESSAGE_ID_HEADER = "Roost-Message-Id"
EVENT_TYPE_HEADER = "Roost-Event-Type"
OOM_CHUNK_BYTES = 10 * 1024 * 1024
PAGE_BYTES = 4096
OOM_UNLIMITED_CAP_BYTES = 512 * 1024 * 1024
# Paths where a cgroup v2 / v1 container finds its own memory limit.
CGROUP_MEMORY_LIMIT_FILES = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
# cgroup v1 reports "no limit" as a huge page-aligned number.
CGROUP_V1_UNLIMITED_BYTES = 1 << 60
EXIT_AFTER_REPLY_DELAY = 0.05
COMMANDS = (
    "echo",
    "exit",
    "unhealthy",
    "healthy",
    "hang",
    "oom",
    "sleep",
    "fail",
    "fetch",
    "write_file",
    "read_file",
    "flaky",
    "gather",
)
FETCH_TIMEOUT = 10.0
DELIVERY_MODES = ("push", "pull", "websocket")
#: Commands a message taken in pull or WebSocket mode may carry.
BACK_CHANNEL_COMMANDS = ("echo", "sleep", "fail", "exit", "gather")
#: Pause before trying Roost again after a connection failed (it may be restarting).
ROOST_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
#: Longest a complete is sent again while Roost does not answer.
COMPLETE_PATIENCE = 120.0
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _log(line: str) -> None:
    print(f"mimic: {line}", file=sys.stdout, flush=True)


def _optional_float(environ: Mapping[str, str], name: str) -> float | None:
    raw = environ.get(name, "").strip()
    return float(raw) if raw else None


@dataclass(frozen=True)
class Settings:
    """Behaviour chosen by the environment, read once at start."""

    port: int
    health_path: str
    message_path: str
    agent: str | None
    mode: str
    startup_delay: float
    exit_after: float | None
    exit_code: int
    unhealthy_after: float | None
    oom_at_start: bool
    ignore_sigterm: bool
    delivery: str = "push"
    roost_url: str = ""
    token: str = ""
    pullers: int = 1
    poll_wait: float = 20.0
    heartbeat_interval: float = 10.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        mode = environ.get("MODE", "echo").strip() or "echo"
        if mode not in COMMANDS:
            raise SystemExit(f"mimic: MODE must be one of {', '.join(COMMANDS)}, not {mode!r}")
        delivery = environ.get("DELIVERY", "push").strip() or "push"
        if delivery not in DELIVERY_MODES:
            raise SystemExit(
                f"mimic: DELIVERY must be one of {', '.join(DELIVERY_MODES)}, not {delivery!r}"
            )
        return cls(
            port=int(environ.get("PORT", "8000")),
            health_path=environ.get("HEALTH_PATH", "/health"),
            message_path=environ.get("MESSAGE_PATH", "/messages"),
            agent=environ.get("ROOST_AGENT"),
            mode=mode,
            startup_delay=_optional_float(environ, "STARTUP_DELAY") or 0.0,
            exit_after=_optional_float(environ, "EXIT_AFTER"),
            exit_code=int(environ.get("EXIT_CODE", "0")),
            unhealthy_after=_optional_float(environ, "UNHEALTHY_AFTER"),
            oom_at_start=environ.get("OOM", "") not in ("", "0"),
            ignore_sigterm=environ.get("IGNORE_SIGTERM", "") not in ("", "0"),
            delivery=delivery,
            roost_url=environ.get("ROOST_URL", "").rstrip("/"),
            token=environ.get("ROOST_AGENT_TOKEN", ""),
            pullers=max(1, int(environ.get("PULLERS", "1"))),
            poll_wait=float(environ.get("POLL_WAIT", "20")),
            heartbeat_interval=float(environ.get("HEARTBEAT_INTERVAL", "10")),
        )


def _exit_now(code: int) -> None:
    _log(f"exiting with code {code}")
    sys.stdout.flush()
    os._exit(code)


def _exit_soon(code: int, delay: float) -> None:
    timer = threading.Timer(delay, _exit_now, args=(code,))
    timer.daemon = True
    timer.start()


def _memory_limit_bytes() -> int | None:
    for path in CGROUP_MEMORY_LIMIT_FILES:
        try:
            with open(path) as limit_file:
                raw = limit_file.read().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        limit = int(raw)
        return None if limit >= CGROUP_V1_UNLIMITED_BYTES else limit
    return None


def _allocate_until_killed() -> None:
    """Grow resident memory until the kernel's OOM killer ends the process."""
    cap = None if _memory_limit_bytes() is not None else OOM_UNLIMITED_CAP_BYTES
    _log("allocating memory until OOM-killed" + (f" (no limit: capped at {cap})" if cap else ""))
    hoard: list[bytearray] = []
    while cap is None or len(hoard) * OOM_CHUNK_BYTES < cap:
        chunk = bytearray(OOM_CHUNK_BYTES)
        # bytearray memory may be lazily mapped zero pages: touch every page.
        for offset in range(0, OOM_CHUNK_BYTES, PAGE_BYTES):
            chunk[offset] = 1
        hoard.append(chunk)
    _log("allocation cap reached without a memory limit; holding the memory")
    threading.Event().wait()


def _start_oom() -> None:
    threading.Thread(target=_allocate_until_killed, name="mimic-oom", daemon=True).start()


class Mimic:
    """The agent's mutable state, shared by all request threads."""

    def __init__(self, settings: Settings, *, started_at: float) -> None:
        self.settings = settings
        self.started_at = started_at
        self.hung = threading.Event()
        self.unhealthy = threading.Event()
        self._lock = threading.Lock()
        self._seen_ids: list[str] = []
        self._distinct_ids: set[str] = set()
        #: messages being handled right now, and the most ever at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_changed = threading.Condition(self._lock)
        #: each message in flight: the most in flight at once since it came in.
        self._present: list[list[int]] = []
        #: pull mode: nudges received; WebSocket mode: connections made.
        self.nudges = 0
        self.connections = 0

    def is_started(self) -> bool:
        return time.monotonic() - self.started_at >= self.settings.startup_delay

    def health_status(self) -> HTTPStatus:
        if not self.is_started():
            return HTTPStatus.SERVICE_UNAVAILABLE
        unhealthy_after = self.settings.unhealthy_after
        if self.unhealthy.is_set() or (
            unhealthy_after is not None and time.monotonic() - self.started_at >= unhealthy_after
        ):
            return HTTPStatus.INTERNAL_SERVER_ERROR
        return HTTPStatus.OK

    def record_message_id(self, message_id: str | None) -> int:
        """Remember an arrival; return how many distinct ids have arrived so far."""
        with self._lock:
            if message_id is not None:
                self._seen_ids.append(message_id)
                self._distinct_ids.add(message_id)
            return len(self._distinct_ids)

    def arrivals(self, message_id: str | None) -> int:
        """How many times this message id has arrived (this one included)."""
        with self._lock:
            return self._seen_ids.count(message_id) if message_id is not None else 1

    def enter(self) -> list[int]:
        """A message comes in: its presence, ``[the most in flight while it is in]``."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            for present in self._present:
                present[0] = max(present[0], self.in_flight)
            presence = [self.in_flight]
            self._present.append(presence)
            self.in_flight_changed.notify_all()
            return presence

    def leave(self, presence: list[int]) -> None:
        with self._lock:
            self.in_flight -= 1
            self._present.remove(presence)
            self.in_flight_changed.notify_all()

    def gather(self, presence: list[int], count: int, seconds: float) -> tuple[bool, int]:
        """Wait until ``count`` messages were in flight at once while this one (its
        ``presence``) is in; (reached, the most in flight meanwhile). Peaks are kept per
        message, so one that finishes first cannot hide a peak from the others."""
        with self._lock:
            reached = self.in_flight_changed.wait_for(lambda: presence[0] >= count, seconds)
            return reached, presence[0]

    def record_nudge(self) -> None:
        with self._lock:
            self.nudges += 1

    def seen(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ids": list(self._seen_ids),
                "distinct": len(self._distinct_ids),
                "max_in_flight": self.max_in_flight,
            }

    def talkback(self) -> dict[str, Any]:
        with self._lock:
            return {
                "delivery": self.settings.delivery,
                "nudges": self.nudges,
                "connections": self.connections,
            }


class MimicServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], mimic: Mimic) -> None:
        self.mimic = mimic
        super().__init__(address, MimicHandler)


class MimicHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY the body waits
    # for the client's delayed ACK (~40 ms) on every kept-alive request.
    disable_nagle_algorithm = True
    server_version = "mimic/1"

    @property
    def mimic(self) -> Mimic:
        return cast(MimicServer, self.server).mimic

    # -- plumbing -------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        _log(f"{self.address_string()} {format % args}")

    def _block_if_hung(self) -> None:
        if self.mimic.hung.is_set():
            threading.Event().wait()

    def _send_json(self, status: HTTPStatus | int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _query(self) -> dict[str, str]:
        return {key: values[-1] for key, values in parse_qs(urlsplit(self.path).query).items()}

    def _route(self) -> str:
        return urlsplit(self.path).path

    # -- verbs ----------------------------------------------------------

    def do_GET(self) -> None:
        self._block_if_hung()
        route = self._route()
        if route == self.mimic.settings.health_path:
            status = self.mimic.health_status()
            self._send_json(status, {"ok": status == HTTPStatus.OK})
        elif route == "/seen":
            self._send_json(HTTPStatus.OK, self.mimic.seen())
        elif route == "/talkback":
            self._send_json(HTTPStatus.OK, self.mimic.talkback())
        elif route == "/env":
            self._send_json(HTTPStatus.OK, dict(os.environ))
        elif route == "/stream":
            query = self._query()
            self._stream(int(query.get("n", "3")), float(query.get("interval", "0")))
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {route}"})

    def do_POST(self) -> None:
        self._block_if_hung()
        route = self._route()
        raw_body = self._read_body()
        if route == self.mimic.settings.message_path and self.mimic.settings.delivery == "push":
            presence = self.mimic.enter()
            try:
                self._handle_message(raw_body, presence)
            finally:
                self.mimic.leave(presence)
        elif route == "/task":
            # A pull agent's nudge: counted, nothing else (the pollers take the message).
            self.mimic.record_nudge()
            self._send_json(HTTPStatus.OK, {"nudged": True})
        elif route == "/sleep":
            seconds = float(self._query().get("seconds", "0"))
            time.sleep(seconds)
            self._send_json(HTTPStatus.OK, {"slept": seconds})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {route}"})

    # -- behaviours -----------------------------------------------------

    def _stream(self, chunk_count: int, interval: float) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index in range(chunk_count):
                if index and interval > 0:
                    time.sleep(interval)
                data = json.dumps({"chunk": index}).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _handle_message(self, raw_body: bytes, presence: list[int]) -> None:
        mimic = self.mimic
        if not mimic.is_started():
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "starting"})
            return
        try:
            message: Any = json.loads(raw_body or b"null")
        except ValueError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
            return
        message_id = self.headers.get(MESSAGE_ID_HEADER)
        distinct_count = mimic.record_message_id(message_id)
        fields: dict[str, Any] = message if isinstance(message, dict) else {}
        command = fields.get("cmd", mimic.settings.mode)
        if command not in COMMANDS:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"unknown cmd {command!r}"})
            return
        if command == "echo":
            reply = {
                "echo": message,
                "agent": mimic.settings.agent,
                "message_id": message_id,
                "count": distinct_count,
            }
            event_type = self.headers.get(EVENT_TYPE_HEADER)
            if event_type is not None:  # a routed message says what it was routed by
                reply["event_type"] = event_type
            self._send_json(HTTPStatus.OK, reply)
        elif command == "exit":
            code = int(fields.get("code", mimic.settings.exit_code))
            self._send_json(HTTPStatus.OK, {"exiting": code})
            self.close_connection = True
            _exit_soon(code, EXIT_AFTER_REPLY_DELAY)
        elif command == "unhealthy":
            mimic.unhealthy.set()
            self._send_json(HTTPStatus.OK, {"unhealthy": True})
        elif command == "healthy":
            mimic.unhealthy.clear()
            self._send_json(HTTPStatus.OK, {"unhealthy": False})
        elif command == "hang":
            self._send_json(HTTPStatus.OK, {"hanging": True})
            self.close_connection = True
            mimic.hung.set()
        elif command == "oom":
            self._send_json(HTTPStatus.OK, {"oom": True})
            self.close_connection = True
            _start_oom()
        elif command == "sleep":
            seconds = float(fields.get("seconds", 0))
            time.sleep(seconds)
            self._send_json(HTTPStatus.OK, {"slept": seconds, "message_id": message_id})
        elif command == "fetch":
            self._fetch(fields)
        elif command == "write_file":
            self._write_file(fields)
        elif command == "read_file":
            self._read_file(fields)
        elif command == "flaky":
            if mimic.arrivals(message_id) <= int(fields.get("failures", 1)):
                status = int(fields.get("status", HTTPStatus.SERVICE_UNAVAILABLE))
                self._send_json(status, {"error": "flaky on request", "message_id": message_id})
            else:
                self._send_json(HTTPStatus.OK, {"echo": message, "message_id": message_id})
        elif command == "gather":
            reached, in_flight = mimic.gather(
                presence, int(fields.get("count", 2)), float(fields.get("seconds", 10))
            )
            self._send_json(HTTPStatus.OK, {"gathered": reached, "in_flight": in_flight})
        else:  # "fail"
            status = int(fields.get("status", HTTPStatus.INTERNAL_SERVER_ERROR))
            self._send_json(status, {"error": "failing on request", "message_id": message_id})

    def _fetch(self, fields: dict[str, Any]) -> None:
        url = fields.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "fetch needs an http(s) 'url'"})
            return
        data = None
        headers = {}
        if "body" in fields:
            data = json.dumps(fields["body"]).encode()
            headers["Content-Type"] = "application/json"
        method = str(fields.get("method") or ("POST" if data is not None else "GET")).upper()
        request = Request(url, data=data, headers=headers, method=method)
        try:
            with urlopen(request, timeout=FETCH_TIMEOUT) as response:
                status, body = response.status, response.read()
        except HTTPError as exc:
            status, body = exc.code, exc.read()
        except (URLError, OSError) as exc:
            self._send_json(HTTPStatus.BAD_GATEWAY, {"error": f"fetch {url} failed: {exc}"})
            return
        self._send_json(
            HTTPStatus.OK, {"url": url, "status": status, "body": body.decode("utf-8", "replace")}
        )

    def _write_file(self, fields: dict[str, Any]) -> None:
        path, content = fields.get("path"), fields.get("content", "")
        if not isinstance(path, str) or not isinstance(content, str):
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "write_file needs 'path', 'content'"})
            return
        try:
            with open(path, "w", encoding="utf-8") as target:
                target.write(content)
        except OSError as exc:
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        self._send_json(HTTPStatus.OK, {"path": path, "written": len(content)})

    def _read_file(self, fields: dict[str, Any]) -> None:
        path = fields.get("path")
        if not isinstance(path, str):
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "read_file needs 'path'"})
            return
        try:
            with open(path, encoding="utf-8") as source:
                content = source.read()
        except FileNotFoundError:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no file {path}"})
            return
        except OSError as exc:
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        self._send_json(HTTPStatus.OK, {"path": path, "content": content})


# -- pull and WebSocket modes: the agent calls Roost --------------------------------


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _retry_delay(failures: int) -> float:
    return ROOST_RETRY_DELAYS[min(failures, len(ROOST_RETRY_DELAYS) - 1)]


def answer(mimic: Mimic, body: Any, message_id: str | None) -> tuple[bool, Any]:
    """Handle a message taken in pull or WebSocket mode: (ok, reply) or (False, error)."""
    distinct_count = mimic.record_message_id(message_id)
    fields: dict[str, Any] = body if isinstance(body, dict) else {}
    command = fields.get("cmd", mimic.settings.mode)
    presence = mimic.enter()
    try:
        if command == "echo":
            return True, {
                "echo": body,
                "agent": mimic.settings.agent,
                "message_id": message_id,
                "count": distinct_count,
            }
        if command == "sleep":
            seconds = float(fields.get("seconds", 0))
            time.sleep(seconds)
            return True, {"slept": seconds, "message_id": message_id}
        if command == "fail":
            return False, f"failing on request ({message_id})"
        if command == "exit":
            code = int(fields.get("code", mimic.settings.exit_code))
            _exit_soon(code, EXIT_AFTER_REPLY_DELAY)
            return True, {"exiting": code}
        if command == "gather":
            reached, in_flight = mimic.gather(
                presence, int(fields.get("count", 2)), float(fields.get("seconds", 10))
            )
            return True, {"gathered": reached, "in_flight": in_flight}
        return False, f"command {command!r} is not one of {', '.join(BACK_CHANNEL_COMMANDS)}"
    finally:
        mimic.leave(presence)


class Puller:
    """One pull-mode poller: take, heartbeat while working, complete."""

    def __init__(self, mimic: Mimic) -> None:
        self.mimic = mimic
        settings = mimic.settings
        self.queue = f"{settings.roost_url}/api/agents/{settings.agent}/queue"
        self.headers = {
            "Authorization": f"Bearer {settings.token}",
            "Content-Type": "application/json",
        }

    def _post(self, url: str, body: Any, timeout: float) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        request = Request(url, data=data, headers=self.headers, method="POST")
        try:
            with urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def run(self) -> None:
        wait = self.mimic.settings.poll_wait
        failures = 0
        while True:
            try:
                status, lease = self._post(f"{self.queue}/next?wait={wait:g}", None, wait + 30)
            except (URLError, OSError) as exc:
                time.sleep(_retry_delay(failures))
                failures += 1
                if failures in (1, 20):
                    _log(f"pull: Roost does not answer ({exc}); trying again")
                continue
            failures = 0
            if status == 204:
                continue
            if status != 200 or not isinstance(lease, dict):
                _log(f"pull: queue/next answered {status}: {lease}")
                time.sleep(_retry_delay(4))
                continue
            self._work(lease)

    def _work(self, lease: dict[str, Any]) -> None:
        message_id = str(lease["id"])
        done = threading.Event()
        beating = _thread(lambda: self._heartbeat(lease, done), f"mimic-heartbeat-{message_id}")
        try:
            ok, value = answer(self.mimic, lease.get("body"), message_id)
        finally:
            done.set()
            beating.join()
        self._complete(message_id, {"reply": value} if ok else {"error": str(value)})

    def _heartbeat(self, lease: dict[str, Any], done: threading.Event) -> None:
        """Renew the lease at a third of what is left of it, until the work is done."""
        expires_at = float(lease.get("lease_expires_at") or 0)
        while True:
            left = max(0.05, (expires_at - time.time()) / 3)
            if done.wait(left):
                return
            try:
                status, body = self._post(f"{self.queue}/{lease['id']}/heartbeat", None, 10)
            except (URLError, OSError):
                continue  # Roost is away: it offers the message again if it expires
            if status == 409:
                _log(f"pull: lease on {lease['id']} lost: {body}")
                return
            if status == 200 and isinstance(body, dict):
                expires_at = float(body.get("lease_expires_at") or expires_at)

    def _complete(self, message_id: str, outcome: dict[str, Any]) -> None:
        deadline = time.monotonic() + COMPLETE_PATIENCE
        failures = 0
        while True:
            try:
                status, body = self._post(f"{self.queue}/{message_id}/complete", outcome, 30)
            except (URLError, OSError):
                if time.monotonic() > deadline:
                    _log(f"pull: gave up completing {message_id}: Roost does not answer")
                    return
                time.sleep(_retry_delay(failures))
                failures += 1
                continue
            if status != 200:
                _log(f"pull: complete of {message_id} answered {status}: {body}")
            return


class WebSocketClosed(Exception):
    """The connection ended (closed, reset, or a protocol error)."""


class WebSocket:
    """A minimal RFC 6455 client over a blocking socket: text frames only out,
    masked as a client must; in, text/binary messages assembled from fragments,
    pings answered, a close echoed. Sends are serialised by a lock."""

    def __init__(self, sock: socket.socket, buffered: bytes) -> None:
        self.sock = sock
        self._buffer = buffered
        self._send_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, headers: dict[str, str], timeout: float = 10.0) -> WebSocket:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "http"):
            raise ValueError(f"only ws:// or http:// URLs, not {url!r}")
        host, port = parts.hostname or "localhost", parts.port or 80
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {parts.path or '/'} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                raise WebSocketClosed(f"handshake: connection closed after {head!r}")
            head += chunk
            if len(head) > 65536:
                sock.close()
                raise WebSocketClosed("handshake: response head too large")
        head, rest = head.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
        if status_line.split(" ")[1:2] != ["101"] or fields.get("sec-websocket-accept") != expected:
            sock.close()
            raise WebSocketClosed(f"handshake refused: {status_line}")
        sock.settimeout(None)
        return cls(sock, rest)

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WebSocketClosed("connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        fin, opcode = bool(first & 0x80), first & 0x0F
        masked, length = bool(second & 0x80), second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        mask = self._read(4) if masked else b""
        payload = self._read(length)
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return fin, opcode, payload

    def receive(self) -> str:
        """The next text (or binary) message; WebSocketClosed when it ends."""
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:  # close: echo it, then we are done
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._send(0x8, payload[:2])
                raise WebSocketClosed(f"closed by Roost (code {code}: {payload[2:]!r})")
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode == 0xA:  # pong
                continue
            if opcode in (0x1, 0x2, 0x0):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode("utf-8")
                continue
            raise WebSocketClosed(f"unknown opcode {opcode}")

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode("utf-8"))

    def _send(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self._send_lock:
            try:
                self.sock.sendall(header + mask + masked)
            except OSError as exc:
                raise WebSocketClosed(f"send failed: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class WebSocketAgent:
    """WebSocket mode: connect (again and again), answer message frames, heartbeat."""

    def __init__(self, mimic: Mimic) -> None:
        self.mimic = mimic
        settings = mimic.settings
        self.url = f"{settings.roost_url}/api/agents/{settings.agent}/ws"
        self.headers = {"Authorization": f"Bearer {settings.token}"}

    def run(self) -> None:
        failures = 0
        while True:
            try:
                ws = WebSocket.connect(self.url, self.headers)
            except (OSError, WebSocketClosed) as exc:
                if failures in (0, 20):
                    _log(f"websocket: cannot connect to {self.url}: {exc}")
                time.sleep(_retry_delay(failures))
                failures += 1
                continue
            failures = 0
            with self.mimic._lock:
                self.mimic.connections += 1
            _log("websocket: connected")
            self._serve(ws)

    def _serve(self, ws: WebSocket) -> None:
        closed = threading.Event()
        _thread(lambda: self._heartbeats(ws, closed), "mimic-ws-heartbeat")
        try:
            while True:
                frame = json.loads(ws.receive())
                if isinstance(frame, dict) and frame.get("type") == "message":
                    threading.Thread(
                        target=self._answer, args=(ws, frame), name="mimic-ws-message", daemon=True
                    ).start()
        except (WebSocketClosed, OSError, ValueError) as exc:
            _log(f"websocket: connection ended: {exc}")
        finally:
            closed.set()
            ws.close()

    def _answer(self, ws: WebSocket, frame: dict[str, Any]) -> None:
        message_id = str(frame.get("id"))
        ok, value = answer(self.mimic, frame.get("body"), message_id)
        reply = (
            {"type": "reply", "id": message_id, "reply": value}
            if ok
            else {"type": "error", "id": message_id, "error": str(value)}
        )
        try:
            ws.send_text(json.dumps(reply))
        except WebSocketClosed as exc:
            _log(f"websocket: reply to {message_id} not sent: {exc}")

    def _heartbeats(self, ws: WebSocket, closed: threading.Event) -> None:
        while not closed.wait(self.mimic.settings.heartbeat_interval):
            try:
                ws.send_text(json.dumps({"type": "heartbeat"}))
            except WebSocketClosed:
                return


def _install_signal_handlers(settings: Settings) -> None:
    def on_terminate(signum: int, frame: FrameType | None) -> None:
        _log(f"received signal {signum}")
        _exit_now(0)

    if settings.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGINT, on_terminate)


def main() -> None:
    settings = Settings.from_environ(os.environ)
    mimic = Mimic(settings, started_at=time.monotonic())
    _install_signal_handlers(settings)
    server = MimicServer(("0.0.0.0", settings.port), mimic)
    if settings.exit_after is not None:
        _exit_soon(settings.exit_code, settings.exit_after)
    if settings.oom_at_start:
        _start_oom()
    _log(
        f"listening on 0.0.0.0:{settings.port} agent={settings.agent} mode={settings.mode} "
        f"delivery={settings.delivery} pid={os.getpid()}"
    )
    if settings.delivery == "pull":
        for index in range(settings.pullers):
            _thread(Puller(mimic).run, f"mimic-puller-{index}")
    elif settings.delivery == "websocket":
        _thread(WebSocketAgent(mimic).run, "mimic-websocket")
    server.serve_forever()


if __name__ == "__main__":
    main()
