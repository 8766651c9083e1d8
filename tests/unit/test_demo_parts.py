"""The demo's own pieces that decide what it shows: the reply link it takes from a message as the citizen
reads it, and its escalation delays (seconds only for the moderate crisis it declares to show escalation;
the severe and extreme crises of the scenario keep the production delays, so nothing of theirs is re-sent
while the demo checks that each of their warnings arrived exactly once)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from shapely.geometry import Point, shape

from pipeline.demo import DEMO_ESCALATION, REPLY_LINK, square_around
from pipeline.domain.escalation import DEFAULT_ESCALATION, parse_rules
from pipeline.messages import Recipient, render
from pipeline.reply_links import ReplyLinks
from schemas import Warning


@pytest.mark.parametrize("language", ["id", "en"])
def test_the_reply_link_is_found_whole_in_the_message_text(language: str) -> None:
    at = datetime(2026, 3, 4, 10, 6, tzinfo=UTC)
    links = ReplyLinks("secret-for-tests", 3600, lambda: at)
    url = f"http://127.0.0.1:8080/r/{links.sign('c-1', 'cap:warnings@met.example:MD-1')}"
    warning = Warning("w-1", "c-1", "cap:warnings@met.example:MD-1", 1, "inside", "severe", "Banjir", "Naik ke lantai atas.",
                      0.0, 3.14, 101.69, at, at, ("MY",))
    message = render(warning, Recipient("c-1", "Siti", language), embassy=None, reply_url=url)
    found = REPLY_LINK.search(message.text)
    assert found is not None and found.group(0) == url
    token = found.group(0).rsplit("/r/", 1)[1]
    assert (links.verify(token).citizen_id, links.verify(token).crisis_id) == ("c-1", "cap:warnings@met.example:MD-1")


def test_only_the_moderate_crisis_escalates_within_the_demo() -> None:
    demo, production = parse_rules(DEMO_ESCALATION), parse_rules(DEFAULT_ESCALATION)
    assert {k: v for k, v in demo.items() if k != "moderate"} == {k: v for k, v in production.items() if k != "moderate"}
    moderate = demo["moderate"]
    assert moderate.resend_after < moderate.case_after <= timedelta(seconds=30)
    assert min(r.resend_after for k, r in demo.items() if k != "moderate") >= timedelta(minutes=15)


def test_the_escalation_area_is_around_the_chosen_traveller() -> None:
    area = shape(square_around(35.69, 139.70, 0.008))
    assert area.is_valid and area.contains(Point(139.70, 35.69))
    assert not area.contains(Point(139.71, 35.69))
