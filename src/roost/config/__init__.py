"""Roost's configuration: the ``roost.toml`` schema, its loader, and resolved agent specs.

- :mod:`roost.config.sources` — finding and reading the file and the environment
  overrides, without pydantic (what a fast client needs: ``client_view``);
- :mod:`roost.config.fields` — each value's check (durations, sizes, names ...);
- :mod:`roost.config.agents` — an agent's settings, declared once, grouped by concern;
- :mod:`roost.config.settings` — the file's sections, ``Settings`` and the loader;
- :mod:`roost.config.problems` — validation errors as ``file: key: message`` lines.

Names load on first use (PEP 562), so ``roost.config.sources`` imports no pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from roost.config.agents import (
        AGENT_KEYS,
        CONTAINER_KEYS,
        AgentSettings,
        ContainerSettings,
        DeliverySettings,
        HoldSettings,
        LifecycleSettings,
        ResolvedAgent,
        RoutingSettings,
        SpawnedAgent,
        resolve_agent,
    )
    from roost.config.fields import (
        parse_capabilities,
        parse_duration,
        parse_size,
        validate_agent_name,
    )
    from roost.config.settings import (
        DockerConfig,
        JobsConfig,
        NotifyConfig,
        ServerConfig,
        Settings,
        SwarmConfig,
        load_settings,
        parse_agent_settings,
        parse_settings,
    )
    from roost.config.sources import (
        CONFIG_ENV_VAR,
        DEFAULT_CONFIG_NAME,
        client_view,
        find_config_file,
    )

__all__ = [
    "AGENT_KEYS",
    "CONFIG_ENV_VAR",
    "CONTAINER_KEYS",
    "DEFAULT_CONFIG_NAME",
    "AgentSettings",
    "ContainerSettings",
    "DeliverySettings",
    "DockerConfig",
    "HoldSettings",
    "JobsConfig",
    "LifecycleSettings",
    "NotifyConfig",
    "ResolvedAgent",
    "RoutingSettings",
    "ServerConfig",
    "Settings",
    "SpawnedAgent",
    "SwarmConfig",
    "client_view",
    "find_config_file",
    "load_settings",
    "parse_agent_settings",
    "parse_capabilities",
    "parse_duration",
    "parse_settings",
    "parse_size",
    "resolve_agent",
    "validate_agent_name",
]

_AGENTS = "roost.config.agents"
_FIELDS = "roost.config.fields"
_SETTINGS = "roost.config.settings"
_SOURCES = "roost.config.sources"
#: Where each name of ``__all__`` is defined (loaded on first access).
_LAZY: dict[str, str] = {
    "AGENT_KEYS": _AGENTS,
    "CONTAINER_KEYS": _AGENTS,
    "AgentSettings": _AGENTS,
    "ContainerSettings": _AGENTS,
    "DeliverySettings": _AGENTS,
    "HoldSettings": _AGENTS,
    "LifecycleSettings": _AGENTS,
    "ResolvedAgent": _AGENTS,
    "RoutingSettings": _AGENTS,
    "SpawnedAgent": _AGENTS,
    "resolve_agent": _AGENTS,
    "parse_capabilities": _FIELDS,
    "parse_duration": _FIELDS,
    "parse_size": _FIELDS,
    "validate_agent_name": _FIELDS,
    "DockerConfig": _SETTINGS,
    "JobsConfig": _SETTINGS,
    "NotifyConfig": _SETTINGS,
    "ServerConfig": _SETTINGS,
    "Settings": _SETTINGS,
    "SwarmConfig": _SETTINGS,
    "load_settings": _SETTINGS,
    "parse_agent_settings": _SETTINGS,
    "parse_settings": _SETTINGS,
    "CONFIG_ENV_VAR": _SOURCES,
    "DEFAULT_CONFIG_NAME": _SOURCES,
    "client_view": _SOURCES,
    "find_config_file": _SOURCES,
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'roost.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
