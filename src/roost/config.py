"""Roost's configuration: the ``roost.toml`` schema, its loader, and resolved agent specs.

Role: validate configuration once, at the edge, into frozen pydantic models, and
turn every problem into one :class:`roost.errors.ConfigError` whose message names
the file and the dotted key (``roost.toml: agents.echo.memory: invalid size ...``).

Invariants:
- Every model is ``extra="forbid"``, ``frozen=True`` and ``strict=True``: an
  unknown key is an error naming it, and ``"10"`` is not a number.
- Durations are float seconds, never negative. Sizes are int bytes (``0`` means
  "no limit" where a limit is optional).
- Nothing is read from the environment or the disk at import time;
  :func:`load_settings` reads the file (blocking I/O: call it before the event
  loop starts, or through ``asyncio.to_thread``).
- Relative paths (``state_dir``, ``token_file``) are relative to the directory
  of the config file (the working directory when no file was found).
- :class:`ResolvedAgent` is the agent spec after merging ``[defaults]`` with the
  agent's overrides; :meth:`ResolvedAgent.config_hash` covers only what needs a
  new container (image, port, env, command, memory, cpus, pids_limit,
  no_new_privileges), never the idle/restart policy; a :class:`SpawnedAgent`'s
  hash also covers its network and volume binds.

Where the file comes from (first match wins): the explicit path (``--config``),
``ROOST_CONFIG``, ``roost.toml`` in the working directory, built-in defaults.
A ``.json`` file is parsed as JSON and may use the original proposal's keys
``{"docker": {"agentIdleTimeout", "agentMaxRestarts",
"agentRestartBackoffSeconds"}}``, which map onto ``[defaults]`` (also accepted
in a TOML ``[docker]`` table).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from roost.core.policy import Policy
from roost.errors import ConfigError, NotFound

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "AgentConfig",
    "DefaultsConfig",
    "DockerConfig",
    "JobsConfig",
    "NotifyConfig",
    "ResolvedAgent",
    "ServerConfig",
    "Settings",
    "SpawnedAgent",
    "SwarmConfig",
    "find_config_file",
    "load_settings",
    "parse_agent_config",
    "parse_capabilities",
    "parse_settings",
    "parse_size",
    "validate_agent_name",
]

DEFAULT_CONFIG_NAME = "roost.toml"
CONFIG_ENV_VAR = "ROOST_CONFIG"

#: Docker refuses memory limits below 6 MiB ("Minimum memory limit allowed is 6MB").
DOCKER_MIN_MEMORY = 6 * 1024 * 1024

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_ENV_NAME = re.compile(r"^[^=\x00]+$")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


# --------------------------------------------------------------------------- scalars
# Each check takes the raw value and returns it validated, or raises ValueError
# with the message shown after "file: key: ". Checks never echo env values.

Check = Callable[[object], Any]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: object, *, positive: bool) -> float:
    if not _is_number(value):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if positive and seconds == 0:
        raise ValueError(f"must be > 0 seconds, got {value!r}")
    return seconds


def _non_negative_seconds(value: object) -> float:
    return _seconds(value, positive=False)


def _positive_seconds(value: object) -> float:
    return _seconds(value, positive=True)


def _int_between(minimum: int, maximum: int | None = None) -> Check:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _idle_action(value: object) -> str:
    if value not in ("pause", "stop"):
        raise ValueError(f"must be 'pause' or 'stop', got {value!r}")
    return str(value)


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"1024"``, ``"512k"``, ``"256m"``, ``"1g"``, ``"1.5g"``.

    Units are binary (``m`` = MiB), as Docker reads them; ``b``/``ib`` suffixes
    and upper case are accepted. Raises ValueError on anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value.strip())
        if match:
            number, unit = match.groups()
            return int(float(number) * _SIZE_UNITS[unit.lower()])
    raise ValueError(f"invalid size {value!r} (use e.g. 256m, 1g)")


def _memory(value: object) -> int:
    size = parse_size(value)
    if 0 < size < DOCKER_MIN_MEMORY:
        raise ValueError(f"{value!r} is below Docker's minimum of 6m (use 0 for no limit)")
    return size


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return size


def _cpus(value: object) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"must be a number of CPUs (e.g. 0.5), got {value!r}")
    cpus = float(value)
    if cpus != 0 and cpus < 0.01:
        # Docker's range is 0.01 .. host CPUs; the upper bound is the host's business.
        raise ValueError(f"must be >= 0.01 (or 0 for no limit), got {value!r}")
    return cpus


def _url_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be a path starting with '/', got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _http_url(value: object) -> str:
    text = _text(value)
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return text.rstrip("/")


def _image(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty image reference, e.g. 'roost-mimic:latest'")
    return value.strip()


def _env(value: object) -> object:
    # Values may be secrets: messages name the variable, never the value. Value
    # types are checked by the field's dict[str, str], so errors name env.NAME.
    if not isinstance(value, Mapping):
        raise ValueError('must be a table of NAME = "value"')
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"invalid variable name {name!r}")
    return value


def _command(value: object) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(arg, str) for arg in value):
        raise ValueError('must be a list of strings, e.g. ["python", "-m", "agent"]')
    return list(value)


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}; got {value!r}")
    return value.lower()


def _split_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:7075"`` / ``"[::1]:7075"`` / ``":7075"`` → (host, port)."""
    match = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]*)):(\d{1,5})$", value.strip())
    if not match:
        raise ValueError(f"must be 'host:port' (e.g. 127.0.0.1:7075), got {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(2)
    port = int(match.group(3))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    return host, port


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be 'host:port', got {value!r}")
    _split_listen(value)
    return value.strip()


def _ip_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be an IP address, got {value!r}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address (e.g. 127.0.0.1), got {value!r}") from None
    return value


_DOCKER_OBJECT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_CAPABILITY = re.compile(r"^[^,\s]+$")


def _docker_object_name(value: object) -> str:
    """A network or volume name as Docker accepts it, or '' (none)."""
    text = _text(value).strip()
    if text and not _DOCKER_OBJECT_NAME.match(text):
        raise ValueError(
            f"invalid Docker name {value!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return text


def _absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or ":" in value:
        raise ValueError(f"must be an absolute path without ':', got {value!r}")
    return value


def parse_capabilities(value: object) -> tuple[str, ...]:
    """Capabilities from ``"a, b"`` or ``["a", "b"]``: stripped, empty ones dropped,
    duplicates removed (first kept). Raises ValueError on anything else; a
    capability may not contain a comma or whitespace (they are passed on joined
    by commas)."""
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"capabilities must be 'a,b' or a list of strings, got {value!r}")
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"every capability must be a string, got {item!r}")
        capability = item.strip()
        if not capability:
            continue
        if not _CAPABILITY.match(capability):
            raise ValueError(f"invalid capability {capability!r}: no commas or whitespace")
        if capability not in found:
            found.append(capability)
    return tuple(found)


