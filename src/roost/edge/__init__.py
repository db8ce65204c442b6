"""The HTTP edge: everything between a client's socket and Roost's handlers.

``roost.edge.create_app(engine, token=...)`` composes, in request order: the
token check, the body-size limit, the reverse proxy for ``/agents/{name}/...``,
then the admin API (FastAPI). Serving and tests use exactly this.
"""

from __future__ import annotations

from roost.edge.app import Edge, create_app

__all__ = ["Edge", "create_app"]
