"""Prometheus metrics: Roost observed from outside the reactor, served at ``GET /metrics``.

Role: one :class:`Metrics` per admin app. It mostly *observes* the engine instead
of being called from it:

- the agents' state listener (``engine.agents.add_listener``) gives restarts,
  crashes by reason, state transitions and the start / wake / time-to-ready
  durations (from the timestamps of the state changes);
- the event hub's listener (``engine.events.add_listener``) gives messages by
  outcome, retries and the delivery duration (``message.status``), and jobs by
  state with their durations (``job.state``);
- at scrape time it reads what is cheap to read now: agents per state, each
  agent's state, queue depth (``Inbox.pending_count``), leases, open event
  streams, the proxy's open streams, and the failures the engine counted where
  they happened (``engine.faults``: webhook notifications given up, Docker API
  errors);
- the proxy calls :meth:`Metrics.proxy_started` / :meth:`Metrics.proxy_finished`
  around every proxied request (the one hook that must sit where the work is).
  Those two keep plain numbers per agent (a tally) that become the proxy's
  series at scrape time: a prometheus_client child takes a lock and a few calls
  per update, ~2.4 µs of every proxied request for four updates.

Every metric is listed, with its type, labels and meaning, in ``CATALOGUE`` and in
the README's metrics table (a test keeps the two and a real scrape in step).

Invariants:
- Per-agent series exist only for registered agents: observations for an unknown
  name are dropped, and an agent's series go when it is deleted, so cardinality
  is bounded by the agents (and small label sets: states, reasons, outcomes).
- The registry belongs to the app: two apps in one process never share series.
- No ``*_created`` series (prometheus_client adds them to counters and
  histograms): they would double the exposition for no use here.
- Durations come from the engine's clock (the state changes' own timestamps), so
  they are exact on fake time too, and never negative.
"""

from __future__ import annotations

import bisect
import dataclasses
import importlib.metadata
import itertools
import platform
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from roost.core.jobs import FINAL_STATUSES, JobStatus
from roost.core.records import AgentRecord, StateChange
from roost.core.states import AgentState
from roost.engine import Engine
from roost.reactor.eventing import HubEvent

__all__ = ["CATALOGUE", "MetricDoc", "Metrics", "build_version"]

S = AgentState