def validate_agent_name(name: object) -> str:
    """A DNS label: 1–63 of a-z, 0-9 and '-', not starting or ending with '-'."""
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return name


def _optional(check: Check) -> Check:
    def optional(value: object) -> Any:
        return None if value is None else check(value)

    return optional


# A field type is ``Annotated[T, BeforeValidator(check)]``; an override is
# ``T | None`` with the check wrapped, so a bad value gives one error (the
# check's), not one per union branch.
Seconds = Annotated[float, BeforeValidator(_non_negative_seconds)]
PositiveSeconds = Annotated[float, BeforeValidator(_positive_seconds)]
OptSeconds = Annotated[float | None, BeforeValidator(_optional(_non_negative_seconds))]
OptPositiveSeconds = Annotated[float | None, BeforeValidator(_optional(_positive_seconds))]
Count = Annotated[int, BeforeValidator(_int_between(0))]
OptCount = Annotated[int | None, BeforeValidator(_optional(_int_between(0)))]
AtLeastOne = Annotated[int, BeforeValidator(_int_between(1))]
OptAtLeastOne = Annotated[int | None, BeforeValidator(_optional(_int_between(1)))]
Port = Annotated[int, BeforeValidator(_int_between(1, 65535))]
Flag = Annotated[bool, BeforeValidator(_boolean)]
OptFlag = Annotated[bool | None, BeforeValidator(_optional(_boolean))]
IdleAction = Literal["pause", "stop"]
IdleActionField = Annotated[IdleAction, BeforeValidator(_idle_action)]
OptIdleAction = Annotated[IdleAction | None, BeforeValidator(_optional(_idle_action))]
MemorySize = Annotated[int, BeforeValidator(_memory)]
OptMemorySize = Annotated[int | None, BeforeValidator(_optional(_memory))]
Cpus = Annotated[float | None, BeforeValidator(_cpus)]
UrlPath = Annotated[str, BeforeValidator(_url_path)]
OptUrlPath = Annotated[str | None, BeforeValidator(_optional(_url_path))]
Text = Annotated[str, BeforeValidator(_text)]
AgentName = Annotated[str, BeforeValidator(validate_agent_name)]

_FROZEN = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- sections


