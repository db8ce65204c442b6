"""Roost's exception tree. Every error Roost raises on purpose is one of these.

    RoostError
    ├── Refusal                an answer Roost gives a client itself: an HTTP status and a
    │                          message (401 token, 413 body, 400 bad JSON, 503 still waking ...)
    ├── ConfigError            bad configuration; names the key and the file (CLI exit 2)
    ├── StateError             an operation that the agent's state does not allow
    ├── NotFound               an agent, message, job or container that does not exist
    │   └── ContainerNotFound
    ├── Conflict               a compare-and-set write lost, or a name already taken
    ├── StoreError             the state database failed or is locked by another Roost
    │   ├── StorageFull        the disk (or the database) is full: nothing more can be stored
    │   └── AlreadyRunning     another Roost holds the state directory lock
    └── ContainerError         Docker failed or a container misbehaved (library contract name)
        ├── DockerUnavailable  the engine cannot be reached
        ├── ImageUnavailable   an image is absent and cannot be pulled (terminal)
        └── StartupTimeout     a container did not become healthy in time; carries the log tail
    └── AgentHTTPError         HTTP to an agent failed: refused, reset, cut or invalid answer
        │                      (also a ConnectionError; the proxy answers 502)
        └── AgentTimeout       the agent did not answer in time (also a TimeoutError; 504)

Third-party errors (aiodocker, sqlite, h11, aiohttp) are translated at the adapter boundary by
meaning (HTTP 404 → NotFound, 409 → Conflict) with ``raise ... from exc``.

Every error reaches an HTTP client as one JSON shape, ``{"error": message, ...}``
(``roost.api.errors``); ``http_status`` maps each class to its status.
"""

from __future__ import annotations

__all__ = [
    "AgentHTTPError",
    "AgentTimeout",
    "AlreadyRunning",
    "ConfigError",
    "Conflict",
    "ContainerError",
    "ContainerNotFound",
    "DockerUnavailable",
    "ImageUnavailable",
    "NotFound",
    "Refusal",
    "RoostError",
    "StartupTimeout",
    "StateError",
    "StorageFull",
    "StoreError",
    "http_status",
]


class RoostError(Exception):
    """Root of every error Roost raises on purpose."""


class Refusal(RoostError):
    """An answer Roost gives a client itself instead of doing what was asked.

    ``status`` is the HTTP status; ``extra`` goes into the JSON body beside
    ``error`` (e.g. ``agent``, ``state``); ``headers`` are sent with it (e.g.
    ``Retry-After``, ``WWW-Authenticate``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.extra = extra


class ConfigError(RoostError):
    """Configuration is invalid. The message names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file


class StateError(RoostError):
    """The agent's current state does not allow the operation."""


class NotFound(RoostError):
    """The named thing does not exist."""


class ContainerNotFound(NotFound):
    """Docker has no container (or image) with that id."""


class Conflict(RoostError):
    """A compare-and-set write lost against another writer, or a name is taken."""


class StoreError(RoostError):
    """The state database failed."""


class StorageFull(StoreError):
    """The disk holding the state database is full: writes fail until space is freed."""


class AlreadyRunning(StoreError):
    """Another Roost process holds this state directory."""


class ContainerError(RoostError):
    """Docker failed, or a container did not behave (library contract name)."""

    def __init__(self, message: str, *, log_tail: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        #: the Docker API's HTTP status when Docker refused the request (e.g. 400
        #: for a spec it rejects: retrying cannot help), else None.
        self.status = status


class DockerUnavailable(ContainerError):
    """The Docker Engine cannot be reached."""


class ImageUnavailable(ContainerError):
    """The image is not present and cannot be pulled. Terminal: retrying will not help."""


class StartupTimeout(ContainerError):
    """The container did not answer its health check within ``startup_timeout``."""


class AgentHTTPError(RoostError, ConnectionError):
    """Talking HTTP to an agent failed: the connection was refused, reset or cut, or
    the answer was not valid HTTP. Also a ``ConnectionError``, so code that handles
    network failures in general handles it too."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: the agent's HTTP status when it answered but refused (a WebSocket
        #: upgrade answered with 403, say), else None.
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AgentTimeout(AgentHTTPError, TimeoutError):
    """The agent did not connect or answer within the time allowed."""


_STATUS: tuple[tuple[type[RoostError], int], ...] = (
    # Most specific first: StartupTimeout and DockerUnavailable are ContainerErrors.
    (NotFound, 404),
    (StateError, 409),
    (Conflict, 409),
    (ConfigError, 400),
    (StartupTimeout, 504),
    (DockerUnavailable, 503),
    (ContainerError, 502),
    (AgentTimeout, 504),
    (AgentHTTPError, 502),
    (StorageFull, 507),
    (StoreError, 503),
)


def http_status(exc: RoostError) -> int:
    """The HTTP status an error answers with, by its class (never by its text)."""
    if isinstance(exc, Refusal):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500
