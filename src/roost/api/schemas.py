"""The admin API's answers as typed models: what OpenAPI documents and FastAPI checks.

Role: one pydantic model per JSON shape a route answers with (``Agent``,
``Message``, ``Job``, ``Lease``, ...; errors are ``roost.api.errors.ErrorBody``).
Routes declare them as ``response_model``, so the documented schema is the one
the answer is validated against, and an example per model shows a real answer.

Invariants:
- The shapes follow what the engine's ``to_json``/``describe`` produce (the
  contract fields of DESIGN.md "Interfaces" first); models allow extra fields, so
  a field added to an answer later is passed on, never dropped.
- Optional fields that only some agents have (``agent_id``, ``capabilities`` of
  spawned agents) are left out of the answer when absent, not sent as null
  (routes serialise with ``exclude_unset``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from roost.core.jobs import JobStatus
from roost.core.states import AgentState
from roost.ports.inbox import Inbox, MessageStatus
from roost.reactor.agents import Action, Agents

__all__ = [
    "Agent",
    "AgentDetails",
    "AgentList",
    "AgentName",
    "Event",
    "EventList",
    "ExitInfo",
    "ExitRecord",
    "Health",
    "HistoryEntry",
    "Job",
    "JobList",
    "Lease",
    "LeaseList",
    "Message",
    "MessageAccepted",
    "MessageList",
    "MessageOutcome",
    "agent_body",
]

OPEN = ConfigDict(extra="allow")

#: The agent named in a route's path (its example helps the docs and the API fuzzer).
AgentName = Annotated[
    str,
    Path(description="The agent's name.", openapi_examples={"echo": {"value": "echo"}}),
]


class ExitInfo(BaseModel):
    """How the agent's last container ended."""

    model_config = OPEN

    exit_code: int | None = Field(description="Exit code; null when it never ran or vanished.")
    oom_killed: bool = Field(description="Killed by the kernel's OOM killer.")
    error: str = Field(description="Docker's error, or why Roost ended it ('' if none).")
    finished_at: str | None = Field(description="When it ended (Docker's RFC 3339 time).")


class ExitRecord(ExitInfo):
    """One stored exit of the agent, with the output its container left."""

    log_tail: str = Field(
        default="", description="The last lines (up to 100, 16 KiB) of its output."
    )
    container_id: str | None = Field(default=None, description="The container that exited.")


_AGENT_EXAMPLE: dict[str, Any] = {
    "name": "echo",
    "state": "running",
    "container_id": "5f0c2e3b9d41a7c8e2f1b6d3a9c0e4f7b2d8a1c5e9f3b7d2a6c0e4f8b1d5a9c3",
    "url": "http://127.0.0.1:49153",
    "restart_count": 0,
    "last_activity_at": 1767225600.25,
    "last_exit": None,
    "last_error": None,
    "state_since": 1767225590.5,
    "config_hash": "9b1f4c2e7a3d5b8f0c6e2a4d8b1f3c5e7a9d0b2f4c6e8a1d3b5f7c9e0a2b4d6f",
    "image": "roost-mimic:latest",
    "actions": ["stop", "pause", "restart"],
    "pending_messages": 0,
}


class Agent(BaseModel):
    """An agent (contract: DESIGN.md "Interfaces")."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [_AGENT_EXAMPLE]})

    name: str = Field(description="The agent's name (a DNS label).")
    state: AgentState = Field(description="Lifecycle state.")
    container_id: str | None = Field(description="The container backing it now, if any.")
    url: str | None = Field(description="Where it answers; null unless running or idle.")
    restart_count: int = Field(description="Crash restarts since the last reset.")
    last_activity_at: float | None = Field(description="Last sign of use (epoch seconds).")
    last_exit: ExitInfo | None = Field(description="How its last container ended.")
    last_error: str | None = Field(description="Why its last start failed, if it did.")
    state_since: float = Field(description="When it entered its state (epoch seconds).")
    config_hash: str = Field(description="Hash of the spec its container was made from.")
    image: str = Field(default="", description="The image it runs.")
    agent_id: str = Field(default="", description="Spawned agents: the coordinator's id.")
    capabilities: list[str] = Field(
        default_factory=list, description="Spawned agents: what it can do."
    )
    actions: list[Action] = Field(
        description="The actions its state allows now (POST /api/agents/{name}/{action})."
    )
    pending_messages: int = Field(description="Queue depth: messages queued or being delivered.")


class HistoryEntry(BaseModel):
    """One state change."""

    model_config = ConfigDict(populate_by_name=True)

    from_: AgentState = Field(alias="from", description="State left.")
    to: AgentState = Field(description="State entered.")
    reason: str = Field(description="Why.")
    at: float = Field(description="When (epoch seconds).")


class AgentDetails(Agent):
    """An agent with its latest state changes, oldest first."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    **_AGENT_EXAMPLE,
                    "history": [
                        {
                            "from": "created",
                            "to": "starting",
                            "reason": "start requested via API",
                            "at": 1767225590.2,
                        },
                        {
                            "from": "starting",
                            "to": "running",
                            "reason": "healthy",
                            "at": 1767225590.5,
                        },
                    ],
                }
            ]
        },
    )

    history: list[HistoryEntry] = Field(description="Latest state changes, oldest first.")
    config: dict[str, Any] = Field(
        description="Its settings, [defaults] merged with its table; env values are "
        "never shown, only their names (env_names)."
    )
    exits: list[ExitRecord] = Field(
        default_factory=list, description="Its latest exits (up to 10), newest first."
    )


class AgentList(BaseModel):
    agents: list[Agent] = Field(description="Every agent, by name.")


