"""The public surface of ``import roost``: ``__all__`` pinned, every name resolvable,
and nothing heavy imported until a name is used (PEP 562 lazy attributes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import roost

PUBLIC = [
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
#: Modules that only the daemon and the library need: never imported by ``import roost``.
HEAVY = ["roost.engine", "fastapi", "aiodocker", "uvicorn", "prometheus_client", "pydantic"]


def _imported_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_all_is_pinned_when_package_imported() -> None:
    assert roost.__all__ == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_resolves_when_accessed(name: str) -> None:
    value = getattr(roost, name)
    assert value is not None
    if name != "__version__":
        assert value.__name__ == name
        assert name in dir(roost)


def test_unknown_attribute_raises_attribute_error_when_accessed() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = roost.nope


def test_import_roost_imports_nothing_heavy_when_no_name_is_used() -> None:
    loaded = _imported_after("import roost")
    assert not loaded & set(HEAVY)


def test_engine_is_imported_when_its_name_is_used() -> None:
    loaded = _imported_after("import roost\nroost.Engine")
    assert "roost.engine" in loaded


def test_errors_share_one_root_when_raised_by_roost() -> None:
    for name in PUBLIC:
        value = getattr(roost, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, roost.RoostError), name