#: Seconds: from a 15 ms unpause to a slow image's two-minute start.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Seconds for proxied requests: mostly milliseconds, held ones up to hold_timeout.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 60)
#: The ``le`` labels of REQUEST_BUCKETS as prometheus_client writes them, then +Inf.
_LE = (*(floatToGoString(bound) for bound in REQUEST_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]
#: Seconds for one-shot jobs: seconds to an hour (the default timeout).
JOB_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

#: States an agent sleeps in; leaving one of them for ``running`` is a wake.
SLEEPING = frozenset({S.CREATED, S.STOPPED, S.PAUSED})


@dataclasses.dataclass(frozen=True)
class MetricDoc:
    """One exposed metric family, as the README documents it."""

    name: str
    kind: str  # counter | gauge | histogram | info
    labels: tuple[str, ...]
    help: str


#: Every metric family Roost exposes besides the process and Python collectors'
#: (``process_*``, ``python_*``), in the README's order.
CATALOGUE: tuple[MetricDoc, ...] = (
    MetricDoc("roost_build_info", "info", ("version", "python"), "Roost's version (value 1)."),
    MetricDoc("roost_agents", "gauge", ("state",), "Agents per state."),
    MetricDoc(
        "roost_agent_state",
        "gauge",
        ("agent", "state"),
        "1 for each agent's current state (one series per agent).",
    ),
    MetricDoc(
        "roost_agent_transitions_total",
        "counter",
        ("agent", "to"),
        "State changes, by the state entered.",
    ),
    MetricDoc(
        "roost_agent_restarts_total",
        "counter",
        ("agent",),
        "Automatic restarts after a crash (each restart scheduled or begun).",
    ),
    MetricDoc(
        "roost_agent_crashes_total",
        "counter",
        ("agent", "reason"),
        "Crashes by reason: exit (non-zero or unasked exit), oom (killed by the OOM killer), "
        "unhealthy (liveness_failures failed probes), start_failed, vanished.",
    ),
    MetricDoc(
        "roost_agent_start_seconds",
        "histogram",
        ("agent",),
        "Every start: time in 'starting' until the agent answered its health check "
        "(first start, wake, restart).",
    ),
    MetricDoc(
        "roost_agent_wake_seconds",
        "histogram",
        ("agent", "from"),
        "Wakes of a sleeping agent (from created, stopped or paused) until it answered its "
        "health check: what a request held for it waits.",
    ),
    MetricDoc(
        "roost_agent_time_to_ready_seconds",
        "histogram",
        ("agent",),
        "After a crash: from the crash until the agent answered its health check again "
        "(backoff and start included).",
    ),
    MetricDoc(
        "roost_messages_accepted_total", "counter", ("agent",), "Messages stored for delivery."
    ),
    MetricDoc(
        "roost_messages_total",
        "counter",
        ("agent", "outcome"),
        "Messages that reached an end, by outcome: delivered, failed, dead.",
    ),
    MetricDoc(
        "roost_message_retries_total",
        "counter",
        ("agent",),
        "Delivery attempts that failed and will be retried (5xx, no answer).",
    ),
    MetricDoc(
        "roost_message_delivery_seconds",
        "histogram",
        ("agent", "outcome"),
        "From a message's acceptance (or re-queue) until its outcome, wake and retries included.",
    ),
    MetricDoc(
        "roost_messages_pending",
        "gauge",
        ("agent",),
        "Queue depth: messages queued or being delivered.",
    ),
    MetricDoc("roost_agent_leases", "gauge", ("agent",), "Leases held on the agent."),
    MetricDoc(
        "roost_proxy_requests_total",
        "counter",
        ("agent", "code"),
        "Proxied requests (HTTP and WebSocket) by status class: 1xx (WebSocket accepted), "
        "2xx, 3xx, 4xx, 5xx; 'none' when the client left before an answer.",
    ),
    MetricDoc(
        "roost_proxy_request_seconds",
        "histogram",
        ("agent",),
        "Proxied request duration, wake hold included, until the answer (or stream, or "
        "WebSocket) ended.",
    ),
    MetricDoc(
        "roost_proxy_requests_in_flight",
        "gauge",
        ("agent",),
        "Proxied requests open now, streams and WebSockets included.",
    ),
    MetricDoc(
        "roost_proxy_waiting_pages_total",
        "counter",
        ("agent",),
        "Waiting pages served to browsers while the agent woke (waiting_page = true).",
    ),
    MetricDoc(
        "roost_proxy_open_streams",
        "gauge",
        (),
        "Streaming responses and WebSockets the proxy relays now.",
    ),
    MetricDoc(
        "roost_event_streams_open",
        "gauge",
        (),
        "Subscribers of the event stream (GET /api/events, roost events -f) now.",
    ),
    MetricDoc("roost_jobs", "gauge", ("state",), "Jobs queued or running now."),
    MetricDoc(
        "roost_jobs_finished_total",
        "counter",
        ("status",),
        "Jobs ended, by status: succeeded, failed, timed_out, cancelled.",
    ),
    MetricDoc(
        "roost_job_duration_seconds",
        "histogram",
        ("status",),
        "Run time of ended jobs (container start to end), by status.",
    ),
    MetricDoc(
        "roost_webhook_failures_total",
        "counter",
        ("kind",),
        "Admin notifications the webhook could not deliver (after its retries), by kind.",
    ),
    MetricDoc(
        "roost_docker_api_errors_total",
        "counter",
        ("status",),
        "Failed Docker API calls, by Docker's HTTP status or 'unreachable' (404 'not "
        "there' answers are not errors).",
    ),
)

_DOCS = {doc.name: doc for doc in CATALOGUE}


def build_version() -> str:
    """Roost's installed version (``0+unknown`` when run from a bare source tree)."""
    try:
        return importlib.metadata.version("roost")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if status >= 100 else "none"


class _Families:
    """The instrumented metrics (prometheus_client objects, in no global registry)."""

    def __init__(self) -> None:
        def counter(name: str) -> prometheus_client.Counter:
            doc = _DOCS[name]
            return prometheus_client.Counter(
                name.removesuffix("_total"), doc.help, doc.labels, registry=None
            )

        def histogram(name: str, buckets: tuple[float, ...]) -> prometheus_client.Histogram:
            doc = _DOCS[name]
            return prometheus_client.Histogram(
                name, doc.help, doc.labels, registry=None, buckets=buckets
            )

        self.transitions = counter("roost_agent_transitions_total")
        self.restarts = counter("roost_agent_restarts_total")
        self.crashes = counter("roost_agent_crashes_total")
        self.start = histogram("roost_agent_start_seconds", DURATION_BUCKETS)
        self.wake = histogram("roost_agent_wake_seconds", DURATION_BUCKETS)
        self.ready = histogram("roost_agent_time_to_ready_seconds", DURATION_BUCKETS)
        self.accepted = counter("roost_messages_accepted_total")
        self.messages = counter("roost_messages_total")
        self.retries = counter("roost_message_retries_total")
        self.delivery = histogram("roost_message_delivery_seconds", DURATION_BUCKETS)
        self.waiting_pages = counter("roost_proxy_waiting_pages_total")
        self.jobs_finished = counter("roost_jobs_finished_total")
        self.job_seconds = histogram("roost_job_duration_seconds", JOB_BUCKETS)

    def all(self) -> list[prometheus_client.metrics.MetricWrapperBase]:
        return [value for value in vars(self).values()]

    def per_agent(self) -> list[prometheus_client.metrics.MetricWrapperBase]:
        return [m for m in self.all() if "agent" in m._labelnames]


class _ProxyTally:
    """One agent's proxied requests as plain numbers (see the module docstring)."""

    __slots__ = ("buckets", "in_flight", "requests", "seconds")

    def __init__(self) -> None:
        self.in_flight = 0
        #: status class → requests that ended with it.
        self.requests: dict[str, int] = {}
        #: requests per REQUEST_BUCKETS bucket (not cumulative), the last one +Inf.
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)
        self.seconds = 0.0


