"""The geofence engine run over a recorded timeline, with no broker: what the pipeline would emit.

Events are applied in time order: crisis events at their ``effective`` time, check-ins at their
``observed_at``, a crisis event first on a tie; a crisis whose ``expires`` has passed ends (with
all-clears) just before the first event after its expiry. ``emitted_at`` of every warning is the
time of the event that triggered it (the expiry time for all-clears on expiry).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from pipeline.domain.tracking import CitizenState, GeofenceConfig, Outcome, Tracker
from schemas import Checkin, Crisis, Warning


def _order(events: Iterable[Crisis | Checkin]) -> list[tuple[datetime, int, int, Crisis | Checkin]]:
    keyed: list[tuple[datetime, int, int, Crisis | Checkin]] = []
    for n, event in enumerate(events):
        if isinstance(event, Crisis):
            keyed.append((event.effective, 0, n, event))
        else:
            keyed.append((event.observed_at, 1, n, event))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return keyed


class Timeline:
    """A tracker plus the citizen states, for offline runs and tests."""

    def __init__(self, config: GeofenceConfig | None = None) -> None:
        self.tracker = Tracker(config)
        self.states: dict[str, CitizenState] = {}

    def _by_citizen(self) -> list[CitizenState]:
        """Citizens in id order, so simultaneous warnings come out in a stable, readable order."""
        return [self.states[k] for k in sorted(self.states)]

    def _apply(self, outcome: Outcome) -> tuple[Warning, ...]:
        self.states.update(outcome.states)
        return outcome.warnings

    def expire_until(self, when: datetime) -> Iterator[Warning]:
        due = sorted((c.expires, c.crisis_id) for c in self.tracker.crises.values()
                     if c.expires is not None and c.expires <= when)
        for expires, crisis_id in due:
            ended = self.tracker.end(crisis_id, self.tracker.crises[crisis_id].version)
            if ended is not None:
                yield from self._apply(self.tracker.on_end(ended, self._by_citizen(), expires))

    def crisis(self, crisis: Crisis, now: datetime) -> tuple[Warning, ...]:
        if crisis.op == "cancel":
            ended = self.tracker.end(crisis.crisis_id, crisis.version)
            if ended is None:
                return ()
            return self._apply(self.tracker.on_end(ended, self._by_citizen(), now))
        if not self.tracker.accept(crisis):
            return ()
        return self._apply(self.tracker.on_upsert(crisis, self._by_citizen(), now))

    def checkins(self, batch: list[Checkin], now: datetime | None = None) -> tuple[Warning, ...]:
        return self._apply(self.tracker.on_checkins(batch, self.states, now))

    def run(self, events: Iterable[Crisis | Checkin]) -> Iterator[Warning]:
        batch: list[Checkin] = []
        for when, _, _, event in _order(events):
            if batch and (isinstance(event, Crisis) or any(True for _ in self._due(when))):
                yield from self.checkins(batch)
                batch = []
            yield from self.expire_until(when)
            if isinstance(event, Crisis):
                yield from self.crisis(event, when)
            else:
                batch.append(event)
        yield from self.checkins(batch)

    def _due(self, when: datetime) -> Iterator[Crisis]:
        return (c for c in self.tracker.crises.values() if c.expires is not None and c.expires <= when)


def run_timeline(events: Iterable[Crisis | Checkin], config: GeofenceConfig | None = None) -> list[Warning]:
    return list(Timeline(config).run(events))

