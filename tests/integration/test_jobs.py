"""One-shot jobs against the real Docker Engine: timeouts with the kill sequence,
OOM, exit capture before removal, the worker cap, snapshots (reuse, the 404
fallback, no secret in the image), orphans, re-attach, image pulls, the HTTP API."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import errors
from roost.adapters.docker_runtime import DockerRuntime
from roost.core import labels
from roost.core.jobs import JobStatus, snapshot_repository
from roost.edge import create_app
from roost.engine import Engine
from roost.ports.jobs import Job
from roost.ports.runtime import RuntimeEvent
from tests.conftest import container_exists, docker_inspect, make_settings, wait_until

pytestmark = pytest.mark.docker

J = JobStatus


def jobs_settings(tmp_path: Path, instance: str, **jobs: Any) -> Any:
    return make_settings(
        tmp_path,
        instance,
        jobs={"kill_grace": 1, "orphan_scan_interval": 3600, **jobs},
    )


async def final(engine: Engine, job_id: str, timeout: float = 60) -> Job:
    async def ended() -> bool:
        return (await engine.jobs.get(job_id)).status not in (J.QUEUED, J.RUNNING)

    await wait_until(ended, timeout=timeout, what=f"job {job_id} to end")
    return await engine.jobs.get(job_id)


async def started(engine: Engine, job_id: str) -> Job:
    async def running() -> bool:
        return (await engine.jobs.get(job_id)).started_at is not None

    await wait_until(running, timeout=30, what=f"job {job_id} to start")
    return await engine.jobs.get(job_id)


async def removed(container_id: str) -> None:
    """The final state is recorded before the container is removed: wait for it."""
    await wait_until(lambda: not container_exists(container_id), what="container removed")


class EventLog:
    """Container events of one instance, collected in the background."""

    def __init__(self, runtime: Any, instance: str) -> None:
        self.events: list[RuntimeEvent] = []
        self._stream = runtime.events(labels.ownership(instance))
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self._stream:
            self.events.append(event)

    def of(self, container_id: str) -> list[str]:
        return [e.kind for e in self.events if e.container_id == container_id]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._stream.aclose()


@pytest.fixture
def snapshot_keys(instance: str) -> Iterator[list[str]]:
    """Snapshot keys unique to this test; their images are removed afterwards."""
    keys: list[str] = []
    yield keys
    for key in keys:
        repository = snapshot_repository(key)
        ids = subprocess.run(
            ["docker", "images", "-q", "--filter", f"reference={repository}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        refs = subprocess.run(
            ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", repository],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if refs or ids:
            subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, check=False)


def image_inspect(image: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out)[0]
    return result


def image_present(image: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    )


# --------------------------------------------------------------------------- timeouts


async def test_job_times_out_with_term_grace_then_kill_when_it_ignores_term(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    kill_grace, timeout = 1.0, 1.0
    async with Engine(jobs_settings(tmp_path, instance, kill_grace=kill_grace)) as engine:
        events = EventLog(engine.runtime, instance)
        try:
            job = await engine.jobs.submit(
                image=docker_images["busybox"],
                command=["sh", "-c", 'trap "" TERM; echo ready; sleep 100'],
                timeout=timeout,
                memory=48 * 1024 * 1024,
                env={"API_TOKEN": "supersecret"},
                project="proj-a",
            )
            running = await started(engine, job.id)
            assert running.container_id is not None
            info = docker_inspect(running.container_id)
            host = info["HostConfig"]
            assert host["Memory"] == 48 * 1024 * 1024
            assert host["MemorySwap"] == host["Memory"]  # no swap
            container_labels = info["Config"]["Labels"]
            assert container_labels[labels.MANAGED] == "true"
            assert container_labels[labels.INSTANCE] == instance
            assert container_labels[labels.JOB] == job.id
            assert container_labels[labels.PROJECT] == "proj-a"
            assert container_labels[labels.SNAPSHOT] == "false"
            assert container_labels[labels.CONFIG_HASH]
            assert "supersecret" not in json.dumps(container_labels)
            assert "supersecret" not in json.dumps(info["Config"]["Cmd"])

            done = await final(engine, job.id)
            assert done.status is J.TIMED_OUT
            assert done.exit_code == 137  # SIGKILL: TERM was ignored
            assert done.oom_killed is False
            assert done.duration is not None
            assert done.duration >= timeout + kill_grace * 0.95
            assert "ready" in done.log_tail
            cid = running.container_id
            await wait_until(lambda: "die" in events.of(cid), what="die event")
            kinds = [k for k in events.of(cid) if k in ("kill", "die")]
            assert kinds[:3] == ["kill", "kill", "die"]  # SIGTERM, then SIGKILL, then exit
            await removed(cid)
        finally:
            await events.close()


async def test_job_fails_with_oom_recorded_when_it_exceeds_memory(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        job = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=["sh", "-c", "tail /dev/zero"],
            memory=32 * 1024 * 1024,
            timeout=60,
        )
        done = await final(engine, job.id)
        assert done.status is J.FAILED, done
        assert done.oom_killed is True, done
        assert done.exit_code == 137
        assert "out-of-memory" in (done.error or "")


async def test_exit_code_and_log_tail_are_captured_before_removal_when_job_fails(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        job = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=[
                "sh",
                "-c",
                "for i in $(seq 1 60); do echo line-$i; done; echo oops; exit 3",
            ],
            timeout=60,
        )
        done = await final(engine, job.id)
        assert done.status is J.FAILED
        assert done.exit_code == 3
        assert done.error == "exited with code 3"
        tail = done.log_tail.splitlines()
        assert len(tail) == 50
        assert tail[-2:] == ["line-60", "oops"]
        assert "line-10" not in tail
        assert done.container_id is not None
        await removed(done.container_id)
        assert done.duration is not None


# --------------------------------------------------------------------------- cap


class CountingRuntime(DockerRuntime):
    """The real Docker adapter, counting containers between a successful ``start``
    and the return of their ``wait`` (running, as far as Roost can know)."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[str] = set()
        self.started: list[str] = []
        self.peak = 0

    async def start(self, container_id: str) -> None:
        await super().start(container_id)
        self.running.add(container_id)
        self.started.append(container_id)
        self.peak = max(self.peak, len(self.running))

    async def wait(self, container_id: str) -> int:
        try:
            return await super().wait(container_id)
        finally:
            self.running.discard(container_id)