class ServerConfig(BaseModel):
    """``[server]``: where Roost listens and keeps its state."""

    model_config = _FROZEN

    listen: Annotated[str, BeforeValidator(_listen)] = Field(
        default="127.0.0.1:7075",
        description="host:port for the gateway, admin API and dashboard ('[::1]:7075' for IPv6).",
    )
    state_dir: Text = Field(
        default=".roost",
        description="Directory of the SQLite database; relative to the config file's directory.",
    )
    token_file: Text = Field(
        default="",
        description="File holding the API bearer token; required when listen is not loopback.",
    )
    public_url: Annotated[str, BeforeValidator(_http_url)] = Field(
        default="",
        description=(
            "Roost's URL as containers see it (their ROOST_URL). Empty: "
            "http://host.docker.internal:<listen port>. Containers reach the host through "
            "the bridge gateway, so that only works if Roost does not listen on 127.0.0.1 only."
        ),
    )
    max_body_size: Annotated[int, BeforeValidator(_positive_size)] = Field(
        default=1024 * 1024,
        description="Largest accepted request/message body: bytes or a size like '1m'.",
    )
    log_level: Annotated[str, BeforeValidator(_log_level)] = Field(
        default="info", description="debug, info, warning, error or critical."
    )

    @property
    def listen_host(self) -> str:
        """Host part of ``listen`` (brackets removed; '' means all interfaces)."""
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_listen(self.listen)[1]

    @property
    def resolved_public_url(self) -> str:
        """``public_url`` or the derived ``http://host.docker.internal:<port>``."""
        return self.public_url or f"http://host.docker.internal:{self.listen_port}"

    @property
    def is_loopback(self) -> bool:
        """True when ``listen`` only accepts connections from this machine."""
        host = self.listen_host.lower()
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


class DockerConfig(BaseModel):
    """``[docker]``: which engine, and how Roost's containers are named and wired."""

    model_config = _FROZEN

    host: Text = Field(
        default="", description="Docker endpoint; empty: DOCKER_HOST or the local socket."
    )
    instance: AgentName = Field(
        default="default",
        description=(
            "This Roost's id, stored in the roost.instance label: two Roosts on one engine "
            "never touch each other's containers. A DNS label."
        ),
    )
    leave_running: Flag = Field(
        default=False,
        description="On shutdown leave containers running; the next start adopts them.",
    )
    network: Text = Field(
        default="", description="Docker network for agent containers; empty: default bridge."
    )
    publish_host: Annotated[str, BeforeValidator(_ip_address)] = Field(
        default="127.0.0.1", description="Host IP agent ports are published on."
    )
    pull_timeout: PositiveSeconds = Field(
        default=300.0, description="Seconds allowed for pulling an absent image."
    )
    connection_limit: AtLeastOne = Field(
        default=32, description="Most simultaneous connections to the Docker API."
    )
    # The original proposal's names (camelCase in the file); Settings merges them
    # into [defaults].
    agent_idle_timeout: OptSeconds = Field(
        default=None,
        alias="agentIdleTimeout",
        description="Proposal name of defaults.idle_timeout.",
    )
    agent_max_restarts: OptCount = Field(
        default=None,
        alias="agentMaxRestarts",
        description="Proposal name of defaults.max_restarts.",
    )
    agent_restart_backoff_seconds: OptSeconds = Field(
        default=None,
        alias="agentRestartBackoffSeconds",
        description="Proposal name of defaults.restart_backoff.",
    )


class NotifyConfig(BaseModel):
    """``[notify]``: how an admin hears about failures."""

    model_config = _FROZEN

    webhook: Annotated[str, BeforeValidator(_http_url)] = Field(
        default="",
        description="URL that gets a JSON POST on agent.failed, agent.waking, ...; empty: log only.",
    )
    timeout: PositiveSeconds = Field(default=5.0, description="Seconds per webhook attempt.")


class SwarmConfig(BaseModel):
    """``[swarm]``: how agents spawned at run time (``POST /api/agents``,
    ``DockerAgentRunner``) are wired: one shared network, one shared volume, and
    the coordinator they report to."""

    model_config = _FROZEN

    network: Annotated[str, BeforeValidator(_docker_object_name)] = Field(
        default="roost-swarm",
        description="Docker network every spawned agent joins (created if missing); "
        "empty: docker.network or the default bridge.",
    )
    volume: Annotated[str, BeforeValidator(_docker_object_name)] = Field(
        default="roost-swarm-data",
        description="Docker volume shared by every spawned agent (created if missing); "
        "empty: none.",
    )
    volume_path: Annotated[str, BeforeValidator(_absolute_path)] = Field(
        default="/data", description="Where the shared volume is mounted inside the agents."
    )
    coordinator_url: Annotated[str, BeforeValidator(_http_url)] = Field(
        default="",
        description="COORDINATOR_URL given to spawned agents; empty: Roost's public URL "
        "(server.public_url or http://host.docker.internal:<listen port>).",
    )
    image: Annotated[str, BeforeValidator(_image)] = Field(
        default="roost-mimic:latest", description="Image of a spawned agent that names none."
    )


