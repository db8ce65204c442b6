"""The ``[swarm]`` section, capability parsing and the spawned-agent spec's storage and hash."""

from __future__ import annotations

from typing import Any

import pytest

from roost.config import ResolvedAgent, SpawnedAgent, parse_capabilities, parse_settings
from roost.errors import ConfigError


def test_swarm_defaults_are_documented_values_when_section_absent() -> None:
    swarm = parse_settings({}).swarm

    assert swarm.network == "roost-swarm"
    assert swarm.volume == "roost-swarm-data"
    assert swarm.volume_path == "/data"
    assert swarm.coordinator_url == ""
    assert swarm.image == "roost-mimic:latest"


def test_coordinator_url_falls_back_to_public_url_when_unset() -> None:
    derived = parse_settings({"server": {"listen": "127.0.0.1:7999"}})
    public = parse_settings({"server": {"public_url": "http://roost.lan:7075/"}})

    assert derived.coordinator_url == "http://host.docker.internal:7999"
    assert public.coordinator_url == "http://roost.lan:7075"


def test_coordinator_url_is_the_swarm_value_when_set() -> None:
    settings = parse_settings({"swarm": {"coordinator_url": "http://coord:9000/"}})

    assert settings.coordinator_url == "http://coord:9000"


def test_swarm_accepts_empty_network_and_volume_when_disabled() -> None:
    swarm = parse_settings({"swarm": {"network": "", "volume": ""}}).swarm

    assert (swarm.network, swarm.volume) == ("", "")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("network", "bad name", "invalid Docker name"),
        ("volume", "-leading-dash", "invalid Docker name"),
        ("volume_path", "data", "absolute path"),
        ("volume_path", "/data:ro", "absolute path"),
        ("coordinator_url", "ftp://x", "http:// or https:// URL"),
        ("image", " ", "non-empty image"),
        ("unknown", 1, "unknown key"),
    ],
)
def test_swarm_error_names_the_key_when_value_invalid(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings({"swarm": {key: value}}, file="roost.toml")

    assert raised.value.key == f"swarm.{key}"
    assert f"roost.toml: swarm.{key}: " in str(raised.value)
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", ()),
        ("code", ("code",)),
        (" code , review,,code ", ("code", "review")),
        (["code", " review "], ("code", "review")),
        ((), ()),
    ],
)
def test_parse_capabilities_normalises_when_string_or_list(
    given: Any, expected: tuple[str, ...]
) -> None:
    assert parse_capabilities(given) == expected


@pytest.mark.parametrize("given", [["a b"], ["a,b"], [1], 5, None])
def test_parse_capabilities_raises_when_entry_invalid(given: Any) -> None:
    with pytest.raises(ValueError, match="capabilit"):
        parse_capabilities(given)


def _spawned(**changes: Any) -> SpawnedAgent:
    base = parse_settings({"agents": {"w": {"image": "img:1"}}}).agent("w")
    fields: dict[str, Any] = {
        **base.model_dump(),
        "agent_id": "w-1",
        "capabilities": ("code",),
        "network": "net",
        "binds": ("vol:/data",),
    }
    fields.update(changes)
    return SpawnedAgent(**fields)


def test_stored_spawned_spec_loads_as_spawned_agent_when_read_back() -> None:
    spec = _spawned()

    again = ResolvedAgent.from_json(spec.to_json())

    assert isinstance(again, SpawnedAgent)
    assert again == spec
    assert again.config_hash == spec.config_hash


def test_plain_spec_loads_as_resolved_agent_when_not_spawned() -> None:
    spec = parse_settings({"agents": {"w": {"image": "img:1"}}}).agent("w")

    again = ResolvedAgent.from_json(spec.model_dump(mode="json"))

    assert type(again) is ResolvedAgent
    assert again == spec


@pytest.mark.parametrize(("key", "value"), [("network", "other"), ("binds", ("v2:/data",))])
def test_spawned_config_hash_changes_when_wiring_changes(key: str, value: Any) -> None:
    assert _spawned(**{key: value}).config_hash != _spawned().config_hash


@pytest.mark.parametrize(("key", "value"), [("agent_id", "other"), ("capabilities", ("x",))])
def test_spawned_config_hash_is_stable_when_only_identity_changes(key: str, value: Any) -> None:
    # Identity reaches the container through env (AGENT_ID, ...), which is hashed.
    assert _spawned(**{key: value}).config_hash == _spawned().config_hash


def test_from_json_raises_config_error_when_stored_json_is_broken() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        ResolvedAgent.from_json("{not json")