class Health(BaseModel):
    """Roost itself."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ok": True, "status": "ok", "problems": {}, "agents": 2, "docker_api": "1.41"},
                {
                    "ok": False,
                    "status": "degraded",
                    "problems": {"engine": "Docker is unreachable: cannot ping"},
                    "agents": 2,
                    "docker_api": "1.41",
                },
            ]
        }
    )

    ok: bool = Field(description="True unless a problem holds (then status is degraded).")
    status: Literal["ok", "degraded"] = Field(description="ok, or degraded while a problem holds.")
    problems: dict[str, str] = Field(
        description="Each condition that holds now (engine, store) with its reason."
    )
    agents: int = Field(description="Agents known.")
    docker_api: str = Field(description="The Docker Engine API version in use.")


class MessageAccepted(BaseModel):
    """A stored message (``POST .../messages`` without ``?wait=true``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"id": "01JH5Z3Q8X2M", "agent": "echo", "status": "queued"}]
        },
    )

    id: str = Field(description="The message id (also sent as Roost-Message-Id).")
    agent: str
    status: MessageStatus


class MessageOutcome(MessageAccepted):
    """A message once it has an outcome (``?wait=true``): the reply, or the error; or,
    for a repeated ``Idempotency-Key``, the stored message's id and status."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "01JH5Z3Q8X2M",
                    "agent": "echo",
                    "status": "delivered",
                    "attempts": 1,
                    "reply": {"echo": {"hi": 1}},
                }
            ]
        },
    )

    attempts: int = Field(
        default=0, description="Delivery attempts made (absent on an Idempotency-Key repeat)."
    )
    reply: Any = Field(default=None, description="The agent's JSON reply (delivered).")
    error: str | None = Field(default=None, description="Why it failed (failed, dead).")


class Message(BaseModel):
    """A durable message (contract: id, agent, status, attempts, reply, error)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "01JH5Z3Q8X2M",
                    "agent": "echo",
                    "seq": 1,
                    "status": "delivered",
                    "attempts": 1,
                    "reply": {"echo": {"hi": 1}},
                    "error": None,
                    "idempotency_key": None,
                    "created_at": 1767225600.0,
                    "updated_at": 1767225600.1,
                    "next_attempt_at": None,
                    "delivered_at": 1767225600.1,
                    "body": {"hi": 1},
                }
            ]
        },
    )

    id: str
    agent: str
    seq: int = Field(description="Acceptance order within the agent.")
    status: MessageStatus
    attempts: int
    reply: Any = Field(description="The agent's reply once delivered.")
    error: str | None = Field(description="The last error, if any.")
    idempotency_key: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float | None = Field(description="When a retry is due.")
    delivered_at: float | None
    body: Any = Field(description="The message as sent.")


class MessageList(BaseModel):
    agent: str
    pending: int = Field(description="Queued or being delivered (the queue depth).")
    messages: list[Message]


class Job(BaseModel):
    """A one-shot job. Env values are never shown, only their names."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "job-3f9a1c2b7d4e",
                    "status": "succeeded",
                    "image": "roost-busybox:latest",
                    "command": ["echo", "hi"],
                    "project": "",
                    "snapshot_key": None,
                    "snapshot_used": False,
                    "created_at": 1767225600.0,
                    "started_at": 1767225600.3,
                    "finished_at": 1767225600.6,
                    "duration": 0.3,
                    "exit_code": 0,
                    "oom_killed": False,
                    "error": None,
                    "log_tail": "hi\n",
                    "container_id": None,
                    "timeout": 3600.0,
                    "memory": 536870912,
                    "cpus": None,
                    "network": None,
                    "labels": {},
                    "env_names": [],
                }
            ]
        },
    )

    id: str
    status: JobStatus
    image: str
    command: list[str] | None
    project: str
    snapshot_key: str | None
    snapshot_used: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration: float | None = Field(description="Seconds from start to end.")
    exit_code: int | None
    oom_killed: bool
    error: str | None
    log_tail: str = Field(description="The last lines of output (secrets redacted).")
    container_id: str | None
    timeout: float
    memory: int | None
    cpus: float | None
    network: str | None
    labels: dict[str, str]
    env_names: list[str]


class JobList(BaseModel):
    jobs: list[Job] = Field(description="Newest first.")


class Lease(BaseModel):
    """A lease keeping an agent awake."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "lease-7c1e9a",
                    "agent": "echo",
                    "holder": "nightly-report",
                    "ttl": 600.0,
                    "granted_at": 1767225600.0,
                    "expires_at": 1767226200.0,
                }
            ]
        },
    )

    id: str
    agent: str
    holder: str
    ttl: float
    granted_at: float = Field(description="Epoch seconds.")
    expires_at: float = Field(description="Epoch seconds.")


class LeaseList(BaseModel):
    leases: list[Lease]


class Event(BaseModel):
    """One event of the hub (its kind's fields beside these)."""

    model_config = OPEN

    id: int = Field(description="Strictly increasing; resume after it with Last-Event-ID.")
    kind: str = Field(description="agent.state, message.status, job.state, agent.waking, ...")
    at: float = Field(description="Epoch seconds.")


class EventList(BaseModel):
    events: list[Event]


def agent_body(agents: Agents, inbox: Inbox, name: str) -> dict[str, Any]:
    """An agent as the API answers it: ``Agents.describe`` plus the actions its state
    allows and its queue depth."""
    return {
        **agents.describe(name),
        "actions": agents.allowed_actions(name),
        "pending_messages": inbox.pending_count(name),
    }
