"""The state directory: ``StateDirLock`` (one Roost per directory, by ``flock``) and
the instance id it keeps (``instance_id``).

Role: taken once at startup, before the database is opened, so two Roost
processes never write the same SQLite file and fight over the same containers.

Invariants:
- The lock is an exclusive ``flock`` on ``<state_dir>/roost.lock``. The kernel
  drops it when the holding file descriptor closes, including when the process
  dies by SIGKILL, so a crashed Roost never leaves a stale lock behind; the PID
  written into the file is information for the error message only, never the
  lock itself.
- The lock file is never deleted: unlinking a flock'd file lets a late opener
  lock an orphaned inode while a newcomer locks a fresh one, and both "hold" it.
- The descriptor is ``O_CLOEXEC``: programs Roost executes do not inherit it.
  (A bare ``fork()`` without exec would share it and keep it alive.)
- ``flock`` is per open file description: a second ``StateDirLock`` on the same
  directory in the same process is refused like another process would be.
- The directory is created with mode 0o700 when missing; an existing
  directory's mode is left alone.
- ``instance_id`` is written once, at the directory's first use, with ``O_EXCL``
  (two racing openers read back the same id) and mode 0600; it never changes, so
  containers labelled with it are this directory's wherever Roost runs from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import re
import secrets
from types import TracebackType

from roost.errors import AlreadyRunning, StoreError

__all__ = ["INSTANCE_FILE_NAME", "LOCK_FILE_NAME", "StateDirLock", "instance_id"]

LOCK_FILE_NAME = "roost.lock"
INSTANCE_FILE_NAME = "instance"
_INSTANCE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


def instance_id(state_dir: str | os.PathLike[str]) -> str:
    """The instance id kept in ``state_dir`` (created on first use): the default
    ``roost.instance`` label, so two Roosts with different state directories never
    touch each other's containers. StoreError when it cannot be read or written."""
    directory = pathlib.Path(state_dir)
    path = directory / INSTANCE_FILE_NAME
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(f"r{secrets.token_hex(5)}\n")
        found = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise StoreError(f"cannot read or create the instance id {path}: {exc}") from exc
    if not _INSTANCE.match(found):
        raise StoreError(
            f"{path} holds {found!r}, which is not an instance id; remove the file "
            "(a new id is made) or set docker.instance"
        )
    return found


class StateDirLock:
    """Exclusive ownership of a state directory for the life of this process.

    Use as ``with StateDirLock(state_dir): ...`` or call ``acquire()`` /
    ``release()``. Blocking syscalls only, meant to run once at startup before
    the event loop serves anything.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.path = self.state_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise ``AlreadyRunning`` (never waits)."""
        if self._fd is not None:
            return
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder is not None else "pid unknown"
                raise AlreadyRunning(
                    f"another Roost ({who}) is already using state directory "
                    f"{self.state_dir}; stop it or use another state_dir"
                ) from exc
            raise StoreError(f"cannot lock {self.path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot write the lock file {self.path}: {exc}") from exc
        self._fd = fd

    def release(self) -> None:
        """Give the lock up. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Still holding the lock here, so clearing the PID races with nobody.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote, or None if it has not written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
