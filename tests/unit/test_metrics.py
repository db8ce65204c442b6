"""``GET /metrics``: what the metrics observe, on an engine on fakes.

Counts come from the engine's own listeners (state changes, the event hub) and the
proxy's hook; durations from the state changes' timestamps on ``FakeClock``, so
"the restart took the 8 s backoff" is exact.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from roost import errors
from roost.adapters import docker_runtime
from roost.api.metrics import CATALOGUE, Metrics
from roost.core.jobs import JobStatus
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.jobs import Job
from roost.testing import EngineHarness
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import ROOT, make_settings, site_port, wait_until
from tests.support import ScriptedAgent, open_rig

S = AgentState
IMAGE = "roost-mimic:latest"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a counter never incremented has no series)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(metrics: Metrics) -> Samples:
    return parse((await metrics.exposition()).decode())


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    settings = make_settings(tmp_path, "metrics", agents={"echo": {"image": IMAGE}})
    async with EngineHarness.running(settings) as harness:
        yield harness


async def http_scrape(harness: EngineHarness) -> Samples:
    response = await harness.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


# -- agents ---------------------------------------------------------------------------


async def test_crash_counts_restart_and_reason_exit_when_container_exits_nonzero(
    harness: EngineHarness,
) -> None:
    agent = (await harness.client.post("/api/agents/echo/start")).json()
    harness.runtime.crash(agent["container_id"], exit_code=3)
    await wait_until(
        lambda: (
            harness.engine.agents.get("echo").state is S.RUNNING
            and harness.engine.agents.get("echo").restart_count == 1
        ),
        timeout=10,
        what="echo restarted",
    )
    samples = await http_scrape(harness)
    assert value(samples, "roost_agents", state="running") == 1
    assert value(samples, "roost_agents", state="failed") == 0
    assert value(samples, "roost_agent_state", agent="echo", state="running") == 1
    assert value(samples, "roost_agent_transitions_total", agent="echo", to="crashed") == 1
    assert value(samples, "roost_agent_transitions_total", agent="echo", to="running") == 2
    assert value(samples, "roost_agent_crashes_total", agent="echo", reason="exit") == 1
    assert value(samples, "roost_agent_restarts_total", agent="echo") == 1
    assert value(samples, "roost_agent_start_seconds_count", agent="echo") == 2
    assert value(samples, "roost_agent_wake_seconds_count", agent="echo", **{"from": "created"})
    assert value(samples, "roost_agent_time_to_ready_seconds_count", agent="echo") == 1
    assert not any(name.endswith("_created") for name, _ in samples)


async def test_crash_reason_is_oom_when_the_kernel_killed_the_container(
    harness: EngineHarness,
) -> None:
    agent = (await harness.client.post("/api/agents/echo/start")).json()
    harness.runtime.crash(agent["container_id"], exit_code=137, oom=True)
    await wait_until(
        lambda: harness.engine.agents.get("echo").restart_count == 1, what="echo crashed"
    )
    samples = await http_scrape(harness)
    assert value(samples, "roost_agent_crashes_total", agent="echo", reason="oom") == 1
    assert value(samples, "roost_agent_crashes_total", agent="echo", reason="exit") == 0


async def test_durations_follow_the_clock_when_restart_waits_its_backoff_and_agent_unhealthy(
    tmp_path: Path,
) -> None:
    defaults = {"liveness_interval": 4, "liveness_failures": 1}
    async with open_rig(tmp_path, defaults=defaults) as rig:
        metrics = Metrics(rig.engine)
        first = await rig.start("echo")
        assert first.container_id is not None
        state = await rig.runtime.inspect(first.container_id)
        assert state.host_port is not None
        rig.client.unhealthy_ports.add(state.host_port)
        await rig.clock.advance(4)
        await rig.reaches("echo", S.RESTARTING)
        await rig.clock.advance(8)  # restart_backoff
        await rig.reaches("echo", S.RUNNING)
        samples = await scrape(metrics)
    assert value(samples, "roost_agent_crashes_total", agent="echo", reason="unhealthy") == 1
    assert value(samples, "roost_agent_restarts_total", agent="echo") == 1
    # crashed at t, ready again right after the 8 s backoff
    assert value(samples, "roost_agent_time_to_ready_seconds_count", agent="echo") == 1
    assert value(samples, "roost_agent_time_to_ready_seconds_bucket", agent="echo", le="5.0") == 0
    assert value(samples, "roost_agent_time_to_ready_seconds_bucket", agent="echo", le="10.0") == 1
    assert 8 <= value(samples, "roost_agent_time_to_ready_seconds_sum", agent="echo") < 8.1


async def test_wake_is_labelled_paused_when_a_paused_agent_is_woken(
    harness: EngineHarness,
) -> None:
    await harness.client.post("/api/agents/echo/start")
    assert (await harness.client.post("/api/agents/echo/pause")).status_code == 200
    assert (await harness.client.post("/api/agents/echo/wake")).status_code == 200
    samples = await http_scrape(harness)
    wake = "roost_agent_wake_seconds_count"
    assert value(samples, wake, agent="echo", **{"from": "paused"}) == 1
    assert value(samples, wake, agent="echo", **{"from": "created"}) == 1
    assert value(samples, "roost_agent_start_seconds_count", agent="echo") == 2
    assert value(samples, "roost_agent_time_to_ready_seconds_count", agent="echo") == 0


async def test_agent_series_vanish_when_the_agent_is_deleted(harness: EngineHarness) -> None:
    registered = await harness.client.post("/api/agents", json={"name": "temp", "image": IMAGE})
    assert registered.status_code == 201, registered.text
    await harness.client.post("/api/agents/temp/start")
    assert value(await http_scrape(harness), "roost_agent_start_seconds_count", agent="temp") == 1
    assert (await harness.client.delete("/api/agents/temp")).status_code == 204
    samples = await http_scrape(harness)
    assert not [key for key in samples if ("agent", "temp") in key[1]]
    assert value(samples, "roost_agent_state", agent="echo", state="created") == 1


# -- messages -------------------------------------------------------------------------


async def test_messages_count_by_outcome_with_retries_and_queue_depth_when_delivered(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, "metrics", agents={"echo": {"image": IMAGE}})
    runtime = FakeRuntime(images=[IMAGE])
    agent = ScriptedAgent(runtime)
    async with EngineHarness.running(settings, runtime=runtime, agent_client=agent) as harness:
        engine = harness.engine
        bodies: list[dict[str, Any]] = [{"n": 1}, {"status": 400}, {"fail_first": 1}]
        for body in bodies:
            response = await harness.client.post(
                "/api/agents/echo/messages", json=body, params={"wait": "true"}
            )
            assert response.status_code == 200, response.text
        samples = await http_scrape(harness)
        assert value(samples, "roost_messages_accepted_total", agent="echo") == 3
        assert value(samples, "roost_messages_total", agent="echo", outcome="delivered") == 2
        assert value(samples, "roost_messages_total", agent="echo", outcome="failed") == 1
        assert value(samples, "roost_message_retries_total", agent="echo") == 1
        delivered = "roost_message_delivery_seconds_count"
        assert value(samples, delivered, agent="echo", outcome="delivered") == 2
        assert value(samples, "roost_messages_pending", agent="echo") == 0

        agent.down = True  # nothing answers: the next message stays queued
        response = await harness.client.post("/api/agents/echo/messages", json={"n": 4})
        assert response.status_code == 202
        await wait_until(lambda: engine.inbox.pending_count("echo") == 1, what="one pending")
        assert value(await http_scrape(harness), "roost_messages_pending", agent="echo") == 1


# -- proxy, leases, streams -----------------------------------------------------------


async def test_proxied_requests_count_by_status_class_and_unknown_agents_are_not_labelled(
    harness: EngineHarness,
) -> None:
    await harness.client.post("/api/agents/echo/start")
    for _ in range(2):
        await harness.client.get("/agents/echo/health")
    assert (await harness.client.get("/agents/nobody/x")).status_code == 404
    samples = await http_scrape(harness)
    codes = {
        dict(labels)["code"]: count
        for (name, labels), count in samples.items()
        if name == "roost_proxy_requests_total" and ("agent", "echo") in labels
    }
    assert sum(codes.values()) == 2
    assert value(samples, "roost_proxy_request_seconds_count", agent="echo") == 2
    assert value(samples, "roost_proxy_requests_in_flight", agent="echo") == 0
    assert not [key for key in samples if ("agent", "nobody") in key[1]]
    assert value(samples, "roost_proxy_open_streams") == 0


async def test_proxy_histogram_buckets_count_bounds_inclusively_when_requests_end(
    harness: EngineHarness,
) -> None:
    metrics = Metrics(harness.engine)
    for status, seconds in ((200, 0.001), (200, 0.0011), (503, 60.0), (0, 61.0)):
        assert metrics.proxy_started("echo")
        metrics.proxy_finished("echo", status, seconds)
    assert metrics.proxy_started("echo")  # one still in flight
    assert not metrics.proxy_started("nobody")
    samples = await scrape(metrics)

    def bucket(le: str) -> float:
        return value(samples, "roost_proxy_request_seconds_bucket", agent="echo", le=le)

    assert (bucket("0.001"), bucket("0.0025"), bucket("60.0"), bucket("+Inf")) == (1, 2, 3, 4)
    assert value(samples, "roost_proxy_request_seconds_count", agent="echo") == 4
    assert value(samples, "roost_proxy_request_seconds_sum", agent="echo") == pytest.approx(
        121.0021
    )
    assert value(samples, "roost_proxy_requests_total", agent="echo", code="2xx") == 2
    assert value(samples, "roost_proxy_requests_total", agent="echo", code="5xx") == 1
    assert value(samples, "roost_proxy_requests_total", agent="echo", code="none") == 1
    assert value(samples, "roost_proxy_requests_in_flight", agent="echo") == 1


async def test_leases_gauge_counts_held_leases_when_one_is_taken(harness: EngineHarness) -> None:
    taken = await harness.client.post("/api/agents/echo/leases", json={"ttl": 60})
    assert taken.status_code == 201, taken.text
    assert value(await http_scrape(harness), "roost_agent_leases", agent="echo") == 1


# -- jobs -----------------------------------------------------------------------------


async def test_jobs_gauge_counts_queued_jobs_left_by_a_previous_roost_when_first_scraped(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, "metrics", jobs={"max_workers": 1})
    async with EngineHarness.running(settings) as harness:
        # Written straight to the store, as a previous Roost would have left it:
        # no event told the metrics of it.
        store = harness.engine.jobs.store
        await store.insert_job(Job(id="left-over", image=IMAGE, status=JobStatus.QUEUED))
        metrics = Metrics(harness.engine)
        samples = await scrape(metrics)
        assert value(samples, "roost_jobs", state="queued") == 1


async def test_jobs_count_finished_and_duration_when_a_job_succeeds(
    harness: EngineHarness,
) -> None:
    response = await harness.client.post("/api/jobs", json={"image": IMAGE})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    async def ended() -> bool:
        job = await harness.engine.jobs.get(job_id)
        return job.status is not JobStatus.QUEUED and job.status is not JobStatus.RUNNING

    await wait_until(lambda: harness.engine.jobs.running == 1, what="job running")
    samples = await http_scrape(harness)
    assert value(samples, "roost_jobs", state="running") == 1
    job = await harness.engine.jobs.get(job_id)
    assert job.container_id is not None
    harness.runtime.crash(job.container_id, exit_code=0)
    await wait_until(ended, what="job ended")
    samples = await http_scrape(harness)
    assert value(samples, "roost_jobs", state="running") == 0
    assert value(samples, "roost_jobs_finished_total", status="succeeded") == 1
    assert value(samples, "roost_job_duration_seconds_count", status="succeeded") == 1


# -- faults ---------------------------------------------------------------------------


async def test_webhook_failure_is_counted_when_the_admin_hook_refuses_the_notice(
    tmp_path: Path,
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=400)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        settings = make_settings(
            tmp_path,
            "metrics",
            agents={"absent": {"image": "roost-nowhere:1"}},
            notify={"webhook": f"http://127.0.0.1:{site_port(site)}/hook"},
        )
        async with EngineHarness.running(settings) as harness:
            response = await harness.client.post("/api/agents/absent/start")
            assert response.status_code == 502
            await wait_until(
                lambda: harness.engine.faults.webhook_failures["agent.failed"] == 1,
                what="the refused notice counted",
            )
            samples = await http_scrape(harness)
    finally:
        await runner.cleanup()
    assert value(samples, "roost_webhook_failures_total", kind="agent.failed") == 1
    assert value(samples, "roost_agent_crashes_total", agent="absent", reason="start_failed") == 1


async def test_docker_api_errors_are_counted_while_the_engine_runs_on_docker(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path, "metrics", docker={"host": f"unix://{tmp_path}/no-docker.sock"}
    )
    engine = Engine(settings)
    with pytest.raises(errors.DockerUnavailable, match=r"no-docker\.sock"):
        await engine.start()
    # ping failed: counted, and the hook is gone with the engine
    assert engine.faults.docker_api_errors["unreachable"] >= 1
    assert engine.faults.docker_api_error not in docker_runtime.API_ERROR_HOOKS


# -- the catalogue, the README and the deploy files ------------------------------------


def test_readme_documents_every_metric_in_the_catalogue_when_compared() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)`", section, flags=re.MULTILINE)
    assert documented == [doc.name for doc in CATALOGUE]


async def test_every_catalogued_family_is_exposed_when_scraped(harness: EngineHarness) -> None:
    response = await harness.client.get("/metrics")
    families = {family.name for family in text_string_to_metric_families(response.text)}
    for doc in CATALOGUE:
        assert doc.name in families or doc.name.removesuffix("_total") in families, doc.name
    assert "process_cpu_seconds" in families
    assert "python_gc_objects_collected" in families
