"""The HTTP edge: everything between a client's socket and Roost's handlers.

``roost.edge.create_app(engine, token=...)`` composes, in request order: the
token check, the body-size limit, the reverse proxy for ``/agents/{name}/...``,
then the admin API (FastAPI). ``roost.edge.create_agent_app(engine)`` is the
agent listener's: an agent container's own token, its own endpoints only.
Serving and tests use exactly these.
"""

from __future__ import annotations

from roost.edge.agent_app import AgentEdge, create_agent_app
from roost.edge.app import Edge, create_app

__all__ = ["AgentEdge", "Edge", "create_agent_app", "create_app"]
