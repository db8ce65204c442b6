"""Roost's configuration file: its sections, the whole ``Settings``, and its loader.

Role: validate configuration once, at the edge, into frozen pydantic models, and
turn every problem into one :class:`roost.errors.ConfigError` whose message names
the file and the dotted key (``roost.toml: agents.echo.memory: invalid size ...``).

Invariants:
- Every model is ``extra="forbid"``, ``frozen=True`` and ``strict=True``: an
  unknown key is an error naming it (and the nearest known key), and ``"10"`` is
  not a number.
- Nothing is read from the environment or the disk at import time;
  :func:`load_settings` reads the file (blocking I/O: call it before the event
  loop starts, or through ``asyncio.to_thread``).
- Relative paths (``state_dir``, ``token_file``) are relative to the directory
  of the config file (the working directory when no file was found).
- Every agent is resolved (``[defaults]`` merged with its table, see
  :mod:`roost.config.agents`) once, while the file is validated: a contradictory
  override fails at load, and readers get the same frozen spec every time.

Where the file comes from (first match wins): the explicit path (``--config``),
``ROOST_CONFIG``, ``roost.toml`` in the working directory, built-in defaults.
Then every key can be overridden from the environment as
``ROOST_<SECTION>__<KEY>`` (``ROOST_DEFAULTS__IDLE_TIMEOUT=5m``,
``ROOST_AGENTS__ECHO__MEMORY=256m``, ``ROOST_AGENTS__ECHO__ENV__MODE=echo``): a
value is read as a TOML value when it is one (``30``, ``true``, ``["a"]``), else as
text; an error in it names the variable.
A ``.json`` file is parsed as JSON and may use the original proposal's keys
``{"docker": {"agentIdleTimeout", "agentMaxRestarts",
"agentRestartBackoffSeconds"}}``, which map onto ``[defaults]`` (also accepted
in a TOML ``[docker]`` table).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from roost.config.agents import FROZEN, AgentSettings, ResolvedAgent, resolve_agent
from roost.config.fields import (
    AbsolutePath,
    AgentListen,
    AgentName,
    AtLeastOne,
    Backend,
    Count,
    DockerName,
    EnvNames,
    Flag,
    HttpUrl,
    IpAddress,
    Listen,
    LogLevel,
    NodeHosts,
    PositiveSeconds,
    PositiveSize,
    RequiredImage,
    Seconds,
    Size,
    Text,
    parse_duration,
    split_listen,
    validate_agent_name,
)
from roost.config.problems import config_error
from roost.config.sources import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_NAME,
    DEFAULT_LISTEN,
    environment_overrides,
    find_config_file,
    laid_over,
    read_document,
    read_token,
)
from roost.errors import ConfigError, NotFound

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "DockerConfig",
    "JobsConfig",
    "NotifyConfig",
    "ServerConfig",
    "Settings",
    "SwarmConfig",
    "find_config_file",
    "load_settings",
    "parse_agent_settings",
    "parse_settings",
]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _optional_seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _optional_count(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return value


def _instance_name(value: object) -> str:
    if value == "":
        return ""
    return validate_agent_name(value)


InstanceName = Annotated[str, BeforeValidator(_instance_name)]

# The original proposal's names for three [defaults] keys (docker.agentIdleTimeout ...).
OptSeconds = Annotated[float | None, BeforeValidator(_optional_seconds)]
OptCount = Annotated[int | None, BeforeValidator(_optional_count)]


# --------------------------------------------------------------------------- sections


class ServerConfig(BaseModel):
    """``[server]``: where Roost listens and keeps its state."""

    model_config = FROZEN

    listen: Listen = Field(
        default=DEFAULT_LISTEN,
        description="host:port for the proxy, admin API and dashboard ('[::1]:7075' for IPv6).",
    )
    state_dir: Text = Field(
        default=".roost",
        description="Directory of the SQLite database; relative to the config file's directory.",
    )
    token_file: Text = Field(
        default="",
        description="File holding the API bearer token; required when listen is not loopback.",
    )
    public_url: HttpUrl = Field(
        default="",
        description=(
            "Roost's admin URL as containers see it (the swarm's COORDINATOR_URL). Empty: "
            "http://host.docker.internal:<listen port>. Containers reach the host through "
            "the bridge gateway, so that only works if Roost does not listen on 127.0.0.1 only."
        ),
    )
    agent_listen: AgentListen = Field(
        default=":7076",
        description="host:port of the agent listener, the only Roost endpoint containers "
        "reach (their ROOST_URL): their queue, their WebSocket and, with may_route, "
        "routing. Empty host: the gateway of the agents' network. Port 0: any free port "
        "(containers adopted after a restart then point at the old one).",
    )
    max_body_size: PositiveSize = Field(
        default=1024 * 1024,
        description="Largest accepted request/message body: bytes or a size like '1m'.",
    )
    log_level: LogLevel = Field(
        default="info", description="debug, info, warning, error or critical."
    )
    header_timeout: PositiveSeconds = Field(
        default=10.0,
        description="A client that has not sent a whole request head this long after "
        "connecting (or after its next request began) is cut off (slowloris).",
    )
    keep_alive_timeout: PositiveSeconds = Field(
        default=5.0, description="An idle kept-alive client connection is closed after this."
    )
    max_connections: AtLeastOne = Field(
        default=2048,
        description="Most client connections (or requests in flight) at once; beyond it, 503.",
    )

    @property
    def listen_host(self) -> str:
        """Host part of ``listen`` (brackets removed; '' means all interfaces)."""
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def agent_listen_host(self) -> str:
        """Host part of ``agent_listen`` ('': the agents' network gateway)."""
        return split_listen(self.agent_listen, any_port=True)[0]

    @property
    def agent_listen_port(self) -> int:
        return split_listen(self.agent_listen, any_port=True)[1]

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

    model_config = FROZEN

    host: Text = Field(
        default="", description="Docker endpoint; empty: DOCKER_HOST or the local socket."
    )
    instance: InstanceName = Field(
        default="",
        description=(
            "This Roost's id, stored in the roost.instance label: two Roosts on one engine "
            "never touch each other's containers. A DNS label; empty: an id kept in the "
            "state directory (made on first start)."
        ),
    )
    leave_running: Flag = Field(
        default=False,
        description="On shutdown leave containers running; the next start adopts them.",
    )
    network: Text = Field(
        default="",
        description="Docker network for agent and job containers; empty: agents join "
        "agent_network, jobs the default bridge.",
    )
    agent_network: DockerName = Field(
        default="roost-agents",
        description="The agents' network when docker.network is empty: created if missing "
        "(labelled roost.managed, inter-container traffic off, so one agent reaches another "
        "only through Roost), shared by every Roost on this engine; the agent listener "
        "binds on its gateway. Empty: the default bridge.",
    )
    publish_host: IpAddress = Field(
        default="127.0.0.1", description="Host IP agent ports are published on."
    )
    pull_timeout: PositiveSeconds = Field(
        default=300.0, description="Seconds allowed for pulling an absent image."
    )
    connection_limit: AtLeastOne = Field(
        default=32, description="Most simultaneous connections to the Docker API."
    )
    max_concurrent_starts: AtLeastOne = Field(
        default=4,
        description="Most agent containers being created and started at once (the start "
        "pool; readiness waits outside it). Docker tops out near 7 starts/s on 2 cores and "
        "more at once only queue inside dockerd; raise it on a bigger engine.",
    )
    backend: Backend = Field(
        default="engine",
        description="What runs the agents: 'engine' (containers on the one Docker Engine at "
        "host) or 'swarm' (one service per agent on the Docker Swarm whose manager is at "
        "host; jobs stay containers on that engine).",
    )
    node_hosts: NodeHosts = Field(
        default_factory=dict,
        description="backend = 'swarm': the Docker API of each node, keyed by node id or "
        "address (Status.Addr), where Roost reads an exit's OOM flag and error; a node "
        "not listed reports them as unknown.",
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

    model_config = FROZEN

    webhook: HttpUrl = Field(
        default="",
        description="URL that gets a JSON POST on agent.failed, agent.waking, ...; empty: log only.",
    )
    timeout: PositiveSeconds = Field(default=5.0, description="Seconds per webhook attempt.")


class SwarmConfig(BaseModel):
    """``[swarm]``: how agents spawned at run time (``POST /api/agents``,
    ``DockerAgentRunner``) are wired: one shared network, one shared volume, and
    the coordinator they report to."""

    model_config = FROZEN

    network: DockerName = Field(
        default="roost-swarm",
        description="Docker network every spawned agent joins (created if missing); "
        "empty: the agents' network (docker.network, else docker.agent_network).",
    )
    volume: DockerName = Field(
        default="roost-swarm-data",
        description="Docker volume shared by every spawned agent (created if missing); "
        "empty: none.",
    )
    volume_path: AbsolutePath = Field(
        default="/data", description="Where the shared volume is mounted inside the agents."
    )
    coordinator_url: HttpUrl = Field(
        default="",
        description="COORDINATOR_URL given to spawned agents; empty: Roost's public URL "
        "(server.public_url or http://host.docker.internal:<listen port>).",
    )
    image: RequiredImage = Field(
        default="roost-mimic:latest", description="Image of a spawned agent that names none."
    )


class JobsConfig(BaseModel):
    """``[jobs]``: one-shot job containers (``/api/jobs``, ``roost jobs``)."""

    model_config = FROZEN

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
    snapshot_max_bytes: Size = Field(
        default=10 * 1024**3,
        description="Most bytes of snapshot images kept: bytes or a size like '10g'; 0: no limit.",
    )
    secret_env: EnvNames = Field(
        default=(),
        description="Env names whose values are secret besides *_KEY, *_TOKEN, *_SECRET and "
        "*PASSWORD*: scrubbed from snapshot images and redacted from stored logs.",
    )
    pull_timeout: PositiveSeconds = Field(
        default=300.0, description="Seconds allowed for pulling a job's absent image."
    )


_PROPOSAL_KEYS: tuple[tuple[str, str, str], ...] = (
    # (DockerConfig attribute, its alias in the file, the [defaults] key)
    ("agent_idle_timeout", "agentIdleTimeout", "idle_timeout"),
    ("agent_max_restarts", "agentMaxRestarts", "max_restarts"),
    ("agent_restart_backoff_seconds", "agentRestartBackoffSeconds", "restart_backoff"),
)


class Settings(BaseModel):
    """The whole configuration file. Build it with :func:`load_settings`."""

    model_config = FROZEN

    server: ServerConfig = Field(default_factory=ServerConfig, description="[server]")
    docker: DockerConfig = Field(default_factory=DockerConfig, description="[docker]")
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="[notify]")
    defaults: AgentSettings = Field(
        default_factory=AgentSettings, description="[defaults]: what every agent inherits."
    )
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="[jobs]")
    swarm: SwarmConfig = Field(default_factory=SwarmConfig, description="[swarm]")
    agents: dict[AgentName, AgentSettings] = Field(
        default_factory=dict, description="[agents.NAME] tables: each overrides [defaults]."
    )

    _source_file: str | None = PrivateAttr(default=None)
    _base_dir: Path | None = PrivateAttr(default=None)
    _resolved: dict[str, ResolvedAgent] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
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
            merged = AgentSettings.model_validate({**self.defaults.explicit(), **updates})
            # Still inside validation: nobody holds this instance yet, so setting the
            # frozen field once here is safe (pydantic wants ``self`` returned).
            object.__setattr__(self, "defaults", merged)
        if self.defaults.restart_backoff_max < self.defaults.restart_backoff:
            raise ValueError(
                f"defaults.restart_backoff_max: restart_backoff_max "
                f"({self.defaults.restart_backoff_max:g}) must be >= restart_backoff "
                f"({self.defaults.restart_backoff:g})"
            )
        # Resolve every agent now, so a contradictory override fails at load. In the
        # file's order: routing takes the first agent, in configuration order.
        self._resolved = {
            name: resolve_agent(name, self.defaults, table) for name, table in self.agents.items()
        }
        if self.docker.backend != "swarm":
            placed = [f"agents.{name}" for name, t in self.agents.items() if t.placement]
            if self.defaults.placement:
                placed.insert(0, "defaults")
            if placed:
                raise ValueError(
                    f"{placed[0]}.placement: only the swarm backend places agents "
                    "(set docker.backend = 'swarm', or remove placement)"
                )
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
    def agents_network(self) -> str | None:
        """The network agents join: ``docker.network``, else ``docker.agent_network``;
        None: Docker's default bridge."""
        return self.docker.network or self.docker.agent_network or None

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
        return read_token(path, self._source_file)

    def requires_token(self) -> bool:
        """True when ``listen`` is reachable from other machines (not loopback)."""
        return not self.server.is_loopback

    def agent_names(self) -> list[str]:
        return sorted(self.agents)

    def agent(self, name: str) -> ResolvedAgent:
        """The resolved spec of a configured agent; NotFound if there is none."""
        try:
            return self._resolved[name]
        except KeyError:
            raise NotFound(f"no agent {name!r} in the configuration") from None

    def resolved_agents(self) -> dict[str, ResolvedAgent]:
        """Every configured agent, in the configuration file's order."""
        return dict(self._resolved)


