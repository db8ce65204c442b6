"""Roost's exception tree. Every error Roost raises on purpose is one of these.

    RoostError
    ├── ConfigError            bad configuration; names the key and the file (CLI exit 2)
    ├── StateError             an operation that the agent's state does not allow
    ├── NotFound               an agent, message, job or container that does not exist
    │   └── ContainerNotFound
    ├── Conflict               a compare-and-set write lost, or a name already taken
    ├── StoreError             the state database failed or is locked by another Roost
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
    "RoostError",
    "StartupTimeout",
    "StateError",
    "StoreError",
]


class RoostError(Exception):
    """Root of every error Roost raises on purpose."""


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