def _env_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of variable names, e.g. ["OPENAI_API_KEY"]')
    for name in value:
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid variable name {name!r}")
    return tuple(value)


class JobsConfig(BaseModel):
    """``[jobs]``: one-shot job containers (``/api/jobs``, ``roost jobs``)."""

    model_config = _FROZEN

    max_workers: AtLeastOne = Field(
        default=4, description="Most jobs running at once; the rest wait in FIFO order."
    )
    kill_grace: Seconds = Field(
        default=15.0,
        description="Seconds between SIGTERM and SIGKILL when a job times out or is cancelled.",
    )
    default_timeout: PositiveSeconds = Field(
        default=3600.0, description="Hard time limit of a job that names none, in seconds."
    )
    orphan_scan_interval: PositiveSeconds = Field(
        default=60.0,
        description="Seconds between scans for job containers no job owns (and snapshot eviction).",
    )
    snapshot_ttl: Seconds = Field(
        default=7 * 24 * 3600.0,
        description="Seconds a snapshot image lives after it was committed; 0: no limit.",
    )
    snapshot_max_count: Count = Field(
        default=20, description="Most snapshot images kept (least recently used go); 0: no limit."
    )
    snapshot_max_bytes: Annotated[int, BeforeValidator(parse_size)] = Field(
        default=10 * 1024**3,
        description="Most bytes of snapshot images kept: bytes or a size like '10g'; 0: no limit.",
    )
    secret_env: Annotated[tuple[str, ...], BeforeValidator(_env_names)] = Field(
        default=(),
        description="Env names whose values are secret besides *_KEY, *_TOKEN, *_SECRET and "
        "*PASSWORD*: scrubbed from snapshot images and redacted from stored logs.",
    )
    pull_timeout: PositiveSeconds = Field(
        default=300.0, description="Seconds allowed for pulling a job's absent image."
    )


class DefaultsConfig(BaseModel):
    """``[defaults]``: what every agent inherits unless it overrides it."""

    model_config = _FROZEN

    idle_timeout: Seconds = Field(
        default=1800.0, description="Seconds without activity before idle_action; 0 never idles."
    )
    idle_action: IdleActionField = Field(default="stop", description="'pause' or 'stop' when idle.")
    pause_after: Seconds = Field(
        default=0.0, description=">0: pause after this many idle seconds first."
    )
    idle_mark_after: Seconds = Field(
        default=30.0, description="Quiet this long and a running agent shows as 'idle'."
    )
    max_restarts: Count = Field(default=3, description="Crash restarts before 'failed'.")
    restart_backoff: Seconds = Field(
        default=10.0, description="First restart delay in seconds; doubles each time."
    )
    restart_backoff_max: Seconds = Field(default=300.0, description="Cap on the restart delay.")
    restart_reset_after: Seconds = Field(
        default=600.0, description="Running this long resets the restart counter."
    )
    startup_timeout: PositiveSeconds = Field(
        default=120.0, description="Seconds for a started container to answer its health check."
    )
    stop_timeout: Seconds = Field(
        default=10.0, description="Seconds between SIGTERM and SIGKILL on stop."
    )
    health_path: UrlPath = Field(default="/health", description="GET here answers 200 when ready.")
    message_path: UrlPath = Field(
        default="/messages", description="POST a JSON message here; the reply is JSON."
    )
    liveness_interval: PositiveSeconds = Field(
        default=10.0, description="Health probe period while running."
    )
    liveness_failures: AtLeastOne = Field(
        default=3, description="Consecutive failed probes handled as a crash."
    )
    memory: MemorySize = Field(
        default=512 * 1024**2,
        description="Container memory limit: bytes or '256m', '1g'; 0: no limit (min 6m).",
    )
    cpus: Cpus = Field(default=None, description="CPU limit, e.g. 0.5; null or 0: no limit.")
    pids_limit: Count = Field(default=512, description="Most processes in the container; 0: none.")
    no_new_privileges: Flag = Field(
        default=True, description="Run with no-new-privileges (setuid binaries cannot escalate)."
    )
    waking_notice_after: Seconds = Field(
        default=1.0, description="A request held this long while waking emits agent.waking."
    )
    hold_timeout: PositiveSeconds = Field(
        default=60.0, description="Longest a proxied request is held while the agent wakes."
    )
    max_concurrent_messages: AtLeastOne = Field(
        default=1, description="Messages delivered to the agent at once (1: strictly in order)."
    )
    queue_limit: AtLeastOne = Field(
        default=10000, description="Undelivered messages per agent before new ones are refused."
    )
    wait_timeout: PositiveSeconds = Field(
        default=30.0, description="Longest '?wait=true' waits for a reply."
    )