# --------------------------------------------------------------------------- loading


def parse_settings(
    data: Mapping[str, Any],
    *,
    file: str | None = None,
    base_dir: Path | None = None,
    origins: Mapping[str, str] | None = None,
) -> Settings:
    """Validate an already-parsed document; errors name ``file`` and the dotted key
    (and the environment variable, for keys in ``origins``)."""
    display = file or "<config>"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{display}: the top level must be a table/object", file=file)
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(
            exc, file=display, prefix=(), root=Settings, origins=origins or {}
        ) from exc
    settings._source_file = file
    settings._base_dir = base_dir
    return settings


def parse_agent_settings(
    data: Mapping[str, Any], *, name: str, source: str = "<api>"
) -> AgentSettings:
    """Validate one agent's table (e.g. registered over the API); keys read
    ``agents.NAME.*``."""
    try:
        validate_agent_name(name)
    except ValueError as exc:
        raise ConfigError(f"{source}: agents.{name}: {exc}", key=f"agents.{name}") from None
    try:
        return AgentSettings.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, file=source, prefix=("agents", name), root=AgentSettings) from exc


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    refuse_empty: bool = False,
) -> Settings:
    """Find, read and validate the configuration (see :func:`find_config_file`).

    Raises ConfigError naming the file and key. Also checks that an API token is
    configured (and readable) when ``listen`` is not loopback. ``refuse_empty``
    (a reload): a file that holds no settings at all is refused, as read once: a
    file caught while it is rewritten in place reads empty, and applying it would
    remove every configured agent.
    """
    file = find_config_file(path, cwd=cwd, environ=environ)
    base_dir = Path(cwd) if cwd is not None else None
    overlay, origins = environment_overrides(os.environ if environ is None else environ)
    if file is None:
        settings = parse_settings(overlay, file=None, base_dir=base_dir, origins=origins)
    else:
        read = read_document(file)
        if refuse_empty and not read:
            raise ConfigError(
                f"{file}: the file holds no settings (being written?); nothing was changed",
                file=str(file),
            )
        document = laid_over(read, overlay)
        settings = parse_settings(
            document, file=str(file), base_dir=file.parent.absolute(), origins=origins
        )
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
