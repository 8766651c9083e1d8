"""A citizen without location_tracking consent is warned by the country of their current trip."""

from __future__ import annotations

from datetime import date

from pipeline.domain.escalation import in_country_due, in_country_id, pre_arrival_id


def test_in_country_only_for_the_untracked_during_their_trip_for_a_severe_crisis() -> None:
    today = date(2025, 3, 1)
    began, ends = date(2025, 2, 25), date(2025, 3, 10)
    assert in_country_due("severe", ("ID",), "ID", began, ends, today, location_tracking=False)
    assert in_country_due("extreme", ("MY", "ID"), "ID", None, None, today, location_tracking=False)
    assert in_country_due("severe", ("ID",), "ID", today, today, today, location_tracking=False)
    assert not in_country_due("severe", ("ID",), "ID", began, ends, today, location_tracking=True)  # warned by where they are
    assert not in_country_due("moderate", ("ID",), "ID", began, ends, today, location_tracking=False)
    assert not in_country_due("severe", ("MY",), "ID", began, ends, today, location_tracking=False)
    assert not in_country_due("severe", ("ID",), "ID", date(2025, 3, 5), None, today, location_tracking=False)  # not begun
    assert not in_country_due("severe", ("ID",), "ID", began, date(2025, 2, 28), today, location_tracking=False)  # over
    assert not in_country_due("severe", ("ID",), None, None, None, today, location_tracking=False)


def test_one_in_country_warning_per_citizen_and_crisis_apart_from_the_pre_arrival_one() -> None:
    assert in_country_id("c1", "k1") == in_country_id("c1", "k1") != in_country_id("c2", "k1")
    assert in_country_id("c1", "k1") != pre_arrival_id("c1", "k1")


def test_the_in_country_message_says_so_in_every_language() -> None:
    from datetime import UTC, datetime

    from pipeline.messages import Recipient, render
    from schemas import Warning

    at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    warning = Warning(in_country_id("c1", "k1"), "c1", "k1", 1, "in_country", "severe", "Flooding", "Move up", 0.0,
                      -6.2, 106.8, at, at, ("ID",))
    english = render(warning, Recipient("c1", "Sari", "en"), embassy=None, reply_url=None)
    assert "country of your trip" in english.subject and "country of your registered trip" in english.text
    indonesian = render(warning, Recipient("c1", "Sari", "id"), embassy=None, reply_url=None)
    assert "negara tujuan" in indonesian.subject and "negara tujuan perjalanan" in indonesian.text