async def test_at_most_max_workers_run_when_twenty_jobs_are_queued(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    max_workers = 3
    runtime = CountingRuntime()
    settings = jobs_settings(tmp_path, instance, max_workers=max_workers)
    async with Engine(settings, runtime=runtime) as engine:
        jobs = [
            await engine.jobs.submit(
                image=docker_images["busybox"], command=["sleep", "1"], timeout=60
            )
            for _ in range(20)
        ]
        finished = [await final(engine, job.id, timeout=120) for job in jobs]
    assert [job.status for job in finished] == [J.SUCCEEDED] * 20
    # (FIFO claim order is checked in tests/unit/test_job_runner.py: here the
    # workers' creates and starts race each other.)
    assert sorted(runtime.started) == sorted(str(job.container_id) for job in finished)
    assert runtime.peak == max_workers


# --------------------------------------------------------------------------- snapshots


async def test_second_job_reads_first_jobs_file_when_started_from_its_snapshot(
    tmp_path: Path, instance: str, docker_images: dict[str, str], snapshot_keys: list[str]
) -> None:
    key = f"{instance}-Repo"
    snapshot_keys.append(key)
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        first = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=["sh", "-c", "echo from-job-1 > /state.txt"],
            env={"API_TOKEN": "supersecret", "MODE": "plain"},
            snapshot_key=key,
            timeout=60,
        )
        done = await final(engine, first.id)
        assert done.status is J.SUCCEEDED
        snapshot = await engine.jobs.store.current_snapshot(key)
        assert snapshot is not None
        assert snapshot.image == f"{snapshot_repository(key)}:{first.id}"
        image = image_inspect(snapshot.image)
        env = image["Config"]["Env"]
        assert "MODE=plain" in env
        assert not any("supersecret" in entry for entry in env)
        assert image["Config"]["Labels"][labels.MANAGED] == "false"
        assert snapshot.size == image["Size"]

        second = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=["cat", "/state.txt"],
            snapshot_key=key,
            timeout=60,
        )
        reused = await final(engine, second.id)
        assert reused.status is J.SUCCEEDED, reused.error
        assert reused.snapshot_used is True
        assert reused.log_tail == "from-job-1\n"
        # the second success supersedes the first snapshot, which is evicted once
        # the second job's container (created from it) is removed
        newest = await engine.jobs.store.current_snapshot(key)
        assert newest is not None
        assert newest.image.endswith(f":{second.id}")
        await wait_until(lambda: not image_present(snapshot.image), what="superseded evicted")
        assert image_present(newest.image)


