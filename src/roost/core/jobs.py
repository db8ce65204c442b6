"""One-shot jobs, decided purely: states and transitions, outcomes, error classes,
secret scrubbing, snapshot names and eviction, orphan planning. No I/O, no clock.

Job states (contract: DESIGN.md "Vocabulary")::

    queued ──claim──▶ running ──exit 0──────────▶ succeeded
      │                 │ ├───exit ≠ 0 / OOM / error─▶ failed
      │                 │ ├───timeout (TERM, grace, KILL)─▶ timed_out
      │                 │ └───cancel / shutdown──▶ cancelled
      │                 └──no container after a restart──▶ queued (run again)
      ├──cancel──▶ cancelled
      └──terminal error before a container ran──▶ failed

Invariants:
- Final states (``succeeded``, ``failed``, ``timed_out``, ``cancelled``) never change.
- The outcome of a job Roost stopped on purpose is decided by *why* Roost
  stopped it (``StopReason``), recorded before the stop: the exit that follows
  (137 after SIGKILL) never turns a ``timed_out`` job into ``failed``.
- ``succeeded`` iff the container exited 0, was not OOM-killed, and Docker
  reported no error.
- An environment variable is secret when its name is listed in the
  configuration or matches ``*_KEY``, ``*_TOKEN``, ``*_SECRET`` or
  ``*PASSWORD*`` (names compared case-insensitively). Secret values never go
  into labels, committed images or stored logs.
- Snapshot repositories are valid Docker repository names (lowercase) and two
  different keys never map to the same repository.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from roost import errors
from roost.core.backoff import Backoff
from roost.core.labels import CONFIG_HASH, JOB, PROJECT, SNAPSHOT, ownership

__all__ = [
    "FINAL_STATUSES",
    "LOG_TAIL_LINES",
    "MAX_SNAPSHOT_GENERATIONS",
    "SECRET_NAME_PATTERNS",
    "SNAPSHOT_REPOSITORY_PREFIX",
    "TRANSIENT_RETRY",
    "ErrorKind",
    "EvictionPolicy",
    "JobContainer",
    "JobStatus",
    "Outcome",
    "SnapshotRecord",
    "StopReason",
    "can_transition",
    "check_transition",
    "classify_error",
    "decide_outcome",
    "is_secret_name",
    "job_config_hash",
    "job_labels",
    "plan_eviction",
    "plan_orphans",
    "redact",
    "reusable_snapshot",
    "scrub_env",
    "secret_values",
    "snapshot_repository",
    "validate_env_names",
    "validate_extra_labels",
    "validate_snapshot_key",
]

#: Lines of output kept from a finished job's container.
LOG_TAIL_LINES = 50
#: Delays between attempts after a transient Docker error; the budget is its length.
TRANSIENT_RETRY = Backoff((0.5, 1.0, 2.0, 4.0))
#: Env names matching these (case-insensitively) are secrets.
SECRET_NAME_PATTERNS: tuple[str, ...] = ("*_KEY", "*_TOKEN", "*_SECRET", "*PASSWORD*")
SNAPSHOT_REPOSITORY_PREFIX = "roost-snapshot/"
#: Every commit of a container started from a snapshot stacks one more layer on
#: it, and overlay2 refuses images deeper than about 125 layers. A snapshot this
#: many commits deep is not started from: the key's next job starts from its base
#: image and its commit restarts the chain (leaving room for deep base images).
MAX_SNAPSHOT_GENERATIONS = 64
#: Secret values shorter than this are not redacted from text (they would mangle it).
_MIN_REDACTED_LENGTH = 4
_SNAPSHOT_KEY_MAX = 128
_ENV_NAME = re.compile(r"^[^=\x00]+$")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED}
)

_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.TIMED_OUT,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,
        }
    ),
    **{status: frozenset() for status in FINAL_STATUSES},
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in _TRANSITIONS[current]


def check_transition(job_id: str, current: JobStatus, target: JobStatus) -> None:
    """Raise ``StateError`` naming the job when ``current → target`` is not allowed."""
    if not can_transition(current, target):
        if current in FINAL_STATUSES:
            raise errors.StateError(f"job {job_id} already ended: {current.value}")
        raise errors.StateError(f"job {job_id} cannot go from {current.value} to {target.value}")


# --------------------------------------------------------------------------- outcomes


class StopReason(enum.StrEnum):
    """Why Roost itself stopped a job's container (recorded before the stop)."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    status: JobStatus
    error: str = ""