#: Keys an agent may override: exactly the ``[defaults]`` keys.
DEFAULT_KEYS: tuple[str, ...] = tuple(DefaultsConfig.model_fields)
#: Keys whose change needs a new container (what ``config_hash`` covers).
CONTAINER_KEYS: tuple[str, ...] = (
    "image",
    "port",
    "env",
    "command",
    "memory",
    "cpus",
    "pids_limit",
    "no_new_privileges",
)


class ResolvedAgent(BaseModel):
    """One agent's spec with every value concrete: ``[defaults]`` merged with overrides.

    Stored in the database as JSON (``to_json``/``from_json``). ``memory == 0``
    and ``pids_limit == 0`` mean no limit; ``cpus is None`` means no limit.
    ``env`` is a plain dict for convenience: treat it as read-only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AgentName = Field(description="The agent's name (a DNS label).")
    image: str = Field(description="Image reference.")
    port: Port = Field(description="Port the agent listens on inside the container.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    command: tuple[str, ...] | None = Field(
        default=None, description="Command override; None: the image's default."
    )
    idle_timeout: float = Field(description="See DefaultsConfig.")
    idle_action: IdleAction = Field(description="See DefaultsConfig.")
    pause_after: float = Field(description="See DefaultsConfig.")
    idle_mark_after: float = Field(description="See DefaultsConfig.")
    max_restarts: int = Field(description="See DefaultsConfig.")
    restart_backoff: float = Field(description="See DefaultsConfig.")
    restart_backoff_max: float = Field(description="See DefaultsConfig.")
    restart_reset_after: float = Field(description="See DefaultsConfig.")
    startup_timeout: float = Field(description="See DefaultsConfig.")
    stop_timeout: float = Field(description="See DefaultsConfig.")
    health_path: str = Field(description="See DefaultsConfig.")
    message_path: str = Field(description="See DefaultsConfig.")
    liveness_interval: float = Field(description="See DefaultsConfig.")
    liveness_failures: int = Field(description="See DefaultsConfig.")
    memory: int = Field(description="Memory limit in bytes; 0: no limit.")
    cpus: float | None = Field(description="CPU limit; None: no limit.")
    pids_limit: int = Field(description="Process limit; 0: no limit.")
    no_new_privileges: bool = Field(description="See DefaultsConfig.")
    waking_notice_after: float = Field(description="See DefaultsConfig.")
    hold_timeout: float = Field(description="See DefaultsConfig.")
    max_concurrent_messages: int = Field(description="See DefaultsConfig.")
    queue_limit: int = Field(description="See DefaultsConfig.")
    wait_timeout: float = Field(description="See DefaultsConfig.")

    def policy(self) -> Policy:
        """The lifecycle numbers ``roost.core`` obeys for this agent."""
        return Policy(
            idle_timeout=self.idle_timeout,
            idle_action=self.idle_action,
            pause_after=self.pause_after,
            idle_mark_after=self.idle_mark_after,
            max_restarts=self.max_restarts,
            restart_backoff=self.restart_backoff,
            restart_backoff_max=self.restart_backoff_max,
            restart_reset_after=self.restart_reset_after,
            startup_timeout=self.startup_timeout,
            stop_timeout=self.stop_timeout,
            liveness_interval=self.liveness_interval,
            liveness_failures=self.liveness_failures,
        )

    def container_fields(self) -> dict[str, Any]:
        """The values that shape the container: exactly ``CONTAINER_KEYS``."""
        return {
            "image": self.image,
            "port": self.port,
            "env": dict(sorted(self.env.items())),
            "command": list(self.command) if self.command is not None else None,
            "memory": self.memory,
            "cpus": self.cpus,
            "pids_limit": self.pids_limit,
            "no_new_privileges": self.no_new_privileges,
        }

    def config_hash(self) -> str:
        """sha256 hex of the container-shaping fields; a change means recreate."""
        canonical = json.dumps(self.container_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) for storing the spec."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> ResolvedAgent:
        """Inverse of ``to_json``; raises ConfigError if the stored spec is invalid.

        A stored spawned agent's spec (``"kind": "spawned"``) comes back as a
        :class:`SpawnedAgent`, whichever class this is called on."""
        try:
            document = dict(data) if isinstance(data, Mapping) else json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"<stored spec>: invalid JSON: {exc}") from exc
        model: type[ResolvedAgent] = cls
        if isinstance(document, dict) and document.get("kind") == "spawned":
            model = SpawnedAgent
        try:
            return model.model_validate(document)
        except ValidationError as exc:
            raise _config_error(exc, file="<stored spec>", prefix=()) from exc


class SpawnedAgent(ResolvedAgent):
    """An agent spawned at run time into the swarm (``POST /api/agents``,
    ``DockerAgentRunner.spawn``): a resolved spec plus its swarm identity and wiring.

    Its ``env`` already holds ``COORDINATOR_URL``, ``AGENT_NAME``, ``AGENT_ID`` and
    ``AGENT_CAPABILITIES`` (see ``roost.reactor.swarming``). ``network`` and
    ``binds`` shape the container, so :meth:`config_hash` covers them; ``agent_id``
    and ``capabilities`` reach the container only through ``env`` (hashed there).
    """

    kind: Literal["spawned"] = Field(default="spawned", description="Marks a stored spec.")
    agent_id: str = Field(description="The agent's id in its coordinator (ROOST_AGENT_ID).")
    capabilities: tuple[str, ...] = Field(default=(), description="What the agent can do.")
    network: str = Field(default="", description="Docker network it joins; '': the default.")
    binds: tuple[str, ...] = Field(default=(), description="'volume:/path' mounts.")

    def container_fields(self) -> dict[str, Any]:
        return {**super().container_fields(), "network": self.network, "binds": list(self.binds)}


class AgentConfig(BaseModel):
    """``[agents.NAME]``: one agent. Every ``[defaults]`` key may be overridden here."""

    model_config = _FROZEN

    image: Annotated[str, BeforeValidator(_image)] = Field(
        description="Image to run, e.g. 'roost-mimic:latest' (required)."
    )
    port: Port = Field(default=8000, description="Port the agent listens on inside the container.")
    env: Annotated[dict[str, str], BeforeValidator(_env)] = Field(
        default_factory=dict, description='Extra environment, NAME = "value".'
    )
    command: Annotated[list[str] | None, BeforeValidator(_optional(_command))] = Field(
        default=None, description="Command override (list of strings); absent: image default."
    )
    idle_timeout: OptSeconds = Field(default=None, description="Overrides defaults.")
    idle_action: OptIdleAction = Field(default=None, description="Overrides defaults.")
    pause_after: OptSeconds = Field(default=None, description="Overrides defaults.")
    idle_mark_after: OptSeconds = Field(default=None, description="Overrides defaults.")
    max_restarts: OptCount = Field(default=None, description="Overrides defaults.")
    restart_backoff: OptSeconds = Field(default=None, description="Overrides defaults.")
    restart_backoff_max: OptSeconds = Field(default=None, description="Overrides defaults.")
    restart_reset_after: OptSeconds = Field(default=None, description="Overrides defaults.")
    startup_timeout: OptPositiveSeconds = Field(default=None, description="Overrides defaults.")
    stop_timeout: OptSeconds = Field(default=None, description="Overrides defaults.")
    health_path: OptUrlPath = Field(default=None, description="Overrides defaults.")
    message_path: OptUrlPath = Field(default=None, description="Overrides defaults.")
    liveness_interval: OptPositiveSeconds = Field(default=None, description="Overrides defaults.")
    liveness_failures: OptAtLeastOne = Field(default=None, description="Overrides defaults.")
    memory: OptMemorySize = Field(default=None, description="Overrides defaults.")
    cpus: Cpus = Field(default=None, description="Overrides defaults; 0: no limit.")
    pids_limit: OptCount = Field(default=None, description="Overrides defaults.")
    no_new_privileges: OptFlag = Field(default=None, description="Overrides defaults.")
    waking_notice_after: OptSeconds = Field(default=None, description="Overrides defaults.")
    hold_timeout: OptPositiveSeconds = Field(default=None, description="Overrides defaults.")
    max_concurrent_messages: OptAtLeastOne = Field(default=None, description="Overrides defaults.")
    queue_limit: OptAtLeastOne = Field(default=None, description="Overrides defaults.")
    wait_timeout: OptPositiveSeconds = Field(default=None, description="Overrides defaults.")

    def effective(self, defaults: DefaultsConfig, *, name: str) -> ResolvedAgent:
        """Merge ``defaults`` with this agent's overrides into a concrete spec."""
        merged: dict[str, Any] = defaults.model_dump()
        for key in DEFAULT_KEYS:
            override = getattr(self, key)
            if override is not None:
                merged[key] = override
        if merged["cpus"] == 0:
            merged["cpus"] = None  # 0 is the explicit spelling of "no limit"
        return ResolvedAgent(
            name=name,
            image=self.image,
            port=self.port,
            env=dict(self.env),
            command=tuple(self.command) if self.command is not None else None,
            **merged,
        )


