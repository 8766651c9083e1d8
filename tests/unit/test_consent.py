"""The worker's consent gate and the API's consent cache, on their in-memory twins."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CollectorRegistry

from pipeline.consent import ConsentCache, ConsentGate, forget_states, split_checkins
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import RawMessage
from pipeline.testing import T0, make_checkin
from schemas import Channel, Citizen, encode


def checkin(citizen_id: str) -> RawMessage:
    return RawMessage(encode(make_checkin(citizen_id, -6.2, 106.8)), citizen_id.encode(), "checkins")


def registration(citizen_id: str, tracking: bool) -> RawMessage:
    citizen = Citizen(citizen_id, "Sari", "ID", "id", (Channel("sms", "+6281200000001"),), (), tracking)
    return RawMessage(encode(citizen), citizen_id.encode(), "citizens")


def tombstone(citizen_id: str, topic: str = "checkins") -> RawMessage:
    return RawMessage(None, citizen_id.encode(), topic)


def test_split_keeps_the_tracked_drops_the_untracked_and_reads_tombstones_as_erasures() -> None:
    nothing = RawMessage(None, None, "checkins")
    batch = [checkin("a"), checkin("u"), tombstone("e"), checkin("e"), RawMessage(b"{}", None, "checkins"), tombstone("e"),
             nothing]
    admitted = split_checkins(batch, lambda citizen: citizen == "u")
    assert [m.key for m in admitted.checkins] == [b"a", b"e", None, None]  # a check-in after an erasure is a new one
    assert admitted.checkins[-1] is nothing  # no key, no value: not an erasure, dead-lettered as empty
    assert admitted.untracked == ("u",)
    assert admitted.erased == ("e",)


class Gate:
    def __init__(self) -> None:
        self.states: dict[str, object] = {"a": {"x": 1}, "u": {"x": 2}}
        self.untracked: dict[str, object] = {}
        self.registry = CollectorRegistry()

        async def forget(ids: object) -> int:
            return await forget_states(self.states, ids)  # type: ignore[arg-type]

        self.gate = ConsentGate(self.untracked, forget, WorkerMetrics(self.registry), lambda: T0 + timedelta(minutes=5))

    def skipped(self, reason: str) -> float:
        return self.registry.get_sample_value("crisiswatch_stage_skipped_total", {"stage": "locate", "reason": reason}) or 0


async def test_a_registration_without_consent_untracks_and_forgets_and_consent_given_again_tracks() -> None:
    g = Gate()
    await g.gate.on_citizen(registration("u", tracking=False))
    assert g.untracked == {"u": True}
    assert "u" not in g.states  # what the worker knew of where they were is gone
    kept = await g.gate.admit([checkin("u"), checkin("a")])
    assert [m.key for m in kept] == [b"a"]
    assert g.skipped("no_consent") == 1

    await g.gate.on_citizen(registration("u", tracking=True))
    assert g.untracked == {}
    assert [m.key for m in await g.gate.admit([checkin("u")])] == [b"u"]


async def test_an_erasure_forgets_the_state_and_the_consent() -> None:
    g = Gate()
    await g.gate.on_citizen(registration("u", tracking=False))
    await g.gate.on_citizen(tombstone("u", "citizens"))
    assert g.untracked == {}
    assert await g.gate.admit([tombstone("a")]) == []
    assert g.states == {}
    assert g.skipped("erased") == 1


async def test_a_bad_registration_changes_nothing_and_raises_nothing() -> None:
    g = Gate()
    await g.gate.on_citizen(RawMessage(b'{"schema":"citizen/1"}', b"u", "citizens"))
    assert g.untracked == {} and set(g.states) == {"a", "u"}


def test_the_cache_asks_once_per_batch_and_trusts_an_answer_for_its_ttl() -> None:
    asked: list[list[str]] = []
    registry = {"u"}
    now = [0.0]

    def lookup(ids: object) -> set[str]:
        asked.append(list(ids))  # type: ignore[call-overload]
        return {c for c in ids if c in registry}  # type: ignore[attr-defined]

    cache = ConsentCache(lookup, ttl_s=10.0, clock=lambda: now[0])
    assert cache.untracked(["a", "u", "a"]) == {"u"}
    assert cache.untracked(["u", "a"]) == {"u"}
    assert asked == [["a", "u"]]
    registry.discard("u")
    now[0] = 11.0
    assert cache.untracked(["u"]) == set()
    cache.note("b", location_tracking=False)  # what the API itself just accepted
    assert cache.untracked(["b"]) == {"b"}
    assert asked == [["a", "u"], ["u"]]
