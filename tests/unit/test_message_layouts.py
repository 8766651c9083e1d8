"""Cached layouts give the message rendering the templates gives: :func:`pipeline.messages.render`
(templates rendered once per crisis wording, kind, language and minute, the citizen's values put in
afterwards) against :func:`pipeline.messages.render_templates` (the templates rendered for each
citizen), over names, links and distances that need escaping, both languages and every kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.messages import Embassy, Recipient, render, render_templates
from schemas import Warning
from schemas.models import WarningKind

KINDS: tuple[WarningKind, ...] = get_args(WarningKind)
MISSION = Embassy("ID", "KBRI <Sample> & Co", "+62 21 000 000", "mission@embassy.example.org")
T0 = datetime(2025, 3, 4, 10, 6, tzinfo=UTC)

names = st.one_of(st.just(""), st.just("Siti Rahma"), st.just('<b>"Budi" & O\'Neil</b>'),
                  st.text(min_size=1, max_size=40))
links = st.one_of(st.none(), st.just("https://crisis.example.org/r/a?x=1&y=<2>"),
                  st.from_regex(r"https://[a-z]{3,10}\.example\.org/r/[A-Za-z0-9_-]{8,40}", fullmatch=True))


def same(a: object, b: object) -> None:
    assert a == b
    for part in ("language", "subject", "text", "html", "sms", "sms_segments"):
        assert getattr(a, part) == getattr(b, part), part


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), language=st.sampled_from(["id", "en", "fr", "id-ID"]), name=names, link=links,
       distance=st.sampled_from([0.0, 0.004, 0.6, 4.25, 37.0]), embassy=st.sampled_from([MISSION, None]),
       title=st.sampled_from(["Gempa M6.8 <Lombok>", "Flood & landslide", "Banjir"]),
       minutes=st.integers(0, 3), max_segments=st.integers(1, 3))
def test_cached_layouts_render_what_the_templates_render(kind: WarningKind, language: str, name: str, link: str | None,
                                                         distance: float, embassy: Embassy | None, title: str,
                                                         minutes: int, max_segments: int) -> None:
    at = T0 + timedelta(minutes=minutes, seconds=17)
    warning = Warning("w-1", "c-1", "crisis-1", 1, kind, "severe", title, "Move to higher ground & wait.", distance,
                      -8.6, 115.2, at, at, ("ID",))
    recipient = Recipient("c-1", name, language)
    same(render(warning, recipient, embassy=embassy, reply_url=link, sms_max_segments=max_segments),
         render_templates(warning, recipient, embassy=embassy, reply_url=link, sms_max_segments=max_segments))


def test_one_citizens_values_never_leak_into_anothers_message() -> None:
    warning = Warning("w-1", "c-1", "crisis-1", 1, "near", "extreme", "Tsunami", "Go inland.", 2.5, -8.6, 115.2, T0, T0,
                      ("ID",))
    first = render(warning, Recipient("c-1", "Ayu", "en"), embassy=MISSION, reply_url="https://x.example.org/r/aaaa1111")
    second = render(warning, Recipient("c-2", "Wayan", "en"), embassy=MISSION, reply_url="https://x.example.org/r/bbbb2222")
    assert "Ayu" in first.text and "Ayu" not in second.text and "Wayan" in second.html
    assert "aaaa1111" in first.sms and "aaaa1111" not in second.sms + second.text + second.html
