"""roost.core.jobs: transitions, outcomes, error classes, secrets, snapshot names,
eviction and orphan planning, as tables (and properties where a rule is general)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost import errors
from roost.core import labels
from roost.core.jobs import (
    FINAL_STATUSES,
    MAX_SNAPSHOT_GENERATIONS,
    SNAPSHOT_REPOSITORY_PREFIX,
    TRANSIENT_RETRY,
    ErrorKind,
    EvictionPolicy,
    JobContainer,
    JobStatus,
    SnapshotRecord,
    StopReason,
    can_transition,
    check_transition,
    classify_error,
    decide_outcome,
    is_secret_name,
    job_config_hash,
    job_labels,
    plan_eviction,
    plan_orphans,
    redact,
    reusable_snapshot,
    scrub_env,
    secret_values,
    snapshot_repository,
    validate_env_names,
    validate_extra_labels,
    validate_snapshot_key,
)

J = JobStatus
#: Docker's grammar for one path component of a repository name.
DOCKER_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*$")

# --------------------------------------------------------------------------- transitions

ALLOWED = {
    (J.QUEUED, J.RUNNING),
    (J.QUEUED, J.CANCELLED),
    (J.QUEUED, J.FAILED),
    (J.RUNNING, J.SUCCEEDED),
    (J.RUNNING, J.FAILED),
    (J.RUNNING, J.TIMED_OUT),
    (J.RUNNING, J.CANCELLED),
    (J.RUNNING, J.QUEUED),
}


@pytest.mark.parametrize("current", list(J))
@pytest.mark.parametrize("target", list(J))
def test_transition_is_allowed_only_when_listed_in_the_table(
    current: JobStatus, target: JobStatus
) -> None:
    assert can_transition(current, target) is ((current, target) in ALLOWED)


@pytest.mark.parametrize("final", sorted(FINAL_STATUSES))
def test_check_transition_names_job_and_state_when_job_already_ended(final: JobStatus) -> None:
    with pytest.raises(errors.StateError, match=f"job job-1 already ended: {final.value}"):
        check_transition("job-1", final, J.CANCELLED)


def test_check_transition_names_both_states_when_move_is_not_allowed() -> None:
    with pytest.raises(errors.StateError, match="from queued to succeeded"):
        check_transition("job-1", J.QUEUED, J.SUCCEEDED)


# --------------------------------------------------------------------------- outcomes

OUTCOMES = [
    # exit_code, oom, docker_error, stop_reason, expected status, error fragment
    (0, False, "", None, J.SUCCEEDED, ""),
    (3, False, "", None, J.FAILED, "exited with code 3"),
    (137, True, "", None, J.FAILED, "out-of-memory"),
    (0, True, "", None, J.FAILED, "out-of-memory"),
    (0, False, "mount failed", None, J.FAILED, "Docker reported: mount failed"),
    (None, False, "", None, J.FAILED, "exit code unknown"),
    (137, False, "", StopReason.TIMEOUT, J.TIMED_OUT, "timed out after 30 s"),
    (0, False, "", StopReason.TIMEOUT, J.TIMED_OUT, "SIGKILL after 2 s"),
    (137, True, "", StopReason.TIMEOUT, J.TIMED_OUT, "timed out"),
    (None, False, "", StopReason.TIMEOUT, J.TIMED_OUT, "timed out"),
    (143, False, "", StopReason.CANCEL, J.CANCELLED, "cancelled on request"),
    (0, False, "", StopReason.SHUTDOWN, J.CANCELLED, "Roost shut down"),
]


@pytest.mark.parametrize(
    ("exit_code", "oom", "docker_error", "reason", "status", "fragment"), OUTCOMES
)
def test_outcome_follows_table_when_container_ended(
    exit_code: int | None,
    oom: bool,
    docker_error: str,
    reason: StopReason | None,
    status: JobStatus,
    fragment: str,
) -> None:
    outcome = decide_outcome(
        exit_code=exit_code,
        oom_killed=oom,
        docker_error=docker_error,
        stop_reason=reason,
        timeout=30,
        kill_grace=2,
        memory=32 * 1024 * 1024,
    )
    assert outcome.status is status
    assert fragment in outcome.error
    assert (outcome.error == "") is (status is J.SUCCEEDED)


def test_outcome_names_memory_limit_when_oom_killed() -> None:
    outcome = decide_outcome(
        exit_code=137,
        oom_killed=True,
        docker_error="",
        stop_reason=None,
        timeout=1,
        kill_grace=1,
        memory=32 * 1024 * 1024,
    )
    assert "32 MiB" in outcome.error


# --------------------------------------------------------------------------- errors

CLASSIFIED = [
    (errors.DockerUnavailable("engine gone"), ErrorKind.TRANSIENT),
    (errors.ContainerError("500 internal"), ErrorKind.TRANSIENT),
    (errors.ContainerError("500 internal", status=500), ErrorKind.TRANSIENT),
    (errors.ContainerError("range of CPUs", status=400), ErrorKind.TERMINAL),
    (errors.StoreError("locked"), ErrorKind.TRANSIENT),
    (errors.ImageUnavailable("no such image"), ErrorKind.TERMINAL),
    (errors.ContainerNotFound("no such network"), ErrorKind.TERMINAL),
    (errors.Conflict("name taken"), ErrorKind.TERMINAL),
    (errors.ConfigError("bad"), ErrorKind.TERMINAL),
    (errors.StateError("no"), ErrorKind.TERMINAL),
    (RuntimeError("bug"), ErrorKind.TERMINAL),
]


@pytest.mark.parametrize(("exc", "kind"), CLASSIFIED)
def test_error_is_classified_by_class_when_docker_fails(exc: Exception, kind: ErrorKind) -> None:
    assert classify_error(exc) is kind


def test_retry_delay_follows_budget_then_stops_when_spent() -> None:
    budget = TRANSIENT_RETRY.budget
    assert budget == len(TRANSIENT_RETRY.delays)
    delays = [TRANSIENT_RETRY.delay(n) for n in range(budget + 2)]
    assert delays[:budget] == list(TRANSIENT_RETRY.delays)
    assert delays[budget:] == [None, None]


# --------------------------------------------------------------------------- secrets

SECRET_NAMES = [
    ("API_TOKEN", True),
    ("OPENAI_API_KEY", True),
    ("api_key", True),
    ("CLIENT_SECRET", True),
    ("DB_PASSWORD", True),
    ("PASSWORD", True),
    ("MY_PASSWORD_FILE", True),
    ("KEY", False),
    ("TOKENIZER", False),
    ("KEYBOARD_LAYOUT", False),
    ("PATH", False),
    ("HOME", False),
]


@pytest.mark.parametrize(("name", "secret"), SECRET_NAMES)
def test_env_name_is_secret_when_it_matches_a_pattern(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_env_name_is_secret_when_listed_in_config_whatever_its_case() -> None:
    assert is_secret_name("GITHUB_PAT", ["github_pat"])
    assert not is_secret_name("GITHUB_PAT")


def test_scrub_env_drops_only_secret_entries_when_committing() -> None:
    entries = ["PATH=/bin", "API_TOKEN=supersecret", "MODE=x", "DB_PASSWORD=", "EXTRA=v"]
    assert scrub_env(entries, ["EXTRA"]) == ("PATH=/bin", "MODE=x")


def test_redact_replaces_secret_values_when_they_appear_in_logs() -> None:
    env = {"API_TOKEN": "supersecret", "SHORT_KEY": "abc", "MODE": "supersecret-mode"}
    values = secret_values(env)
    assert values == ("supersecret",)  # short ones are left (they would mangle text)
    assert redact("token=supersecret ok", values) == "token=[redacted] ok"


def test_secret_values_are_longest_first_when_one_contains_another() -> None:
    values = secret_values({"A_TOKEN": "abcd", "B_TOKEN": "abcdefgh"})
    assert redact("x abcdefgh y abcd", values) == "x [redacted] y [redacted]"


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("key", "repository"),
    [
        ("repo-1", "roost-snapshot/repo-1"),
        ("abc", "roost-snapshot/abc"),
    ],
)
def test_snapshot_repository_keeps_key_when_already_valid(key: str, repository: str) -> None:
    assert snapshot_repository(key) == repository


def test_snapshot_repository_lowercases_and_hashes_when_key_is_not_a_docker_name() -> None:
    upper, lower = snapshot_repository("Repo"), snapshot_repository("repo")
    assert upper != lower
    assert upper.startswith("roost-snapshot/repo-")


@given(st.text(min_size=1, max_size=128).filter(lambda k: k.isprintable() and " " not in k))
def test_snapshot_repository_is_valid_docker_name_when_key_is_anything(key: str) -> None:
    repository = snapshot_repository(key)
    assert repository.startswith(SNAPSHOT_REPOSITORY_PREFIX)
    assert DOCKER_COMPONENT.match(repository.removeprefix(SNAPSHOT_REPOSITORY_PREFIX))
    assert len(repository) < 255


@given(st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=6, unique=True))
def test_snapshot_repository_differs_when_keys_differ(keys: list[str]) -> None:
    assert len({snapshot_repository(k) for k in keys}) == len(keys)


@pytest.mark.parametrize("key", ["", "a b", "x" * 129, "tab\there"])
def test_snapshot_key_is_rejected_when_empty_spaced_or_long(key: str) -> None:
    with pytest.raises(ValueError, match="must"):
        validate_snapshot_key(key)


def test_extra_labels_are_rejected_when_in_roost_namespace() -> None:
    with pytest.raises(ValueError, match=r"roost\.job"):
        validate_extra_labels({"team": "a", "roost.job": "x"})
    assert validate_extra_labels({"team": "a"}) == {"team": "a"}


def test_env_names_are_rejected_without_echoing_values_when_invalid() -> None:
    with pytest.raises(ValueError, match="invalid variable name") as caught:
        validate_env_names({"A=B": "hunter2secret"})
    assert "hunter2secret" not in str(caught.value)


def test_job_labels_carry_contract_labels_when_user_labels_collide() -> None:
    result = job_labels(
        instance="i1",
        job_id="job-1",
        project="p",
        from_snapshot=True,
        config_hash="h",
        extra={"team": "t"},
    )
    assert result == {
        "team": "t",
        labels.MANAGED: "true",
        labels.INSTANCE: "i1",
        labels.JOB: "job-1",
        labels.PROJECT: "p",
        labels.SNAPSHOT: "true",
        labels.CONFIG_HASH: "h",
    }


def test_config_hash_ignores_env_values_when_names_are_equal() -> None:
    def digest(env: dict[str, str], image: str = "img") -> str:
        return job_config_hash(
            image=image,
            command=["true"],
            env_names=env,
            memory=None,
            cpus=None,
            network=None,
            timeout=5,
            snapshot_key=None,
        )

    assert digest({"API_TOKEN": "one"}) == digest({"API_TOKEN": "two"})
    assert digest({"API_TOKEN": "one"}) != digest({"OTHER": "one"})
    assert digest({}) != digest({}, image="other")


# --------------------------------------------------------------------------- eviction

NO_LIMITS = EvictionPolicy(ttl=0, max_count=0, max_bytes=0)


def snap(
    key: str, image: str, *, created: float, used: float | None = None, size: int = 10
) -> SnapshotRecord:
    return SnapshotRecord(
        key=key,
        image=image,
        job_id=image,
        size=size,
        created_at=created,
        last_used_at=created if used is None else used,
    )


def test_snapshot_is_not_reused_when_its_layer_chain_is_too_deep() -> None:
    shallow = snap("a", "a:1", created=1)
    assert reusable_snapshot(shallow)
    deep = dataclasses.replace(shallow, generation=MAX_SNAPSHOT_GENERATIONS)
    assert not reusable_snapshot(deep)
    assert reusable_snapshot(dataclasses.replace(deep, generation=MAX_SNAPSHOT_GENERATIONS - 1))


def test_eviction_removes_superseded_snapshots_when_key_has_newer_one() -> None:
    old, new, other = (
        snap("a", "a:1", created=1),
        snap("a", "a:2", created=2),
        snap("b", "b:1", created=1),
    )
    assert plan_eviction([old, new, other], now=10, policy=NO_LIMITS) == (old,)


def test_eviction_removes_expired_snapshots_when_older_than_ttl() -> None:
    fresh, stale = snap("a", "a:1", created=95, used=95), snap("b", "b:1", created=50, used=99)
    plan = plan_eviction(
        [fresh, stale], now=100, policy=EvictionPolicy(ttl=10, max_count=0, max_bytes=0)
    )
    assert plan == (stale,)


def test_eviction_removes_least_recently_used_when_over_count() -> None:
    snaps = [snap(k, f"{k}:1", created=1, used=u) for k, u in (("a", 5), ("b", 1), ("c", 3))]
    plan = plan_eviction(snaps, now=10, policy=EvictionPolicy(ttl=0, max_count=2, max_bytes=0))
    assert [s.key for s in plan] == ["b"]


def test_eviction_removes_least_recently_used_when_over_total_bytes() -> None:
    snaps = [
        snap("a", "a:1", created=1, used=5, size=40),
        snap("b", "b:1", created=1, used=1, size=40),
        snap("c", "c:1", created=1, used=3, size=40),
    ]
    plan = plan_eviction(snaps, now=10, policy=EvictionPolicy(ttl=0, max_count=0, max_bytes=90))
    assert [s.key for s in plan] == ["b"]
    plan = plan_eviction(snaps, now=10, policy=EvictionPolicy(ttl=0, max_count=0, max_bytes=30))
    assert [s.key for s in plan] == ["b", "c", "a"]


def test_eviction_keeps_everything_when_limits_are_zero() -> None:
    snaps = [snap(k, f"{k}:1", created=0, size=10**12) for k in "abcdefgh"]
    assert plan_eviction(snaps, now=10**9, policy=NO_LIMITS) == ()


@given(
    st.lists(
        st.tuples(
            st.sampled_from("abcd"),
            st.integers(0, 100),
            st.integers(0, 100),
            st.integers(0, 50),
        ),
        max_size=12,
    ),
    st.integers(0, 4),
    st.integers(0, 150),
)
def test_eviction_leaves_at_most_one_snapshot_per_key_within_limits_when_planned(
    rows: list[tuple[str, int, int, int]], max_count: int, max_bytes: int
) -> None:
    snaps = [
        snap(key, f"{key}:{n}", created=created, used=used, size=size)
        for n, (key, created, used, size) in enumerate(rows)
    ]
    policy = EvictionPolicy(ttl=50, max_count=max_count, max_bytes=max_bytes)
    plan = plan_eviction(snaps, now=120, policy=policy)
    kept = [s for s in snaps if s not in plan]
    assert len({s.key for s in kept}) == len(kept)
    assert all(120 - s.created_at <= 50 for s in kept)
    if max_count:
        assert len(kept) <= max_count
    if max_bytes:
        assert sum(s.size for s in kept) <= max_bytes
    assert len(plan) == len(set(plan))


# --------------------------------------------------------------------------- orphans


def test_orphan_plan_follows_table_when_scanning() -> None:
    containers = [
        JobContainer("live", "job-live", created_at=0),
        JobContainer("unknown", "job-gone", created_at=99),
        JobContainer("old", "job-done", created_at=0),
        JobContainer("young", "job-recent", created_at=95),
    ]
    plan = plan_orphans(
        containers,
        timeouts={"job-live": 1, "job-done": 10, "job-recent": 10},
        live_jobs={"job-live"},
        now=100,
    )
    assert plan == ("unknown", "old")
