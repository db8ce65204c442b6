"""Roost: run AI agents as Docker containers, on demand.

The public surface is exactly ``__all__`` (pinned by tests/unit/test_public_api.py).

Invariants:
- Importing ``roost`` (or any submodule, such as ``roost.cli``) imports nothing
  heavy: each public name is imported from its module on first access (PEP 562
  module ``__getattr__``), so ``roost ps`` never pays for the engine, FastAPI,
  aiodocker or uvicorn. ``_LAZY`` maps every name of ``__all__`` (but
  ``__version__``) to the module that defines it.
- Type checkers see ordinary imports (the ``TYPE_CHECKING`` block).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_LAZY: dict[str, str] = {
    "AgentState": "roost.core.states",
    "AsyncContainerManager": "roost.library",
    "AsyncDockerAgentRunner": "roost.library",
    "ConfigError": "roost.errors",
    "Conflict": "roost.errors",
    "ContainerError": "roost.errors",
    "ContainerManager": "roost.library",
    "DockerAgentRunner": "roost.library",
    "DockerUnavailable": "roost.errors",
    "Engine": "roost.engine",
    "ExitInfo": "roost.core.records",
    "ImageUnavailable": "roost.errors",
    "NotFound": "roost.errors",
    "RoostError": "roost.errors",
    "SessionHealth": "roost.core.records",
    "Settings": "roost.config",
    "StartupTimeout": "roost.errors",
    "StateError": "roost.errors",
    "load_settings": "roost.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # AttributeError (not ImportError) lets ``from roost import errors`` fall
        # back to importing the submodule.
        raise AttributeError(f"module 'roost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