async def test_job_runs_from_base_and_record_is_dropped_when_snapshot_image_was_removed(
    tmp_path: Path, instance: str, docker_images: dict[str, str], snapshot_keys: list[str]
) -> None:
    key = f"{instance}-fallback"
    snapshot_keys.append(key)
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        first = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=["sh", "-c", "echo x > /state.txt"],
            snapshot_key=key,
            timeout=60,
        )
        assert (await final(engine, first.id)).status is J.SUCCEEDED
        snapshot = await engine.jobs.store.current_snapshot(key)
        assert snapshot is not None
        await asyncio.to_thread(
            subprocess.run, ["docker", "rmi", snapshot.image], capture_output=True, check=True
        )

        second = await engine.jobs.submit(
            image=docker_images["busybox"],
            command=["sh", "-c", "test ! -e /state.txt && echo fresh"],
            snapshot_key=key,
            timeout=60,
        )
        done = await final(engine, second.id)
        assert done.status is J.SUCCEEDED, done.error
        assert done.snapshot_used is False
        assert done.log_tail == "fresh\n"
        newest = await engine.jobs.store.current_snapshot(key)
        assert newest is not None
        assert newest.image.endswith(f":{second.id}")  # only the new one is recorded
        assert [s.image for s in await engine.jobs.store.list_snapshots()] == [newest.image]


# --------------------------------------------------------------------------- orphans