_PROPOSAL_KEYS: tuple[tuple[str, str, str], ...] = (
    # (DockerConfig attribute, its alias in the file, the [defaults] key)
    ("agent_idle_timeout", "agentIdleTimeout", "idle_timeout"),
    ("agent_max_restarts", "agentMaxRestarts", "max_restarts"),
    ("agent_restart_backoff_seconds", "agentRestartBackoffSeconds", "restart_backoff"),
)


class Settings(BaseModel):
    """The whole configuration file. Build it with :func:`load_settings`."""

    model_config = _FROZEN

    server: ServerConfig = Field(default_factory=ServerConfig, description="[server]")
    docker: DockerConfig = Field(default_factory=DockerConfig, description="[docker]")
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="[notify]")
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig, description="[defaults]")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="[jobs]")
    swarm: SwarmConfig = Field(default_factory=SwarmConfig, description="[swarm]")
    agents: dict[AgentName, AgentConfig] = Field(
        default_factory=dict, description="[agents.NAME] tables."
    )

    _source_file: str | None = PrivateAttr(default=None)
    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _merge_proposal_keys(self) -> Settings:
        updates: dict[str, Any] = {}
        for attribute, alias, key in _PROPOSAL_KEYS:
            value = getattr(self.docker, attribute)
            if value is None:
                continue
            if key in self.defaults.model_fields_set and getattr(self.defaults, key) != value:
                raise ValueError(
                    f"docker.{alias}: {value!r} conflicts with defaults.{key} = "
                    f"{getattr(self.defaults, key)!r}; set only one"
                )
            updates[key] = value
        if updates:
            merged = DefaultsConfig.model_validate({**_explicit(self.defaults), **updates})
            # Still inside validation: nobody holds this instance yet, so setting the
            # frozen field once here is safe (pydantic wants ``self`` returned).
            object.__setattr__(self, "defaults", merged)
        _check_backoff(self.defaults, "defaults.restart_backoff_max")
        # Resolve every agent now, so a contradictory override fails at load.
        for name, agent in self.agents.items():
            blamed = (
                "restart_backoff_max"
                if agent.restart_backoff_max is not None
                else "restart_backoff"
            )
            _check_backoff(agent.effective(self.defaults, name=name), f"agents.{name}.{blamed}")
        return self

    @property
    def source_file(self) -> str | None:
        """The file these settings came from; None for built-in defaults."""
        return self._source_file

    @property
    def base_dir(self) -> Path:
        """Directory relative paths are resolved against."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    @property
    def coordinator_url(self) -> str:
        """``swarm.coordinator_url``, or Roost's own URL as containers see it."""
        return self.swarm.coordinator_url or self.server.resolved_public_url

    def state_path(self) -> Path:
        """``server.state_dir`` resolved against :attr:`base_dir`."""
        return self.base_dir / Path(self.server.state_dir).expanduser()

    def token_path(self) -> Path | None:
        if not self.server.token_file:
            return None
        return self.base_dir / Path(self.server.token_file).expanduser()

    def token(self) -> str | None:
        """The API bearer token from ``token_file`` (stripped); None when unset.

        Raises ConfigError (key ``server.token_file``) if the file cannot be read
        or is empty.
        """
        path = self.token_path()
        if path is None:
            return None
        file = self._source_file or "<defaults>"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{file}: server.token_file: cannot read {str(path)!r}: {exc.strerror}",
                key="server.token_file",
                file=self._source_file,
            ) from exc
        if not token:
            raise ConfigError(
                f"{file}: server.token_file: {str(path)!r} is empty",
                key="server.token_file",
                file=self._source_file,
            )
        return token

    def requires_token(self) -> bool:
        """True when ``listen`` is reachable from other machines (not loopback)."""
        return not self.server.is_loopback

    def agent_names(self) -> list[str]:
        return sorted(self.agents)

    def agent(self, name: str) -> ResolvedAgent:
        """The resolved spec of a configured agent; NotFound if there is none."""
        try:
            agent = self.agents[name]
        except KeyError:
            raise NotFound(f"no agent {name!r} in the configuration") from None
        return agent.effective(self.defaults, name=name)

    def resolved_agents(self) -> dict[str, ResolvedAgent]:
        return {name: self.agent(name) for name in self.agent_names()}


