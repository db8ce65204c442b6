"""The public surface of ``roost`` is exactly ``roost.__all__``, pinned here."""

from __future__ import annotations

import importlib

import roost

PUBLIC = [
    "AgentState",
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


def test_all_is_exactly_the_pinned_public_names_when_imported() -> None:
    assert sorted(roost.__all__) == sorted(PUBLIC)


def test_every_public_name_resolves_when_accessed() -> None:
    module = importlib.reload(roost)
    for name in PUBLIC:
        assert getattr(module, name) is not None, name


def test_errors_share_one_root_when_raised_by_roost() -> None:
    for name in PUBLIC:
        value = getattr(roost, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, roost.RoostError), name
