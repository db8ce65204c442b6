"""One owner per instance: a marker in Docker says which Roost uses an instance id.

Role: two Roosts started with the same ``docker.instance`` on one engine would
each take the other's containers for orphans and remove them. At start, Roost
claims the instance with a marker both can see in Docker — a volume named
``roost-owner-<instance>`` whose labels say who owns it (host, boot id, pid and
its start time, state directory) — and removes it at a clean stop.

Invariants:
- A marker left by an owner that is gone (same host and boot, and no process
  with that pid and start time; or this very process) is taken over.
- A live owner — or one on another host, which cannot be checked from here — makes
  the start fail with ``AlreadyRunning`` naming it and saying how to resolve it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from roost import errors
from roost.core import labels
from roost.ports.runtime import ContainerRuntime

__all__ = ["OWNER", "claim_instance", "marker_name", "release_instance"]

#: The marker's label holding ``host/boot-id/pid/start-time`` of its owner.
OWNER = "roost.owner"
OWNER_STATE_DIR = "roost.owner-state-dir"


def marker_name(instance: str) -> str:
    return f"roost-owner-{instance}"


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return "unknown-boot"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of its stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_start_time(pid) or '?'}"


def _alive(owner: str) -> bool | None:
    """True/False for an owner on this host and boot; None when it cannot be told."""
    try:
        host, boot, pid_text, started = owner.split("/", 3)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname() or boot != _boot_id():
        return None
    if pid == os.getpid():
        return False  # an engine of this process that was never stopped
    return _start_time(pid) == started


async def claim_instance(runtime: ContainerRuntime, instance: str, state_dir: Path) -> None:
    """Claim ``instance`` on the engine, or raise AlreadyRunning naming its owner."""
    name = marker_name(instance)
    mine = this_owner()
    found = await runtime.volume_labels(name)
    if found is not None and found.get(OWNER) != mine:
        owner = found.get(OWNER, "?")
        where = found.get(OWNER_STATE_DIR, "?")
        alive = _alive(owner)
        if alive is not False:
            how = "is running" if alive else "may be running (on another host or boot)"
            raise errors.AlreadyRunning(
                f"another Roost {how} with instance {instance!r} on this Docker engine "
                f"(owner {owner}, state dir {where}); two Roosts sharing an instance would "
                "remove each other's containers. Stop it, give this one another "
                f"docker.instance, or if it is gone remove the marker: docker volume rm {name}"
            )
        await runtime.remove_volume(name, labels={OWNER: owner})
    await runtime.ensure_volume(
        name,
        labels={**labels.ownership(instance), OWNER: mine, OWNER_STATE_DIR: str(state_dir)},
    )


async def release_instance(runtime: ContainerRuntime, instance: str) -> None:
    """Remove this process's marker (clean stop). Never fails the stop."""
    with contextlib.suppress(errors.RoostError):
        await runtime.remove_volume(marker_name(instance), labels={OWNER: this_owner()})