def _check_backoff(spec: DefaultsConfig | ResolvedAgent, key: str) -> None:
    # Raised from a model validator, so the message carries its own key ("key: ...").
    if spec.restart_backoff_max < spec.restart_backoff:
        raise ValueError(
            f"{key}: restart_backoff_max ({spec.restart_backoff_max:g}) must be >= "
            f"restart_backoff ({spec.restart_backoff:g})"
        )


def _explicit(model: BaseModel) -> dict[str, Any]:
    """The fields a user actually set, in the model's own (validated) form."""
    return {key: getattr(model, key) for key in model.model_fields_set}


# --------------------------------------------------------------------------- errors


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts = [str(part) for part in loc if part != "[key]"]
    return ".".join(parts)


_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
}


def _problem(error: Mapping[str, Any], prefix: tuple[str, ...]) -> tuple[str, str]:
    loc = tuple(error["loc"])
    # A field alias (docker.agentIdleTimeout) is already in loc as the user wrote it.
    key = _dotted(prefix + loc)
    kind = error["type"]
    secret = "env" in loc  # never echo environment values back
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    if kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        # Cross-field errors come from a model validator (empty loc) as "key: message".
        match = re.match(r"^([\w.-]+): (.*)$", message, re.DOTALL)
        if not key and match:
            return match.group(1), match.group(2)
        return key, message
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        got = "" if secret else f", got {error.get('input')!r}"
        return key, f"must be one of {expected}{got}"
    if kind == "string_type" and secret:
        return key, "must be a string (quote it)"
    if kind in _TYPE_MESSAGES:
        got = "" if secret else f", got {error.get('input')!r}"
        return key, _TYPE_MESSAGES[kind] + got
    return key, str(error["msg"])