class Metrics(Collector):
    """Roost's metrics over one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._agents = engine.agents
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._families = _Families()
        #: agent → (when it entered 'starting', the state it started from).
        self._starting: dict[str, tuple[float, AgentState]] = {}
        #: agent → when it crashed (until it is ready again, or failed).
        self._down_since: dict[str, float] = {}
        #: message id → when it was accepted or re-queued (until its outcome).
        self._queued_at: dict[str, float] = {}
        #: job id → status, for jobs queued or running.
        self._live_jobs: dict[str, str] = {}
        self._jobs_seeded = False
        #: agent → its proxied requests so far (since its first one).
        self._proxy: dict[str, _ProxyTally] = {}
        #: reads the proxy's open streams (set by the edge that owns the proxy).
        self.open_streams: Callable[[], int] = lambda: 0
        self.registry.register(self)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        engine.agents.add_listener(self._on_change)
        engine.events.add_listener(self._on_event)

    # -- exposition -------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The text exposition (reading what has to be read first)."""
        if not self._jobs_seeded:
            await self._seed_jobs()
        return prometheus_client.generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily(
            "roost_build",
            _DOCS["roost_build_info"].help,
            value={"version": build_version(), "python": platform.python_version()},
        )
        records = self._agents.records()
        per_state = dict.fromkeys(AgentState, 0)
        for record in records:
            per_state[record.state] += 1
        agents = GaugeMetricFamily("roost_agents", _DOCS["roost_agents"].help, labels=["state"])
        for state, count in per_state.items():
            agents.add_metric([state.value], count)
        yield agents
        current = self._gauge("roost_agent_state")
        pending = self._gauge("roost_messages_pending")
        leases = self._gauge("roost_agent_leases")
        inbox = self._engine.inbox
        for record in records:
            current.add_metric([record.name, record.state.value], 1)
            pending.add_metric([record.name], inbox.pending_count(record.name))
            leases.add_metric([record.name], len(self._engine.leases.list(record.name)))
        yield from (current, pending, leases)
        yield GaugeMetricFamily(
            "roost_proxy_open_streams",
            _DOCS["roost_proxy_open_streams"].help,
            value=self.open_streams(),
        )
        yield GaugeMetricFamily(
            "roost_event_streams_open",
            _DOCS["roost_event_streams_open"].help,
            value=self._engine.events.subscribers,
        )
        jobs = self._gauge("roost_jobs")
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            jobs.add_metric([status.value], sum(s == status for s in self._live_jobs.values()))
        yield jobs
        faults = self._engine.faults
        yield self._counter("roost_webhook_failures_total", faults.webhook_failures)
        yield self._counter("roost_docker_api_errors_total", faults.docker_api_errors)
        yield from self._proxy_families()
        for metric in self._families.all():
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family

    def _proxy_families(self) -> Iterable[Metric]:
        requests = prometheus_client.core.CounterMetricFamily(
            "roost_proxy_requests",
            _DOCS["roost_proxy_requests_total"].help,
            labels=["agent", "code"],
        )
        seconds = prometheus_client.core.HistogramMetricFamily(
            "roost_proxy_request_seconds",
            _DOCS["roost_proxy_request_seconds"].help,
            labels=["agent"],
        )
        in_flight = self._gauge("roost_proxy_requests_in_flight")
        for agent, tally in self._proxy.items():
            for code, count in sorted(tally.requests.items()):
                requests.add_metric([agent, code], count)
            cumulative = list(itertools.accumulate(tally.buckets))
            seconds.add_metric(
                [agent],
                [(_LE[i], float(count)) for i, count in enumerate(cumulative)],
                tally.seconds,
            )
            in_flight.add_metric([agent], tally.in_flight)
        yield from (requests, seconds, in_flight)

    def _gauge(self, name: str) -> GaugeMetricFamily:
        doc = _DOCS[name]
        return GaugeMetricFamily(name, doc.help, labels=list(doc.labels))

    def _counter(self, name: str, counts: dict[str, int]) -> Metric:
        doc = _DOCS[name]
        family = prometheus_client.core.CounterMetricFamily(
            name.removesuffix("_total"), doc.help, labels=list(doc.labels)
        )
        for label, count in sorted(counts.items()):
            family.add_metric([label], count)
        return family

    # -- the proxy's hook -------------------------------------------------------------

    def proxy_started(self, agent: str) -> bool:
        """A proxied request for ``agent`` begins; False (and nothing counted) when
        there is no such agent."""
        tally = self._proxy.get(agent)
        if tally is None:
            if agent not in self._agents:
                return False
            tally = self._proxy[agent] = _ProxyTally()
        tally.in_flight += 1
        return True

    def proxy_finished(self, agent: str, status: int, seconds: float) -> None:
        """It ended with ``status`` (0: no answer) after ``seconds``."""
        tally = self._proxy.get(agent)
        if tally is None:
            return  # deleted meanwhile: its series are gone
        tally.in_flight -= 1
        code = _status_class(status)
        tally.requests[code] = tally.requests.get(code, 0) + 1
        seconds = max(seconds, 0.0)
        tally.buckets[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1  # le: <= bound
        tally.seconds += seconds

    def waiting_page_served(self, agent: str) -> None:
        if agent in self._agents:
            self._families.waiting_pages.labels(agent).inc()

    # -- observing the agents ---------------------------------------------------------

    def _on_change(self, record: AgentRecord, changes: tuple[StateChange, ...]) -> None:
        f = self._families
        name = record.name
        for change in changes:
            to, origin = change.to_state, change.from_state
            f.transitions.labels(name, to.value).inc()
            if to is S.STARTING and origin is not S.STARTING:
                self._starting[name] = (change.at, origin)
            if to is S.RESTARTING or (to is S.STARTING and origin is S.CRASHED):
                f.restarts.labels(name).inc()  # a restart waits out its backoff, or begins
            if to is S.RUNNING and origin is S.STARTING:
                self._ready(name, change.at)
            elif to is S.CRASHED:
                f.crashes.labels(name, _crash_reason(record, change)).inc()
                self._down_since.setdefault(name, change.at)
                self._starting.pop(name, None)
            elif to in (S.FAILED, S.STOPPED, S.PAUSED):
                # Given up, or put to sleep: no start or recovery is under way.
                self._starting.pop(name, None)
                self._down_since.pop(name, None)

    def _ready(self, name: str, at: float) -> None:
        f = self._families
        began = self._starting.pop(name, None)
        if began is not None:
            since, origin = began
            f.start.labels(name).observe(max(at - since, 0.0))
            if origin in SLEEPING:
                f.wake.labels(name, origin.value).observe(max(at - since, 0.0))
        down = self._down_since.pop(name, None)
        if down is not None:
            f.ready.labels(name).observe(max(at - down, 0.0))

    def _forget_agent(self, name: str) -> None:
        self._proxy.pop(name, None)
        for metric in self._families.per_agent():
            metric.remove_by_labels({"agent": name})
        self._starting.pop(name, None)
        self._down_since.pop(name, None)

    # -- observing the event hub ------------------------------------------------------

    def _on_event(self, event: HubEvent) -> None:
        if event.kind == "message.status":
            self._on_message(event.data, event.at)
        elif event.kind == "job.state":
            self._on_job(event.data)
        elif event.kind == "agent.deleted":
            self._forget_agent(str(event.data.get("agent", "")))

    def _on_message(self, data: dict[str, Any], at: float) -> None:
        agent = str(data.get("agent", ""))
        message_id = str(data.get("message_id", ""))
        status = data.get("status")
        if agent not in self._agents:
            self._queued_at.pop(message_id, None)
            return
        f = self._families
        if status == "queued":
            attempts = data.get("attempts")
            if attempts is None:  # re-queued by a reset: a new wait begins
                self._queued_at[message_id] = at
            elif attempts == 0:
                f.accepted.labels(agent).inc()
                self._queued_at[message_id] = at
            else:
                f.retries.labels(agent).inc()
        elif status in ("delivered", "failed", "dead"):
            f.messages.labels(agent, status).inc()
            since = self._queued_at.pop(message_id, None)
            if since is not None:
                f.delivery.labels(agent, status).observe(max(at - since, 0.0))

    def _on_job(self, data: dict[str, Any]) -> None:
        job_id = str(data.get("job", ""))
        status = str(data.get("status", ""))
        if status in FINAL_STATUSES:
            self._live_jobs.pop(job_id, None)
            self._families.jobs_finished.labels(status).inc()
            duration = data.get("duration")
            if isinstance(duration, int | float):
                self._families.job_seconds.labels(status).observe(max(float(duration), 0.0))
        else:
            self._live_jobs[job_id] = status

    async def _seed_jobs(self) -> None:
        """Jobs a previous Roost left queued or running (no event told of them)."""
        self._jobs_seeded = True
        live = (JobStatus.QUEUED, JobStatus.RUNNING)
        for job in await self._engine.jobs.store.list_jobs(statuses=live, limit=1_000_000):
            self._live_jobs.setdefault(job.id, job.status.value)


def _crash_reason(record: AgentRecord, change: StateChange) -> str:
    """Why the agent crashed: oom, unhealthy, vanished, start_failed or exit."""
    last_exit = record.last_exit
    if last_exit is not None and last_exit.oom_killed:
        return "oom"
    if change.reason.startswith("unhealthy"):
        return "unhealthy"
    if change.reason == "container vanished":
        return "vanished"
    if change.from_state is S.STARTING and (last_exit is None or last_exit.exit_code is None):
        return "start_failed"
    return "exit"
