"""Publishing cases: every case/1 goes to ``cases`` (the sink stores it, operators list it) and, when
where the citizen is is known, to ``cases.<CC>`` for the embassy responsible there (the topic is
created on first use, as the router does for ``warnings.<CC>``).

:func:`open_case` is what any part that opens a case calls (the API for an SOS or a ``need_help``
reply, escalation for a citizen who stays silent); :func:`case_messages` is for a caller that
publishes a case together with other events in one request.
"""

from __future__ import annotations

from datetime import datetime

from pipeline import topics
from pipeline.domain.cases import new_case
from producers.publisher import Outgoing, Publisher, outgoing
from schemas import Case
from schemas.models import CaseKind


def case_messages(case: Case, cases_topic: str = topics.CASES) -> list[Outgoing]:
    """The case on ``cases`` and, with a country, on ``cases.<CC>``."""
    messages = [outgoing(case, cases_topic)]
    if case.country is not None:
        messages.append(outgoing(case, topics.country_case_topic(case.country, cases_topic)))
    return messages


def publish_case(publisher: Publisher, case: Case, cases_topic: str = topics.CASES,
                 others: list[Outgoing] | None = None) -> None:
    """Publish ``case`` (and ``others`` in the same call), creating its country's topic first if need be.
    Raises :class:`~producers.publisher.BrokerUnavailable`."""
    messages = [*(others or []), *case_messages(case, cases_topic)]
    publisher.ensure_topics(m.topic for m in messages if m.topic != cases_topic and m.topic.startswith(cases_topic + "."))
    publisher.publish(messages)


def open_case(publisher: Publisher, *, kind: CaseKind, citizen_id: str, crisis_id: str | None, country: str | None,
              lat: float | None, lon: float | None, note: str | None, now: datetime,
              cases_topic: str = topics.CASES) -> Case:
    """Open a case (deterministic id: opening the same one again publishes the same case) and publish it."""
    case = new_case(kind=kind, citizen_id=citizen_id, crisis_id=crisis_id, country=country, lat=lat, lon=lon,
                    note=note, now=now)
    publish_case(publisher, case, cases_topic)
    return case
