"""An agent's settings, each declared once, grouped by concern.

Role: one model, :class:`AgentSettings`, validates ``[defaults]`` and every
``[agents.NAME]`` table alike. An agent is the defaults merged with the keys its
own table sets (:func:`resolve_agent`), giving a :class:`ResolvedAgent`: the
frozen spec every reader takes its values from. The settings are declared in
groups that name their concern (as kopf groups its settings):

- :class:`ContainerSettings` — what shapes the container; a change means a new
  container, so :meth:`ResolvedAgent.config_hash` covers exactly these keys;
- :class:`LifecycleSettings` — idling, restarts, health: the numbers
  ``roost.core.transition`` obeys (a ``ResolvedAgent`` *is* its
  :class:`roost.core.policy.Policy`; nothing copies them);
- :class:`DeliverySettings` — durable messages: how they reach the agent (push,
  pull or WebSocket) and how often they are tried;
- :class:`HoldSettings` — requests held while the agent wakes;
- :class:`RoutingSettings` — which event types the agent handles, and whether it
  may route events itself.

Invariants:
- Every field is declared once, with its default and its description; no other
  module re-declares a setting or its default.
- A table is validated on its own, so an error names its table
  (``agents.echo.memory``); cross-key rules run on the merged agent and name the
  table that set the offending key.
- ``ResolvedAgent`` is frozen; its ``config_hash`` and JSON form are computed once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from roost.config.fields import (
    AgentName,
    AtLeastOne,
    Command,
    Count,
    Cpus,
    Delivery,
    Env,
    EventPatterns,
    Flag,
    HostPort,
    IdleAction,
    Image,
    IpAddressOrEmpty,
    MemorySize,
    OptionalUrlPath,
    Placement,
    Port,
    PositiveSeconds,
    Seconds,
    Strings,
    Text,
    UrlPath,
    parse_capabilities_list,
)
from roost.config.problems import config_error
from roost.core import routing
from roost.errors import ConfigError

__all__ = [
    "AGENT_KEYS",
    "CONTAINER_KEYS",
    "AgentSettings",
    "ContainerSettings",
    "DeliverySettings",
    "HoldSettings",
    "LifecycleSettings",
    "ResolvedAgent",
    "RoutingSettings",
    "SpawnedAgent",
    "resolve_agent",
]

FROZEN = ConfigDict(extra="forbid", frozen=True, strict=True)

#: Capabilities an agent keeps by default (after dropping ALL): enough for images
#: that chown their files, switch to another user or bind a low port.
DEFAULT_CAP_ADD: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
    "KILL",
)

Capabilities = Annotated[tuple[str, ...], BeforeValidator(parse_capabilities_list)]


class ContainerSettings(BaseModel):
    """What shapes the agent's container. A change recreates it at its next start."""

    model_config = FROZEN

    image: Image = Field(
        default="", description="Image to run, e.g. 'roost-mimic:latest' (required per agent)."
    )
    port: Port = Field(default=8000, description="Port the agent listens on inside the container.")
    host_port: HostPort = Field(
        default=0,
        description=(
            "Host port the container's port is published on; 0: a free port Docker picks. "
            "A fixed port fits one agent only: set it per agent, not in [defaults]."
        ),
    )
    host_ip: IpAddressOrEmpty = Field(
        default="",
        description="Host address the port is published on; '': [docker] publish_host.",
    )
    env: Env = Field(default_factory=dict, description='Extra environment, NAME = "value".')
    command: Command = Field(
        default=None, description="Command override (list of strings); absent: the image's own."
    )
    memory: MemorySize = Field(
        default=512 * 1024**2,
        description="Container memory limit: bytes or '256m', '1g'; 0: no limit (min 6m).",
    )
    cpus: Cpus = Field(default=None, description="CPU limit, e.g. 0.5; absent or 0: no limit.")
    pids_limit: Count = Field(default=512, description="Most processes in the container; 0: none.")
    no_new_privileges: Flag = Field(
        default=True, description="Run with no-new-privileges (setuid binaries cannot escalate)."
    )
    cap_drop: Capabilities = Field(
        default=("ALL",),
        description="Linux capabilities dropped; [] keeps Docker's default set.",
    )
    cap_add: Capabilities = Field(
        default=DEFAULT_CAP_ADD,
        description="Capabilities added back after cap_drop: what common agent images need "
        "(chown, file ownership, switching user, low ports, signals); NET_RAW, MKNOD, "
        "SYS_CHROOT and the rest stay dropped.",
    )
    read_only_rootfs: Flag = Field(
        default=False,
        description="Read-only root filesystem, with a writable tmpfs at /tmp.",
    )
    user: Text = Field(
        default="", description="'user[:group]' the agent runs as; '': the image's own."
    )
    private_cgroupns: Flag = Field(
        default=True, description="A cgroup namespace of its own (false: the host's)."
    )
    placement: Placement = Field(
        default=(),
        description="docker.backend = 'swarm' only: placement constraints of the agent's "
        "service, e.g. ['node.labels.gpu==true', 'node.role!=manager']; []: any node.",
    )


