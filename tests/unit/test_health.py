"""Roost's own conditions (reactor.health) on fake time: one notice when a condition
begins and one when it ends; a probed condition (the store's) ends only when its
probe succeeds after a quiet second, so a nearly full disk does not flap."""

from __future__ import annotations

from typing import Any

from roost import errors
from roost.reactor.health import SETTLE, Health
from roost.testing.fake_clock import FakeClock


class Notices:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def announce(self, kind: str, data: dict[str, Any]) -> None:
        self.sent.append(kind)


class Probe:
    """A store that takes writes or not."""

    def __init__(self) -> None:
        self.writable = False
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.writable:
            raise errors.StorageFull("disk full")


async def test_a_condition_without_a_probe_ends_at_the_first_success() -> None:
    notices = Notices()
    health = Health(clock=FakeClock(), announce=notices.announce)
    assert health.fail("engine", "gone")
    assert not health.fail("engine", "still gone")
    assert health.problems() == {"engine": "still gone"}
    assert health.clear("engine")
    assert not health.holds("engine")
    await health.close()
    assert notices.sent == ["engine.unavailable", "engine.recovered"]


async def test_a_probed_condition_ends_when_its_probe_succeeds_even_without_other_writes() -> None:
    clock = FakeClock()
    notices = Notices()
    probe = Probe()
    health = Health(clock=clock, announce=notices.announce)
    health.probe_with("store", probe)
    health.fail("store", "disk full")
    for _ in range(20):
        await clock.advance(0.5)
    assert health.holds("store")
    assert probe.calls > 3  # rechecked while it held
    probe.writable = True  # space was freed
    for _ in range(5):
        await clock.advance(0.5)
    assert not health.holds("store")
    await health.close()
    assert notices.sent == ["store.degraded", "store.recovered"]


async def test_a_probed_condition_does_not_flap_when_small_writes_pass_and_others_fail() -> None:
    clock = FakeClock()
    notices = Notices()
    probe = Probe()
    probe.writable = True  # a one-page write fits: proves nothing on its own
    health = Health(clock=clock, announce=notices.announce)
    health.probe_with("store", probe)
    health.fail("store", "disk full")
    for _ in range(20):
        assert not health.clear("store")  # a small write committed...
        await clock.advance(SETTLE / 4)
        health.fail("store", "disk full")  # ...and the next one did not
        await clock.advance(SETTLE / 4)
    assert health.holds("store")
    for _ in range(4):  # quiet for SETTLE: now it is over
        await clock.advance(SETTLE / 2)
    assert not health.holds("store")
    await health.close()
    assert notices.sent == ["store.degraded", "store.recovered"]


async def test_close_ends_the_rechecks_of_a_condition_that_still_holds() -> None:
    clock = FakeClock()
    health = Health(clock=clock, announce=Notices().announce)
    health.probe_with("store", Probe())
    health.fail("store", "disk full")
    await clock.advance(3)
    await health.close()
    assert health.holds("store")
