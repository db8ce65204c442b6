"""``/api/jobs``: one-shot jobs over HTTP (the router ``create_app`` includes).

Routes: ``POST /api/jobs`` (queue; 202 with the job), ``GET /api/jobs``
(newest first; filters ``status``, ``project``, ``limit``), ``GET /api/jobs/{id}``,
``POST /api/jobs/{id}/cancel`` (waits until the job has ended),
``GET /api/jobs/{id}/logs`` (text: live while running, the stored tail after).

Invariants:
- A job body is validated here, before anything is stored: a bad field is a 422
  whose message names it (``body.memory: ...``). Env values are never echoed,
  in errors or in job JSON (which lists ``env_names`` only).
- Errors are the app's JSON ``{"error": ...}`` (its handlers map NotFound → 404,
  StateError → 409).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from roost.api import schemas
from roost.api.errors import error_responses
from roost.config.fields import DOCKER_MIN_MEMORY, parse_size
from roost.core.jobs import (
    LOG_TAIL_LINES,
    JobStatus,
    validate_env_names,
    validate_extra_labels,
    validate_snapshot_key,
)
from roost.engine import Engine

__all__ = ["JobRequest", "jobs_router"]

MAX_LIST_LIMIT = 1000
MAX_LOG_LINES = 10_000


class JobRequest(BaseModel):
    """The body of ``POST /api/jobs``."""

    # strict: a number sent as a string is refused, as the schema says.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"image": "roost-busybox:latest", "command": ["echo", "hi"], "timeout": 60}
            ]
        },
    )

    image: str = Field(description="Image to run (pulled only if absent).", min_length=1)
    command: list[str] | None = Field(
        default=None, description="Command as a list of strings; absent: the image's own."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment; the only place for secrets (never labels or command).",
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Hard limit in seconds from start; absent: the default."
    )
    memory: str | int | None = Field(
        default=None,
        description="Memory limit ('256m', '1g' or bytes); swap equals it. 0: no limit; "
        "absent: defaults.memory.",
    )
    cpus: float | None = Field(default=None, ge=0, description="CPU limit, e.g. 0.5.")
    network: str | None = Field(default=None, description="Docker network to join.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra container labels (not in 'roost.')."
    )
    project: str = Field(default="", description="Free-form project name, for filtering.")
    snapshot_key: str | None = Field(
        default=None,
        description="Start from (and, on success, save) the snapshot image of this key.",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty image reference")
        return value.strip()

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | int | None:
        if value is None:
            return None
        size = parse_size(value)
        if 0 < size < DOCKER_MIN_MEMORY:
            raise ValueError(f"{value!r} is below Docker's minimum of 6m (use 0 for no limit)")
        return size

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or 0 < value < 0.01):
            raise ValueError("must be >= 0.01 (or 0 for no limit)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_env_names(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_extra_labels(value)

    @field_validator("snapshot_key")
    @classmethod
    def _snapshot_key(cls, value: str | None) -> str | None:
        return None if value is None else validate_snapshot_key(value)


def jobs_router(engine: Engine) -> APIRouter:
    """The ``/api/jobs`` routes over ``engine.jobs`` (auth is added by the includer)."""
    runner = engine.jobs
    router = APIRouter(prefix="/api/jobs", tags=["jobs"])

    @router.post(
        "",
        status_code=202,
        summary="Queue a one-shot job; 202 with the job.",
        response_model=schemas.Job,
        responses=error_responses(409, 422),
    )
    async def submit_job(body: JobRequest) -> dict[str, Any]:
        memory = body.memory
        assert memory is None or isinstance(memory, int)
        job = await runner.submit(
            image=body.image,
            command=body.command,
            env=body.env,
            timeout=body.timeout,
            memory=memory,
            cpus=body.cpus,
            network=body.network,
            labels=body.labels,
            project=body.project,
            snapshot_key=body.snapshot_key,
        )
        return job.to_json()

    @router.get(
        "",
        summary="Jobs, newest first.",
        response_model=schemas.JobList,
        responses=error_responses(422),
    )
    async def list_jobs(
        status: Annotated[
            list[JobStatus] | None,
            Query(description="Only jobs in these states (repeat the parameter for more)."),
        ] = None,
        project: Annotated[str | None, Query(description="Only jobs of this project.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
    ) -> dict[str, Any]:
        jobs = await runner.store.list_jobs(statuses=status or (), project=project, limit=limit)
        return {"jobs": [job.to_json() for job in jobs]}

    @router.get(
        "/{job_id}",
        summary="One job.",
        response_model=schemas.Job,
        responses=error_responses(404),
    )
    async def get_job(job_id: str) -> dict[str, Any]:
        return (await runner.get(job_id)).to_json()

    @router.post(
        "/{job_id}/cancel",
        summary="Cancel a queued job, or stop a running one (SIGTERM, grace, SIGKILL); "
        "answers once it has ended.",
        response_model=schemas.Job,
        responses=error_responses(404, 409),
    )
    async def cancel_job(job_id: str) -> dict[str, Any]:
        return (await runner.cancel(job_id)).to_json()

    @router.get(
        "/{job_id}/logs",
        response_class=PlainTextResponse,
        summary="Output: live while the job runs, its stored last lines after.",
        responses={
            200: {"content": {"text/plain": {"example": "hi\n"}}},
            **error_responses(404, 422, 502, 503),
        },
    )
    async def job_logs(
        job_id: str,
        tail: Annotated[int, Query(ge=1, le=MAX_LOG_LINES)] = LOG_TAIL_LINES,
        follow: Annotated[
            bool, Query(description="Stream the output as it comes, until the job ends.")
        ] = False,
    ) -> Response:
        if follow:
            await runner.get(job_id)  # NotFound before the stream starts
            return StreamingResponse(
                runner.follow_logs(job_id),
                media_type="text/plain; charset=utf-8",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return PlainTextResponse(await runner.logs(job_id, tail=tail))

    return router
