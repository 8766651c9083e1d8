"""The dispatcher's rounds (:class:`consumers.dispatch.Dispatcher`) against in-memory twins of the
``deliveries`` table, the channels and the publisher: what a citizen would notice when PostgreSQL
fails in the middle of a round, when a channel falls back, and when an all-clear follows its warning
in the same batch. The real table, broker and receivers are in tests/integration/test_dispatch.py."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from consumers.channels import Attempt, PermanentError, Receipt, Sent, TransientError
from consumers.dispatch import CitizenContact, Dispatcher, RowKey, RowOutcome
from consumers.kafka_io import Backoff, Message
from pipeline.domain.delivery import SETTLED, DeliveryRow
from pipeline.metrics import DispatchMetrics
from pipeline.settings import Secret, Settings
from producers.publisher import Outgoing, outgoing
from schemas import Warning, decode
from schemas.models import WarningKind

T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


@dataclass
class Row:
    citizen_id: str
    crisis_id: str
    status: str
    attempts: int


@dataclass
class TableTwin:
    """The registry and the deliveries table as :class:`consumers.dispatch.DeliveryStore` uses them;
    ``fail_finish`` makes the next writes of outcomes fail as PostgreSQL going away would."""

    contacts: dict[str, CitizenContact]
    rows_by_key: dict[RowKey, Row] = field(default_factory=dict)
    locks: dict[str, int] = field(default_factory=dict)
    fail_finish: int = 0

    def _rows(self, warning_id: str) -> list[DeliveryRow]:
        return [DeliveryRow(ch, a, r.status, r.attempts)  # type: ignore[arg-type]
                for (w, ch, a), r in self.rows_by_key.items() if w == warning_id]

    def citizens(self, ids: Sequence[str]) -> dict[str, CitizenContact]:
        return {i: self.contacts[i] for i in ids if i in self.contacts}

    def rows(self, ids: Sequence[str]) -> dict[str, list[DeliveryRow]]:
        return {i: rows for i in ids if (rows := self._rows(i))}

    def lock_and_read(self, ids: Sequence[str]) -> tuple[list[str], dict[str, list[DeliveryRow]]]:
        for i in ids:
            self.locks[i] = self.locks.get(i, 0) + 1
        return list(ids), self.rows(ids)

    def unlock(self, ids: Sequence[str]) -> None:
        for i in ids:
            self.locks[i] -= 1

    def rows_of(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, list[DeliveryRow]]]:
        return {(c, k): {w: self._rows(w) for (w, _, _), r in self.rows_by_key.items()
                         if (r.citizen_id, r.crisis_id) == (c, k)} for c, k in pairs}

    def begin(self, claims: Sequence[tuple[Warning, str, str]], now: datetime) -> dict[RowKey, int]:
        out = {}
        for w, ch, a in claims:
            row = self.rows_by_key.setdefault((w.warning_id, ch, a), Row(w.citizen_id, w.crisis_id, "pending", 0))
            if row.status not in SETTLED:
                row.status, row.attempts = "sending", row.attempts + 1
                out[(w.warning_id, ch, a)] = row.attempts
        return out

    def finish(self, outcomes: Sequence[RowOutcome], now: datetime) -> None:
        if self.fail_finish:
            self.fail_finish -= 1
            self.locks.clear()  # the session, and its locks, are gone
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        for o in outcomes:
            row = self.rows_by_key[o.key]
            row.status, row.attempts = o.status, max(0, row.attempts - (1 if o.uncount else 0))

    def give_up(self, items: Sequence[tuple[Warning, str, str, str]]) -> None:
        for w, ch, a, _ in items:
            row = self.rows_by_key.setdefault((w.warning_id, ch, a), Row(w.citizen_id, w.crisis_id, "pending", 0))
            if row.status not in SETTLED:
                row.status = "gave_up"

    def abandon(self, warning_id: str, reason: str) -> None:
        raise AssertionError("nothing is dead-lettered here")

    def close(self) -> None:
        self.locks.clear()


@dataclass
class ChannelTwin:
    """A channel recording every send; ``answers[address]`` are the errors of its first sends."""

    name: str
    sent: list[tuple[str, str]] = field(default_factory=list)  # (address, idempotency key)
    answers: dict[str, list[Exception]] = field(default_factory=dict)

    def send(self, outbound: Any, address: str, idempotency_key: str) -> Receipt:
        raise AssertionError("the dispatcher sends in rounds")

    def send_many(self, attempts: Sequence[Attempt]) -> list[Sent]:
        out = []
        for a in attempts:
            self.sent.append((a.address, a.idempotency_key))
            pending = self.answers.get(a.address)
            error = pending.pop(0) if pending else None
            out.append(Sent(None if error else Receipt(self.name, "ref"), error, 0.001))
        return out

    def close(self) -> None:
        pass


@dataclass
class PublisherTwin:
    published: list[Outgoing] = field(default_factory=list)

    def publish(self, messages: Iterable[Outgoing]) -> int:
        batch = list(messages)
        self.published += batch
        return len(batch)

    def close(self) -> None:
        pass


def warning(citizen_id: str, crisis_id: str = "quake", kind: WarningKind = "inside", seq: int = 0) -> Warning:
    return Warning(f"w-{uuid.uuid4().hex}", citizen_id, crisis_id, 1, kind, "extreme", "Earthquake",
                   "Drop, cover, hold on", 0.0, -8.65, 115.2, T0, T0 + timedelta(seconds=seq), ("ID",))


def messages(warnings: Sequence[Warning]) -> list[Message]:
    return [Message("warnings", 0, n, o.key, o.value) for n, w in enumerate(warnings) for o in [outgoing(w, "warnings")]]


def dispatcher(table: TableTwin, channels: dict[str, ChannelTwin], publisher: PublisherTwin,
               concurrency: int = 4) -> tuple[Dispatcher, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = Settings(database_url=Secret("postgresql://unused"), dispatch_concurrency=concurrency,
                        dispatch_max_attempts=2, dispatch_retry_initial_s=0.001, dispatch_retry_max_s=0.002)
    d = Dispatcher(settings, DispatchMetrics(registry), channels=channels, publisher=publisher,  # type: ignore[arg-type]
                   backoff=Backoff(0.001, 0.001))
    d.store = table  # type: ignore[assignment]
    return d, registry


def contacts(n: int, *channels: str) -> dict[str, CitizenContact]:
    return {f"c{i}": CitizenContact(f"c{i}", f"Citizen {i}", "en", tuple((ch, f"{ch}:{i}") for ch in channels))
            for i in range(n)}


def test_postgresql_failing_mid_round_loses_nothing_and_resends_with_the_same_key() -> None:
    table = TableTwin(contacts(6, "webhook"), fail_finish=1)
    hook, publisher = ChannelTwin("webhook"), PublisherTwin()
    warnings = [warning(f"c{i}", seq=s) for s in range(2) for i in range(6)]
    d, registry = dispatcher(table, {"webhook": hook}, publisher)
    d.handle(messages(warnings), threading.Event())

    assert {r.status for r in table.rows_by_key.values()} == {"delivered"} and len(table.rows_by_key) == 12
    keys = [key for _, key in hook.sent]
    assert set(keys) == {w.warning_id for w in warnings}
    # The round whose outcomes were lost (4 at once) is sent again, with the same keys; nothing else.
    assert len(keys) - len(set(keys)) == 4
    assert registry.get_sample_value("crisiswatch_dispatch_outages_total", {"dependency": "postgresql"}) == 1
    assert registry.get_sample_value("crisiswatch_dispatch_warnings_total", {"outcome": "delivered"}) == 12
    events = [decode(m.value) for m in publisher.published]
    assert sorted(e.warning_id for e in events) == sorted(w.warning_id for w in warnings)  # type: ignore[attr-defined]
    assert not any(table.locks.values())  # every lock released


def test_each_citizens_warnings_go_in_order_and_the_all_clear_last() -> None:
    table = TableTwin(contacts(3, "webhook"))
    hook = ChannelTwin("webhook", answers={"webhook:1": [TransientError("503")]})
    by_citizen = {c: [warning(c, seq=0), warning(c, seq=1), warning(c, kind="all_clear", seq=2)] for c in ("c0", "c1", "c2")}
    interleaved = [ws[n] for n in range(3) for ws in by_citizen.values()]
    d, _ = dispatcher(table, {"webhook": hook}, PublisherTwin(), concurrency=2)
    d.handle(messages(interleaved), threading.Event())

    for i, (citizen, ws) in enumerate(by_citizen.items()):
        got = list(dict.fromkeys(key for address, key in hook.sent if address == f"webhook:{i}"))
        assert got == [w.warning_id for w in ws], citizen
    assert [key for address, key in hook.sent if address == "webhook:1"].count(by_citizen["c1"][0].warning_id) == 2


def test_a_channel_that_refuses_falls_back_to_the_next_and_an_unconfigured_one_is_passed_over() -> None:
    table = TableTwin({"c0": CitizenContact("c0", "Ayu", "id", (("sms", "+62811"), ("webhook", "hook:0"), ("email", "a@x.org")))})
    hook = ChannelTwin("webhook", answers={"hook:0": [PermanentError("HTTP 410")]})
    mail = ChannelTwin("email")
    w = warning("c0")
    d, registry = dispatcher(table, {"webhook": hook, "email": mail}, PublisherTwin())
    d.handle(messages([w]), threading.Event())

    statuses = {ch: r.status for (_, ch, _), r in table.rows_by_key.items()}
    assert statuses == {"sms": "gave_up", "webhook": "gave_up", "email": "delivered"}
    assert mail.sent == [("a@x.org", w.warning_id)]
    assert registry.get_sample_value("crisiswatch_dispatch_attempts_total",
                                     {"channel": "sms", "outcome": "not_configured"}) == 1