def _config_error(exc: ValidationError, *, file: str, prefix: tuple[str, ...]) -> ConfigError:
    problems = [_problem(error, prefix) for error in exc.errors()]
    lines = []
    for key, message in problems:
        lines.append(f"{file}: {key}: {message}" if key else f"{file}: {message}")
    first_key = problems[0][0] if problems else None
    # ``file`` is a display name when not a real path (e.g. "<stored spec>").
    real_file = None if file.startswith("<") else file
    return ConfigError("\n".join(lines), key=first_key or None, file=real_file)


# --------------------------------------------------------------------------- loading


def parse_settings(
    data: Mapping[str, Any], *, file: str | None = None, base_dir: Path | None = None
) -> Settings:
    """Validate an already-parsed document; errors name ``file`` and the dotted key."""
    display = file or "<config>"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{display}: the top level must be a table/object", file=file)
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise _config_error(exc, file=display, prefix=()) from exc
    settings._source_file = file
    settings._base_dir = base_dir
    return settings


def parse_agent_config(data: Mapping[str, Any], *, name: str, source: str = "<api>") -> AgentConfig:
    """Validate one agent (e.g. registered over the API); keys read ``agents.NAME.*``."""
    try:
        validate_agent_name(name)
    except ValueError as exc:
        raise ConfigError(f"{source}: agents.{name}: {exc}", key=f"agents.{name}") from None
    try:
        return AgentConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise _config_error(exc, file=source, prefix=("agents", name)) from exc


def find_config_file(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The file to load: ``path``, else ``$ROOST_CONFIG``, else ``./roost.toml``, else None.

    An explicitly named file (argument or variable) must exist; ``./roost.toml``
    is optional.
    """
    env = os.environ if environ is None else environ
    base = Path(cwd) if cwd is not None else None
    named: Path | None = None
    how = ""
    if path is not None and str(path):
        named, how = Path(path), "--config"
    elif env.get(CONFIG_ENV_VAR):
        named, how = Path(env[CONFIG_ENV_VAR]), CONFIG_ENV_VAR
    if named is not None:
        if base is not None and not named.is_absolute():
            named = base / named
        if not named.is_file():
            raise ConfigError(f"{named}: no such config file (from {how})", file=str(named))
        return named
    default = (base / DEFAULT_CONFIG_NAME) if base is not None else Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def _read_document(file: Path) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}", file=str(file)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text: {exc}", file=str(file)) from exc
    if file.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                file=str(file),
            ) from exc
        if not isinstance(document, dict):
            raise ConfigError(f"{file}: the top level must be a JSON object", file=str(file))
        return document
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's message carries "(at line N, column M)".
        raise ConfigError(f"{file}: invalid TOML: {exc}", file=str(file)) from exc


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Find, read and validate the configuration (see :func:`find_config_file`).

    Raises ConfigError naming the file and key. Also checks that an API token is
    configured (and readable) when ``listen`` is not loopback.
    """
    file = find_config_file(path, cwd=cwd, environ=environ)
    base_dir = Path(cwd) if cwd is not None else None
    if file is None:
        settings = parse_settings({}, file=None, base_dir=base_dir)
    else:
        document = _read_document(file)
        settings = parse_settings(document, file=str(file), base_dir=file.parent.absolute())
    if settings.requires_token():
        display = settings.source_file or "<defaults>"
        if not settings.server.token_file:
            raise ConfigError(
                f"{display}: server.token_file: required when server.listen "
                f"({settings.server.listen}) is not loopback",
                key="server.token_file",
                file=settings.source_file,
            )
        settings.token()  # fail now, not on the first request
    return settings