class LifecycleSettings(BaseModel):
    """Idling, restarts and health: the numbers ``roost.core.transition`` obeys."""

    model_config = FROZEN

    idle_timeout: Seconds = Field(
        default=1800.0, description="Seconds without activity before idle_action; 0 never idles."
    )
    idle_action: IdleAction = Field(default="stop", description="'pause' or 'stop' when idle.")
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
    liveness_interval: PositiveSeconds = Field(
        default=10.0, description="Health probe period while running."
    )
    liveness_failures: AtLeastOne = Field(
        default=3, description="Consecutive failed probes handled as a crash."
    )
    connect_timeout: PositiveSeconds = Field(
        default=60.0,
        description="delivery = 'websocket': a started container must connect to its "
        "WebSocket within this, or the start failed (backoff, max_restarts, alert).",
    )

    @property
    def can_pause(self) -> bool:
        """Not a setting: whether the backend can pause (``roost.core.policy.Policy``).
        A file cannot change what a backend offers, so settings answer True; the
        supervisor gives the core ``without_pause(spec)`` where the backend cannot."""
        return True


class DeliverySettings(BaseModel):
    """How durable messages reach the agent."""

    model_config = FROZEN

    delivery: Delivery = Field(
        default="push",
        description="'push': Roost POSTs each message to message_path; 'pull': the agent "
        "takes them from its queue (queue/next, complete, heartbeat); 'websocket': the "
        "agent connects to its WebSocket and gets them as frames.",
    )
    message_path: UrlPath = Field(
        default="/messages", description="POST a JSON message here; the reply is JSON."
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
    max_attempts: Count = Field(
        default=0,
        description="Delivery attempts of one message without a reply (no answer, a 5xx, "
        "an expired lease, a WebSocket lost before the reply) before it is 'dead'; 0: no limit.",
    )
    lease_timeout: PositiveSeconds = Field(
        default=60.0,
        description="delivery = 'pull': a message taken with queue/next is leased this long; "
        "a heartbeat renews it; once it expires the message is given out again.",
    )
    nudge_path: OptionalUrlPath = Field(
        default="",
        description="delivery = 'pull': POST {\"task_id\": id} here when a message is "
        "waiting, fire and forget; empty: no nudge (other modes ignore it).",
    )


class HoldSettings(BaseModel):
    """Requests held while the agent wakes."""

    model_config = FROZEN

    hold_timeout: PositiveSeconds = Field(
        default=60.0, description="Longest a request is held while the agent wakes."
    )
    waking_notice_after: Seconds = Field(
        default=1.0, description="A request held this long while waking emits agent.waking."
    )
    waiting_page: Flag = Field(
        default=False,
        description="A browser (GET/HEAD with Accept: text/html) asking for a sleeping agent "
        "through the proxy gets a small self-refreshing page showing its state until it is "
        "ready, instead of a held request; API clients are held as before.",
    )


class RoutingSettings(BaseModel):
    """Routing by event type (``POST /api/route/{event_type}``)."""

    model_config = FROZEN

    event_types: EventPatterns = Field(
        default=None,
        description="Glob patterns of the event types this agent handles, e.g. "
        "['issue.opened', 'pr.*']; absent: '<name up to the first ->.*' "
        "(issue-triage handles issue.*); []: none.",
    )
    may_route: Flag = Field(
        default=False,
        description="The agent may route events itself (POST /api/route/... on the "
        "agent listener, with its own token).",
    )


class AgentSettings(
    ContainerSettings, LifecycleSettings, DeliverySettings, HoldSettings, RoutingSettings
):
    """``[defaults]`` and ``[agents.NAME]`` alike: every setting an agent has."""

    model_config = FROZEN

    def explicit(self) -> dict[str, Any]:
        """The keys this table set, in validated form."""
        return {key: getattr(self, key) for key in self.model_fields_set}


#: Every key of ``[defaults]`` and ``[agents.NAME]``.
AGENT_KEYS: tuple[str, ...] = tuple(AgentSettings.model_fields)
#: Keys whose change needs a new container (what ``config_hash`` covers).
CONTAINER_KEYS: tuple[str, ...] = tuple(ContainerSettings.model_fields)


class ResolvedAgent(AgentSettings):
    """One agent with every value concrete: ``[defaults]`` merged with its table.

    Stored in the database as JSON (``to_json``/``from_json``). ``memory == 0``
    and ``pids_limit == 0`` mean no limit; ``cpus is None`` means no limit.
    ``env`` is a plain dict for convenience: treat it as read-only.
    """

    name: AgentName = Field(description="The agent's name (a DNS label).")

    @property
    def routes(self) -> tuple[str, ...]:
        """The event type patterns it handles: ``event_types``, or the prefix rule."""
        return routing.patterns_of(self.name, self.event_types)

    def container_fields(self) -> dict[str, Any]:
        """The values that shape the container: exactly ``CONTAINER_KEYS``."""
        fields = self.model_dump(mode="json", include=set(CONTAINER_KEYS))
        fields["env"] = dict(sorted(self.env.items()))
        if not fields["placement"]:
            # Added later: an agent without placement keeps the hash it had before,
            # so its container is not recreated for a key it does not use.
            del fields["placement"]
        return fields

    def shown(self) -> dict[str, Any]:
        """The settings as JSON for people and other processes: ``env`` values may be
        secrets, so only their names are shown (``env_names``)."""
        fields = self.model_dump(mode="json")
        fields["env_names"] = sorted(fields.pop("env", {}))
        return fields

    @functools.cached_property
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
            raise config_error(exc, file="<stored spec>", prefix=()) from exc


class SpawnedAgent(ResolvedAgent):
    """An agent spawned at run time into the swarm (``POST /api/agents``,
    ``DockerAgentRunner.spawn``): a resolved spec plus its swarm identity and wiring.

    Its ``env`` already holds ``COORDINATOR_URL``, ``AGENT_NAME``, ``AGENT_ID`` and
    ``AGENT_CAPABILITIES`` (see ``roost.reactor.spawning``). ``network`` and
    ``binds`` shape the container, so ``config_hash`` covers them; ``agent_id``
    and ``capabilities`` reach the container only through ``env`` (hashed there).
    """

    kind: Literal["spawned"] = Field(default="spawned", description="Marks a stored spec.")
    agent_id: str = Field(description="The agent's id in its coordinator (ROOST_AGENT_ID).")
    capabilities: Strings = Field(default=(), description="What the agent can do.")
    network: str = Field(default="", description="Docker network it joins; '': the default.")
    binds: Strings = Field(default=(), description="'volume:/path' mounts.")

    def container_fields(self) -> dict[str, Any]:
        return {**super().container_fields(), "network": self.network, "binds": list(self.binds)}


def resolve_agent(
    name: str, defaults: AgentSettings, table: AgentSettings, *, where: str = ""
) -> ResolvedAgent:
    """The agent ``name``: ``defaults`` with the keys ``table`` set laid over them.

    Both were validated already; only the rules that span keys run here, and
    their ``ValueError`` starts with the dotted key to blame (``where`` is the
    table's own prefix, e.g. ``agents.echo``; defaults are ``defaults``).
    """
    merged = {**defaults.model_dump(), **table.explicit(), "name": name}
    agent = ResolvedAgent.model_construct(_fields_set=set(merged), **merged)
    table_key = where or f"agents.{name}"
    if not agent.image:
        raise ValueError(f"{table_key}.image: required key is missing")

    if agent.restart_backoff_max < agent.restart_backoff:
        blamed = "restart_backoff_max" if "restart_backoff_max" in table.model_fields_set else None
        if blamed is None:
            blamed = "restart_backoff"
        owner = table_key if blamed in table.model_fields_set else "defaults"
        raise ValueError(
            f"{owner}.{blamed}: restart_backoff_max ({agent.restart_backoff_max:g}) must be "
            f">= restart_backoff ({agent.restart_backoff:g})"
        )
    return agent
