"""Spawned agents (the ``[swarm]`` section): the spec of an agent spawned at run
time, and the shared network and volume every spawned agent joins. (Not Docker
Swarm: that is a backend, ``[docker] backend = "swarm"``.)

Used by ``POST /api/agents`` (``roost.api.registry``) and by the library's
``DockerAgentRunner``; both then hand the spec to ``engine.agents.register``.

Invariants:
- A spawned agent's ``env`` carries ``COORDINATOR_URL`` (``[swarm]
  coordinator_url`` or Roost's public URL), ``AGENT_NAME`` (the agent's name, or
  the caller's own name for it when that is not a DNS label), ``AGENT_ID`` and
  ``AGENT_CAPABILITIES`` (comma-joined) besides the caller's extra env, which may
  not set those four (ConfigError naming ``env.<NAME>``): who the agent is and
  whom it reports to is Roost's to say.
- The network and volume are created only when absent, labelled
  ``roost.managed=true`` and ``roost.instance=<instance>``; an existing one is
  used as it is. Nothing here removes either: they are shared by every spawned
  agent (and other Roost instances may use them too), so they outlive agents.
- Every error is a ``ConfigError`` whose ``key`` is the request field at fault
  (``name``, ``capabilities``, ``image``, ``port``, ``env.<NAME>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from roost import errors
from roost.config import (
    AgentSettings,
    Settings,
    SpawnedAgent,
    parse_capabilities,
    resolve_agent,
    validate_agent_name,
)
from roost.core import labels
from roost.ports.runtime import ContainerRuntime

__all__ = [
    "RESERVED_ENV",
    "ensure_spawn_resources",
    "spawned_agent_spec",
]

COORDINATOR_URL = "COORDINATOR_URL"
AGENT_NAME = "AGENT_NAME"
AGENT_ID = "AGENT_ID"
AGENT_CAPABILITIES = "AGENT_CAPABILITIES"
#: Env names Roost sets on every spawned agent; extra env may not set them.
RESERVED_ENV = (COORDINATOR_URL, AGENT_NAME, AGENT_ID, AGENT_CAPABILITIES)
DEFAULT_PORT = 8000


def _invalid(key: str, message: str) -> errors.ConfigError:
    return errors.ConfigError(f"{key}: {message}", key=key)


def spawned_agent_spec(
    settings: Settings,
    *,
    name: str,
    agent_id: str | None = None,
    capabilities: str | Sequence[str] = "",
    image: str | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    agent_name: str | None = None,
) -> SpawnedAgent:
    """The full spec of a spawned agent: ``[defaults]`` + ``[swarm]`` + the request.

    ``name`` is the agent's name in Roost (a DNS label); ``agent_name``, when
    given, is what the agent is told as ``AGENT_NAME`` (the library's callers may
    use any string)."""
    try:
        validate_agent_name(name)
    except ValueError as exc:
        raise _invalid("name", str(exc)) from None
    try:
        found_capabilities = parse_capabilities(capabilities)
    except ValueError as exc:
        raise _invalid("capabilities", str(exc)) from None
    extra = dict(env or {})
    for key in extra:
        if key in RESERVED_ENV:
            raise _invalid(f"env.{key}", f"{key} is set by Roost for every spawned agent")
    if agent_id is not None and (not agent_id.strip() or len(agent_id) > 255):
        raise _invalid("agent_id", "must be 1-255 characters when given")
    try:
        table = AgentSettings.model_validate(
            {
                "image": settings.swarm.image if image is None else image,
                "port": DEFAULT_PORT if port is None else port,
                "env": extra,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "body"
        raise _invalid(key, str(first["msg"]).removeprefix("Value error, ")) from None
    if not table.image:
        raise _invalid("image", "must be a non-empty image reference, e.g. 'roost-mimic:latest'")
    resolved = resolve_agent(name, settings.defaults, table)
    identity = agent_id if agent_id is not None else name
    swarm = settings.swarm
    fields = resolved.model_dump()
    fields["env"] = {
        **resolved.env,
        COORDINATOR_URL: settings.coordinator_url,
        AGENT_NAME: name if agent_name is None else agent_name,
        AGENT_ID: identity,
        AGENT_CAPABILITIES: ",".join(found_capabilities),
    }
    return SpawnedAgent(
        **fields,
        agent_id=identity,
        capabilities=found_capabilities,
        network=swarm.network,
        binds=(f"{swarm.volume}:{swarm.volume_path}",) if swarm.volume else (),
    )


async def ensure_spawn_resources(
    runtime: ContainerRuntime, spec: SpawnedAgent, *, instance: str
) -> None:
    """Create the spec's network and named volumes when they are absent."""
    owned = labels.ownership(instance)
    if spec.network:
        await runtime.ensure_network(spec.network, labels=owned)
    for bind in spec.binds:
        source = bind.split(":", 1)[0]
        if not source.startswith("/"):  # a named volume, not a host path
            await runtime.ensure_volume(source, labels=owned)
