"""``/metrics`` of a real daemon on real Docker, and the deploy files checked against it.

The Grafana dashboard and the Prometheus alerts in ``deploy/`` may only name
metrics that a real scrape exposes: this test runs ``serving.serve`` on the real
engine, provokes a crash by OOM kill through the proxy, scrapes over HTTP and
checks every metric name the deploy files use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, make_settings, wait_until
from tests.support import roost_daemon

pytestmark = pytest.mark.docker

#: Series Prometheus makes itself, not Roost.
PROMETHEUS_OWN = frozenset({"up"})
_METRIC = re.compile(r"\b((?:roost|process|python)_[a-z0-9_]+|up)\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exposed_names(text: str) -> set[str]:
    """Every name a query may use: sample names, and each family's own name."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in _HISTOGRAM_SUFFIXES)
        elif family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "info":
            names.add(family.name + "_info")
        names.update(sample.name for sample in family.samples)
    return names


def deploy_queries() -> dict[str, str]:
    """Every PromQL expression in deploy/, by where it is."""
    queries: dict[str, str] = {}
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus-alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            queries[f"alert {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries[f"variable {variable['name']}"] = variable["query"]
    return queries


async def test_deploy_files_use_only_metrics_a_real_scrape_exposes_when_an_agent_oom_crashes(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path,
        instance,
        agents={"hog": {"image": docker_images["mimic"], "memory": "48m", "max_restarts": 0}},
    )
    async with roost_daemon(settings) as (url, _), httpx.AsyncClient(base_url=url) as client:
        oom = await client.post("/agents/hog/messages", json={"cmd": "oom"}, timeout=60)
        assert oom.status_code in (200, 502)  # replied, or killed before the reply left

        async def failed() -> bool:
            state: str = (await client.get("/api/agents/hog")).json()["state"]
            return state == "failed"

        await wait_until(failed, what="the OOM-killed agent failed")
        text = (await client.get("/metrics")).text

    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    crashes = ("roost_agent_crashes_total", frozenset({("agent", "hog"), ("reason", "oom")}))
    assert samples[crashes] == 1
    assert samples[("roost_agent_state", frozenset({("agent", "hog"), ("state", "failed")}))] == 1
    proxied = [
        labels
        for (name, labels), _ in samples.items()
        if name == "roost_proxy_requests_total" and ("agent", "hog") in labels
    ]
    assert proxied

    exposed = exposed_names(text)
    queries = deploy_queries()
    assert len(queries) > 10
    for where, query in queries.items():
        used = set(_METRIC.findall(query))
        assert used, f"{where}: no metric in {query!r}"
        missing = used - exposed - PROMETHEUS_OWN
        assert not missing, f"{where} uses {sorted(missing)}, which /metrics does not expose"
