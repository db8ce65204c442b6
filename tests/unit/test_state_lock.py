"""StateDirLock: one Roost per state directory; a killed holder leaves no stale lock.

Other processes are real subprocesses; we wait for them on their stdout with a
deadline (``select``), never by sleeping.
"""

from __future__ import annotations

import os
import pathlib
import select
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from roost.adapters.state_lock import (
    INSTANCE_FILE_NAME,
    LOCK_FILE_NAME,
    StateDirLock,
    instance_id,
)
from roost.config import parse_settings
from roost.engine import Engine
from roost.errors import AlreadyRunning, StoreError
from roost.reactor import owning
from roost.testing.fake_runtime import FakeRuntime

DEADLINE = 30.0

HOLDER = textwrap.dedent(
    """
    import sys
    from roost.adapters.state_lock import StateDirLock

    lock = StateDirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until stdin closes or we are killed
    lock.release()
    print("released", flush=True)
    """
)


def read_line_within(process: subprocess.Popen[str], deadline: float) -> str:
    """The subprocess's next stdout line, or fail if none comes within ``deadline``."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], deadline)
    assert ready, f"subprocess printed nothing within {deadline}s"
    return process.stdout.readline()


@pytest.fixture
def holder(tmp_path: pathlib.Path) -> Iterator[subprocess.Popen[str]]:
    """A subprocess that holds the lock on ``tmp_path / "state"``."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line_within(process, DEADLINE) == "locked\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(DEADLINE)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def test_acquire_creates_private_directory_and_writes_pid_when_missing(
    tmp_path: pathlib.Path,
) -> None:
    state_dir = tmp_path / "nested" / "state"

    with StateDirLock(state_dir) as lock:
        assert lock.held
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert (state_dir / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"

    assert not lock.held
    assert (state_dir / LOCK_FILE_NAME).exists()  # never unlinked: see module docstring
    assert (state_dir / LOCK_FILE_NAME).read_text() == ""


def test_acquire_raises_already_running_naming_pid_and_dir_when_another_process_holds_it(
    tmp_path: pathlib.Path, holder: subprocess.Popen[str]
) -> None:
    state_dir = tmp_path / "state"

    with pytest.raises(AlreadyRunning) as raised:
        StateDirLock(state_dir).acquire()

    message = str(raised.value)
    assert f"pid {holder.pid}" in message
    assert str(state_dir) in message
    assert "stop it or use another state_dir" in message
    assert isinstance(raised.value, StoreError)


def test_acquire_succeeds_when_previous_holder_was_sigkilled(
    tmp_path: pathlib.Path, holder: subprocess.Popen[str]
) -> None:
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(DEADLINE) == -signal.SIGKILL
    state_dir = tmp_path / "state"
    assert (state_dir / LOCK_FILE_NAME).read_text() == f"{holder.pid}\n"  # stale PID left

    with StateDirLock(state_dir) as lock:
        assert lock.held
        assert (state_dir / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"


def test_acquire_succeeds_when_previous_holder_released_cleanly(
    tmp_path: pathlib.Path, holder: subprocess.Popen[str]
) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    assert read_line_within(holder, DEADLINE) == "released\n"
    assert holder.wait(DEADLINE) == 0

    with StateDirLock(tmp_path / "state") as lock:
        assert lock.held


def test_second_lock_in_same_process_is_refused_when_first_is_held(
    tmp_path: pathlib.Path,
) -> None:
    with StateDirLock(tmp_path) as first:
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            StateDirLock(tmp_path).acquire()
        assert first.held
    # ...and free again once the first lets go.
    with StateDirLock(tmp_path) as second:
        assert second.held


def test_acquire_and_release_are_idempotent_when_called_twice(tmp_path: pathlib.Path) -> None:
    lock = StateDirLock(tmp_path)
    lock.acquire()
    lock.acquire()
    assert lock.held
    lock.release()
    lock.release()
    assert not lock.held


def test_lock_file_is_not_inherited_when_roost_executes_a_program(
    tmp_path: pathlib.Path,
) -> None:
    with StateDirLock(tmp_path) as lock:
        assert lock.held
        child = subprocess.run(
            ["/bin/sh", "-c", "ls -l /proc/self/fd"],
            capture_output=True,
            text=True,
            check=True,
            close_fds=False,  # even when the parent passes its descriptors on
            timeout=DEADLINE,
        )
    assert LOCK_FILE_NAME not in child.stdout


def test_acquire_raises_store_error_when_directory_cannot_be_created(
    tmp_path: pathlib.Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(StoreError, match="cannot create the lock file") as raised:
        StateDirLock(blocker / "state").acquire()

    assert not isinstance(raised.value, AlreadyRunning)


def test_instance_id_is_kept_in_the_state_dir_when_first_used(tmp_path: pathlib.Path) -> None:
    first = instance_id(tmp_path / "a")
    assert first == instance_id(tmp_path / "a")  # stable across starts
    assert first != instance_id(tmp_path / "b")  # another directory, another owner
    path = tmp_path / "a" / INSTANCE_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first


def test_instance_id_refuses_naming_the_file_when_it_holds_garbage(tmp_path: pathlib.Path) -> None:
    (tmp_path / INSTANCE_FILE_NAME).write_text("Not An Id!\n")
    with pytest.raises(StoreError, match=INSTANCE_FILE_NAME):
        instance_id(tmp_path)


async def test_engine_labels_containers_with_the_state_dirs_id_when_instance_unset(
    tmp_path: pathlib.Path,
) -> None:
    settings = parse_settings({"server": {"state_dir": str(tmp_path / "state")}})
    engine = Engine(settings, runtime=FakeRuntime(), lock=False)
    assert engine.instance == instance_id(tmp_path / "state")
    other = parse_settings({"server": {"state_dir": str(tmp_path / "other")}})
    assert Engine(other, runtime=FakeRuntime(), lock=False).instance != engine.instance


async def test_a_second_live_roost_with_the_same_instance_is_refused_naming_it(
    tmp_path: pathlib.Path,
) -> None:
    runtime = FakeRuntime()
    one = parse_settings(
        {"server": {"state_dir": str(tmp_path / "a")}, "docker": {"instance": "shared"}}
    )
    two = parse_settings(
        {"server": {"state_dir": str(tmp_path / "b")}, "docker": {"instance": "shared"}}
    )
    first = Engine(one, runtime=runtime)
    await first.start()
    try:
        # A live owner elsewhere on this host (pid 1 stands in for it).
        labels = runtime.volumes[owning.marker_name("shared")]
        mine = labels[owning.OWNER]
        host, boot, _, _ = mine.split("/", 3)
        start_of_pid_1 = owning._start_time(1)
        labels[owning.OWNER] = f"{host}/{boot}/1/{start_of_pid_1}"
        second = Engine(two, runtime=runtime)
        with pytest.raises(AlreadyRunning) as refused:
            await second.start()
        assert "instance 'shared'" in str(refused.value)
        assert str(tmp_path / "a") in str(refused.value)
        assert "docker volume rm roost-owner-shared" in str(refused.value)
        labels[owning.OWNER] = mine
    finally:
        await first.stop()
    assert owning.marker_name("shared") not in runtime.volumes  # released at stop


async def test_a_marker_left_by_a_gone_roost_is_taken_over_when_starting(
    tmp_path: pathlib.Path,
) -> None:
    runtime = FakeRuntime()
    host, boot, _, _ = owning.this_owner().split("/", 3)
    runtime.volumes[owning.marker_name("solo")] = {
        owning.OWNER: f"{host}/{boot}/999999999/1",  # no such process
    }
    settings = parse_settings(
        {"server": {"state_dir": str(tmp_path / "s")}, "docker": {"instance": "solo"}}
    )
    engine = Engine(settings, runtime=runtime)
    await engine.start()
    try:
        owner = runtime.volumes[owning.marker_name("solo")][owning.OWNER]
        assert owner == owning.this_owner()
    finally:
        await engine.stop()