def decide_outcome(
    *,
    exit_code: int | None,
    oom_killed: bool,
    docker_error: str,
    stop_reason: StopReason | None,
    timeout: float,
    kill_grace: float,
    memory: int | None,
) -> Outcome:
    """The final status of a job whose container ended as described."""
    if stop_reason is StopReason.TIMEOUT:
        return Outcome(
            JobStatus.TIMED_OUT,
            f"timed out after {timeout:g} s: sent SIGTERM, SIGKILL after {kill_grace:g} s grace"
            + (f" (exit code {exit_code})" if exit_code is not None else ""),
        )
    if stop_reason is StopReason.CANCEL:
        return Outcome(JobStatus.CANCELLED, "cancelled on request")
    if stop_reason is StopReason.SHUTDOWN:
        return Outcome(JobStatus.CANCELLED, "cancelled: Roost shut down while the job ran")
    if exit_code is None:
        return Outcome(
            JobStatus.FAILED,
            "the job's container disappeared before Roost saw it exit; exit code unknown",
        )
    if oom_killed:
        limit = f" of {memory // (1024 * 1024)} MiB" if memory else ""
        return Outcome(
            JobStatus.FAILED,
            f"killed by the out-of-memory killer: the job exceeded its memory limit{limit} "
            f"(exit code {exit_code})",
        )
    if docker_error:
        return Outcome(JobStatus.FAILED, f"Docker reported: {docker_error} (exit code {exit_code})")
    if exit_code == 0:
        return Outcome(JobStatus.SUCCEEDED)
    return Outcome(JobStatus.FAILED, f"exited with code {exit_code}")


# --------------------------------------------------------------------------- errors


class ErrorKind(enum.StrEnum):
    #: worth retrying within the budget (Docker unreachable or failing internally).
    TRANSIENT = "transient"
    #: retrying will not help (no such image, bad spec, name taken, ...).
    TERMINAL = "terminal"


def classify_error(exc: BaseException) -> ErrorKind:
    """Transient: the engine is unreachable (``DockerUnavailable``), a Docker error
    without a more specific meaning (``ContainerError`` other than a 4xx), or the state
    database failed (``StoreError``). Everything else is terminal: a missing image
    (``ImageUnavailable``), a container that never became healthy (``StartupTimeout``),
    a spec Docker refused (4xx), something the spec names that does not exist
    (``NotFound``: a network), a conflict, and any error Roost did not expect."""
    if isinstance(exc, errors.ImageUnavailable | errors.StartupTimeout):
        return ErrorKind.TERMINAL
    if isinstance(exc, errors.DockerUnavailable | errors.StoreError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, errors.ContainerError):
        if exc.status is not None and 400 <= exc.status < 500:
            return ErrorKind.TERMINAL  # Docker refused the spec (e.g. 400 cpus > host's)
        return ErrorKind.TRANSIENT
    return ErrorKind.TERMINAL


# --------------------------------------------------------------------------- secrets


def is_secret_name(name: str, extra: Collection[str] = ()) -> bool:
    upper = name.upper()
    if any(upper == listed.upper() for listed in extra):
        return True
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_NAME_PATTERNS)


def scrub_env(entries: Iterable[str], extra: Collection[str] = ()) -> tuple[str, ...]:
    """``NAME=value`` entries without the secret ones (order kept)."""
    return tuple(entry for entry in entries if not is_secret_name(entry.split("=", 1)[0], extra))


