"""The library: synchronous drop-ins for the code Roost replaces, and their async twins.

    ContainerManager        AsyncContainerManager      agents started on demand, kept alive
    DockerAgentRunner       AsyncDockerAgentRunner     swarm agents spawned at run time

One core, two faces (as httpx has ``Client`` and ``AsyncClient``): each Async
class is the core, running a whole Roost engine of its own inside the caller's
event loop; each sync class wraps one and runs it on a private event-loop
thread (as kopf's ``KopfRunner`` runs an operator), so its methods are plain
calls with the replaced code's signatures, usable from scripts, from threads and
from code that already runs inside an event loop.

Modules: ``embedded`` (the engine core both share, and agent naming),
``loop_thread`` (the private loop), ``containers`` (the managers), ``swarm`` (the
runners). Like every front end, the library reaches agents only through
``engine.agents``.
"""

from __future__ import annotations

from roost.library.containers import AsyncContainerManager, ContainerManager
from roost.library.embedded import agent_name_for
from roost.library.swarm import AgentContainer, AsyncDockerAgentRunner, DockerAgentRunner

__all__ = [
    "AgentContainer",
    "AsyncContainerManager",
    "AsyncDockerAgentRunner",
    "ContainerManager",
    "DockerAgentRunner",
    "agent_name_for",
]
