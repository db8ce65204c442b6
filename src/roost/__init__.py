"""Roost: run AI agents as Docker containers, on demand.

The public surface is exactly ``__all__`` (pinned by tests/unit/test_public_api.py).
"""

from __future__ import annotations

from roost.config import Settings, load_settings
from roost.core.records import ExitInfo, SessionHealth
from roost.core.states import AgentState
from roost.engine import Engine
from roost.errors import (
    ConfigError,
    Conflict,
    ContainerError,
    DockerUnavailable,
    ImageUnavailable,
    NotFound,
    RoostError,
    StartupTimeout,
    StateError,
)
from roost.library import (
    AsyncContainerManager,
    AsyncDockerAgentRunner,
    ContainerManager,
    DockerAgentRunner,
)

__version__ = "0.1.0"

__all__ = [
    "AgentState",
    "AsyncContainerManager",
    "AsyncDockerAgentRunner",
    "ConfigError",
    "Conflict",
    "ContainerError",
    "ContainerManager",
    "DockerAgentRunner",
    "DockerUnavailable",
    "Engine",
    "ExitInfo",
    "ImageUnavailable",
    "NotFound",
    "RoostError",
    "SessionHealth",
    "Settings",
    "StartupTimeout",
    "StateError",
    "__version__",
    "load_settings",
]