def secret_values(env: Mapping[str, str], extra: Collection[str] = ()) -> tuple[str, ...]:
    """The values of ``env``'s secret variables that are long enough to redact,
    longest first (so a secret containing another is replaced whole)."""
    values = {
        value
        for name, value in env.items()
        if is_secret_name(name, extra) and len(value) >= _MIN_REDACTED_LENGTH
    }
    return tuple(sorted(values, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


# --------------------------------------------------------------------------- specs


def validate_snapshot_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > _SNAPSHOT_KEY_MAX:
        raise ValueError(f"must be a string of 1-{_SNAPSHOT_KEY_MAX} characters")
    if not key.isprintable() or any(ch.isspace() for ch in key):
        raise ValueError("must not contain spaces or control characters")
    return key


def snapshot_repository(key: str) -> str:
    """``roost-snapshot/<slug>``: the key lowercased, with runs of characters Docker
    does not allow replaced by '-'; when that changed the key, a hash of the key
    is appended so that distinct keys stay distinct."""
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")
    if slug != key:
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        slug = f"{slug}-{digest}" if slug else digest
    return SNAPSHOT_REPOSITORY_PREFIX + slug


def validate_extra_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """User labels for a job's container: no key in Roost's ``roost.`` namespace."""
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not key or not key.strip():
            raise ValueError("label keys must not be empty")
        if key.startswith("roost."):
            raise ValueError(f"label {key!r}: the 'roost.' prefix is reserved for Roost")
        checked[key] = value
    return checked


def validate_env_names(env: Mapping[str, str]) -> dict[str, str]:
    # Never echo values: they may be secrets.
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid variable name {name!r}")
    return dict(env)


def job_config_hash(
    *,
    image: str,
    command: Sequence[str] | None,
    env_names: Iterable[str],
    memory: int | None,
    cpus: float | None,
    network: str | None,
    timeout: float,
    snapshot_key: str | None,
) -> str:
    """sha256 of what shapes a job's container. Env *values* are left out on purpose:
    the hash is a label, readable by anyone who can list containers."""
    canonical = json.dumps(
        {
            "image": image,
            "command": list(command) if command is not None else None,
            "env": sorted(env_names),
            "memory": memory,
            "cpus": cpus,
            "network": network,
            "timeout": timeout,
            "snapshot_key": snapshot_key,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_labels(
    *,
    instance: str,
    job_id: str,
    project: str,
    from_snapshot: bool,
    config_hash: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A job container's labels: the user's, then Roost's (which always win)."""
    return {
        **dict(extra or {}),
        **ownership(instance),
        JOB: job_id,
        PROJECT: project,
        SNAPSHOT: "true" if from_snapshot else "false",
        CONFIG_HASH: config_hash,
    }


# --------------------------------------------------------------------------- snapshots


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A committed image for a snapshot key. The newest record of a key is the
    one jobs start from; older ones are superseded and evicted."""

    key: str
    #: ``repository:tag`` of the image.
    image: str
    job_id: str
    size: int
    created_at: float
    last_used_at: float
    #: commits in its chain: 1 for a commit of a job that started from the base
    #: image, n + 1 for one that started from a generation-n snapshot.
    generation: int = 1


def reusable_snapshot(snapshot: SnapshotRecord) -> bool:
    """Start the next job from ``snapshot``? Not once its chain is too deep."""
    return snapshot.generation < MAX_SNAPSHOT_GENERATIONS


@dataclasses.dataclass(frozen=True, slots=True)
class EvictionPolicy:
    """0 disables a limit."""

    ttl: float
    max_count: int
    max_bytes: int


def plan_eviction(
    snapshots: Sequence[SnapshotRecord], *, now: float, policy: EvictionPolicy
) -> tuple[SnapshotRecord, ...]:
    """Snapshots to remove, in this order: superseded ones (a newer snapshot of the
    same key exists); then those older than ``ttl``; then, least recently used
    first, as many as needed to keep at most ``max_count`` snapshots and at most
    ``max_bytes`` in total. ``snapshots`` is in recording order, which breaks
    ties between equal ``created_at`` (the later one is newer)."""
    newest: dict[str, SnapshotRecord] = {}
    for snap in snapshots:
        best = newest.get(snap.key)
        if best is None or snap.created_at >= best.created_at:
            newest[snap.key] = snap
    current = set(newest.values())
    evict = [s for s in snapshots if s not in current]
    keep: list[SnapshotRecord] = []
    for snap in sorted(current, key=lambda s: (s.last_used_at, s.created_at, s.image)):
        if policy.ttl > 0 and now - snap.created_at > policy.ttl:
            evict.append(snap)
        else:
            keep.append(snap)
    # ``keep`` is least recently used first.
    if policy.max_count > 0:
        while len(keep) > policy.max_count:
            evict.append(keep.pop(0))
    if policy.max_bytes > 0:
        total = sum(s.size for s in keep)
        while keep and total > policy.max_bytes:
            dropped = keep.pop(0)
            total -= dropped.size
            evict.append(dropped)
    return tuple(evict)


# --------------------------------------------------------------------------- orphans


@dataclasses.dataclass(frozen=True, slots=True)
class JobContainer:
    """A container labelled as one of this instance's job containers."""

    container_id: str
    job_id: str
    created_at: float


def plan_orphans(
    containers: Sequence[JobContainer],
    *,
    timeouts: Mapping[str, float],
    live_jobs: Collection[str],
    now: float,
) -> tuple[str, ...]:
    """Container ids to remove. ``timeouts`` has every job that has a record (its
    timeout); ``live_jobs`` the jobs the runner is handling right now.

    A container is kept while its job is live. Otherwise it is removed when its job
    has no record, or when it is older than the job's timeout (until then the job's
    own worker may still be cleaning it up)."""
    orphans: list[str] = []
    for container in containers:
        if container.job_id in live_jobs:
            continue
        timeout = timeouts.get(container.job_id)
        if timeout is None or now - container.created_at > timeout:
            orphans.append(container.container_id)
    return tuple(orphans)