async def test_orphan_scan_removes_only_this_instances_job_containers_when_unowned(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    other = f"{instance}-other"

    def create(owner: str) -> str:
        return subprocess.run(
            [
                "docker",
                "create",
                "--label",
                f"{labels.MANAGED}=true",
                "--label",
                f"{labels.INSTANCE}={owner}",
                "--label",
                f"{labels.JOB}=job-nobody",
                docker_images["busybox"],
                "true",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    ours, theirs = create(instance), create(other)
    try:
        async with Engine(jobs_settings(tmp_path, instance)) as engine:
            removed = await engine.jobs.scan_orphans()
            assert removed == [ours]
            assert not container_exists(ours)
            assert container_exists(theirs)
    finally:
        await asyncio.to_thread(
            subprocess.run, ["docker", "rm", "-f", theirs], capture_output=True, check=False
        )


# --------------------------------------------------------------------------- re-attach


async def test_job_left_running_is_reattached_and_timed_out_when_roost_restarts(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = jobs_settings(tmp_path, instance)
    engine = Engine(settings)
    await engine.start()
    try:
        job = await engine.jobs.submit(
            image=docker_images["busybox"], command=["sleep", "100"], timeout=3
        )
        running = await started(engine, job.id)
    finally:
        await engine.stop(leave_running=True)
    assert running.container_id is not None
    assert docker_inspect(running.container_id)["State"]["Running"] is True

    async with Engine(settings) as again:
        done = await final(again, job.id)
        assert done.status is J.TIMED_OUT
        assert done.container_id == running.container_id
        assert done.started_at == running.started_at  # the timeout ran from the first start
        await removed(running.container_id)


async def test_running_job_is_cancelled_when_roost_stops_without_leave_running(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        job = await engine.jobs.submit(
            image=docker_images["busybox"], command=["sleep", "100"], timeout=60
        )
        running = await started(engine, job.id)
    assert running.container_id is not None
    assert not container_exists(running.container_id)
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        done = await engine.jobs.get(job.id)
        assert done.status is J.CANCELLED
        assert "shut down" in (done.error or "")


# --------------------------------------------------------------------------- images


async def test_concurrent_pulls_of_one_absent_image_are_merged_and_fail_terminally(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = DockerRuntime()
    image = f"roost-nowhere-{instance}:1"
    pulls = 0
    checked = 0
    release = asyncio.Event()
    real_pull, real_exists = runtime._pull, runtime.image_exists

    async def counting_pull(name: str, pull_timeout: float) -> None:
        nonlocal pulls
        pulls += 1
        await release.wait()
        await real_pull(name, pull_timeout)

    async def counting_exists(name: str) -> bool:
        nonlocal checked
        result = await real_exists(name)
        checked += 1
        return result

    monkeypatch.setattr(runtime, "_pull", counting_pull)
    monkeypatch.setattr(runtime, "image_exists", counting_exists)
    try:
        callers = [
            asyncio.create_task(runtime.ensure_image(image, pull_timeout=30)) for _ in range(5)
        ]
        # Once a caller saw the image absent it joins (or starts) the pull without
        # yielding, so after five checks every caller waits on the pull.
        await wait_until(lambda: checked == 5, what="five image checks")
        release.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
    finally:
        await runtime.close()
    assert pulls == 1
    assert all(isinstance(r, errors.ImageUnavailable) for r in results)
    assert image in str(results[0])


async def test_job_fails_terminally_naming_image_when_it_cannot_be_pulled(
    tmp_path: Path, instance: str
) -> None:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        job = await engine.jobs.submit(image=f"roost-nowhere-{instance}:1", timeout=60)
        done = await final(engine, job.id)
        assert done.status is J.FAILED
        assert f"roost-nowhere-{instance}:1" in (done.error or "")
        assert "could not be pulled" in (done.error or "")
        assert done.container_id is None


async def test_job_fails_at_once_when_docker_refuses_its_spec(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        creates = 0
        real_create = engine.runtime.create

        async def counting_create(spec: Any) -> str:
            nonlocal creates
            creates += 1
            return await real_create(spec)

        engine.runtime.create = counting_create  # type: ignore[method-assign]
        job = await engine.jobs.submit(
            image=docker_images["busybox"], command=["true"], cpus=64.0, timeout=60
        )
        done = await final(engine, job.id)
        assert done.status is J.FAILED
        assert "CPU" in (done.error or "")  # Docker's own words: its 400 is terminal
        assert creates == 1  # not retried: a 4xx cannot succeed the next time


# --------------------------------------------------------------------------- HTTP API


@pytest.fixture
async def api(tmp_path: Path, instance: str) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with Engine(jobs_settings(tmp_path, instance)) as engine:
        app = create_app(engine, token=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
            yield engine, client


async def test_api_runs_lists_shows_logs_and_cancels_jobs_when_asked(
    api: tuple[Engine, httpx.AsyncClient], docker_images: dict[str, str]
) -> None:
    engine, client = api
    response = await client.post(
        "/api/jobs",
        json={
            "image": docker_images["busybox"],
            "command": ["sh", "-c", "echo started; sleep 100"],
            "env": {"API_TOKEN": "supersecret"},
            "timeout": 60,
            "memory": "64m",
            "cpus": 0.5,
            "labels": {"team": "qa"},
            "project": "api-test",
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    for key in (
        "id",
        "status",
        "image",
        "command",
        "project",
        "snapshot_key",
        "snapshot_used",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "exit_code",
        "oom_killed",
        "error",
        "log_tail",
        "container_id",
    ):
        assert key in job
    assert job["status"] == "queued"
    assert job["memory"] == 64 * 1024 * 1024
    assert "supersecret" not in response.text

    await started(engine, job["id"])

    async def logs_show_start() -> bool:
        logs = await client.get(f"/api/jobs/{job['id']}/logs")
        return logs.status_code == 200 and "started" in logs.text

    await wait_until(logs_show_start, what="live logs")

    listed = await client.get("/api/jobs", params={"status": "running", "project": "api-test"})
    assert [j["id"] for j in listed.json()["jobs"]] == [job["id"]]
    assert (await client.get("/api/jobs", params={"project": "elsewhere"})).json()["jobs"] == []

    shown = (await client.get(f"/api/jobs/{job['id']}")).json()
    assert shown["status"] == "running"
    assert docker_inspect(shown["container_id"])["Config"]["Labels"]["team"] == "qa"

    cancelled = await client.post(f"/api/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    again = await client.post(f"/api/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert "already ended" in again.json()["error"]
    stored_logs = await client.get(f"/api/jobs/{job['id']}/logs")
    assert "started" in stored_logs.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"image": ""}, "body.image"),
        ({"image": "x", "memory": "1k"}, "body.memory"),
        ({"image": "x", "memory": "lots"}, "body.memory"),
        ({"image": "x", "timeout": 0}, "body.timeout"),
        ({"image": "x", "cpus": -1}, "body.cpus"),
        ({"image": "x", "labels": {"roost.job": "mine"}}, "body.labels"),
        ({"image": "x", "command": "echo hi"}, "body.command"),
        ({"image": "x", "snapshot_key": "has space"}, "body.snapshot_key"),
        ({"image": "x", "bogus": 1}, "body.bogus"),
        ({"command": ["true"]}, "body.image"),
    ],
)
async def test_api_rejects_job_naming_field_when_body_is_invalid(
    api: tuple[Engine, httpx.AsyncClient], body: dict[str, Any], field: str
) -> None:
    _, client = api
    response = await client.post("/api/jobs", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]
    assert (await client.get("/api/jobs")).json()["jobs"] == []


async def test_api_answers_404_when_job_is_unknown(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    _, client = api
    for response in (
        await client.get("/api/jobs/job-nope"),
        await client.post("/api/jobs/job-nope/cancel"),
        await client.get("/api/jobs/job-nope/logs"),
    ):
        assert response.status_code == 404
        assert "job-nope" in response.json()["error"]
