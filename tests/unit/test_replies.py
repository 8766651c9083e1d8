"""Replies and cases, pure: reply-link tokens on an injected clock, SMS keywords, phone numbers, case
ids and an operator's changes, the case/1 schema's examples, and the reply page's policy."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest

from pipeline.domain.cases import CaseChangeError, case_id_for, change, country_at, new_case
from pipeline.domain.replies import KeywordReply, normalise_phone, parse_keyword
from pipeline.reply_links import ReplyLinks, ReplyTokenError, make_reply_url
from pipeline.settings import Secret, Settings
from producers.reply_pages import SECURITY_HEADERS, ask_page, problem_page, thanks_page
from schemas import Case, check, decode, encode

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
WEEK = 7 * 24 * 3600


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- reply tokens ------------------------------------------------------------------------------


def test_a_token_names_its_citizen_and_crisis_until_it_expires() -> None:
    clock = Clock(T0)
    links = ReplyLinks("s3cret", WEEK, clock)
    token = links.sign("c-1", "op-flood")

    clock.now = T0 + timedelta(days=6, hours=23)
    verified = links.verify(token)
    assert (verified.citizen_id, verified.crisis_id, verified.signed_at) == ("c-1", "op-flood", T0)

    clock.now = T0 + timedelta(days=7, seconds=1)
    with pytest.raises(ReplyTokenError) as expired:
        links.verify(token)
    assert expired.value.status == 410 and "expired" in expired.value.reason


def test_forged_altered_and_foreign_tokens_are_refused() -> None:
    clock = Clock(T0)
    links = ReplyLinks("s3cret", WEEK, clock)
    token = links.sign("c-1", "op-flood")
    payload, stamp, signature = token.split(".")
    other_payload = base64.urlsafe_b64encode(json.dumps(["c-2", "op-flood"]).encode()).decode().rstrip("=")

    for bad in (f"{other_payload}.{stamp}.{signature}",  # someone else's reply under this signature
                f"{payload}.{stamp}.{signature[:-2]}xx",
                ReplyLinks("another deployment", WEEK, clock).sign("c-1", "op-flood"),
                "", "not-a-token", token + "x"):
        with pytest.raises(ReplyTokenError) as refused:
            links.verify(bad)
        assert refused.value.status == 400, bad


def test_tokens_are_unguessable_and_url_safe() -> None:
    links = ReplyLinks("s3cret", WEEK, Clock(T0))
    tokens = {links.sign(f"c-{i}", "op-1") for i in range(50)}
    assert len(tokens) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", t) for t in tokens)


def test_the_reply_url_uses_the_public_url_or_the_api_address() -> None:
    clock = Clock(T0)
    own = Settings(reply_secret=Secret("k"), api_host="10.0.0.5", api_port=8080)
    assert make_reply_url(own, "c-1", "op-1", clock).startswith("http://10.0.0.5:8080/r/")
    public = Settings(reply_secret=Secret("k"), public_url="https://lapor.example.go.id")
    url = make_reply_url(public, "c-1", "op-1", clock)
    assert url.startswith("https://lapor.example.go.id/r/")
    assert ReplyLinks("k", WEEK, clock).verify(url.rsplit("/", 1)[1]).citizen_id == "c-1"
    with pytest.raises(ValueError, match="CRISISWATCH_REPLY_SECRET"):
        make_reply_url(Settings(), "c-1", "op-1", clock)


def test_reply_settings_from_the_environment() -> None:
    settings = Settings.from_env({"CRISISWATCH_REPLY_SECRET": "zebra-secret", "CRISISWATCH_REPLY_TTL_S": "3600",
                                  "CRISISWATCH_PUBLIC_URL": "https://lapor.example.go.id/"})
    assert (settings.reply_secret.get(), settings.reply_ttl_s, settings.public_url) == \
        ("zebra-secret", 3600.0, "https://lapor.example.go.id")
    assert Settings.from_env(settings.env()) == settings
    assert "zebra" not in repr(settings)


# --- SMS keywords and numbers ------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [
    ("AMAN", KeywordReply("safe", None)),
    ("  aman  ", KeywordReply("safe", None)),
    ("Safe.", KeywordReply("safe", None)),
    ("tolong saya di lantai 3", KeywordReply("need_help", "saya di lantai 3")),
    ("HELP!\nwater rising", KeywordReply("need_help", "water rising")),
    ("\tHeLp", KeywordReply("need_help", None)),
])
def test_the_first_word_is_the_reply_and_the_rest_a_note(body: str, expected: KeywordReply) -> None:
    assert parse_keyword(body) == expected


@pytest.mark.parametrize("body", ["", "   ", "OK", "saya aman", "AMANKAN", "helpful", "STOP"])
def test_anything_else_is_no_reply(body: str) -> None:
    assert parse_keyword(body) is None


@pytest.mark.parametrize(("raw", "expected"), [
    ("+628123456789", "+628123456789"),
    ("+62 812-3456-789", "+628123456789"),
    ("0062 (812) 345.6789", "+628123456789"),
    ("+1 555 010 9999", "+15550109999"),
    ("08123456789", None),
    ("+0123456789", None),
    ("+12", None),
    ("+1234567890123456", None),
    ("+62 812 abc", None),
])
def test_numbers_are_compared_in_e164(raw: str, expected: str | None) -> None:
    assert normalise_phone(raw) == expected


# --- cases ---------------------------------------------------------------------------------------


def test_case_ids_are_one_per_reply_and_one_per_sos_press() -> None:
    later = T0 + timedelta(minutes=5)
    assert case_id_for("need_help", "c-1", "op-1", T0) == case_id_for("need_help", "c-1", "op-1", later)
    assert case_id_for("need_help", "c-1", "op-1", T0) != case_id_for("need_help", "c-1", "op-2", T0)
    assert case_id_for("need_help", "c-1", "op-1", T0) != case_id_for("escalation", "c-1", "op-1", T0)
    assert case_id_for("sos", "c-1", None, T0) == case_id_for("sos", "c-1", None, T0)
    assert case_id_for("sos", "c-1", None, T0) != case_id_for("sos", "c-1", None, later)
    assert case_id_for("need_help", "c-1", "op-1", T0).startswith("case-need-help-")


def test_a_new_case_is_a_valid_case_event() -> None:
    case = new_case(kind="sos", citizen_id="c-1", crisis_id=None, country=country_at(35.68, 139.76), lat=35.68,
                    lon=139.76, note=None, now=T0)
    assert (case.state, case.country, case.note, case.opened_at, case.updated_at) == ("open", "JP", "", T0, T0)
    assert decode(encode(case), Case) == case
    assert country_at(0.0, -140.0) is None and country_at(None, None) is None


def test_operators_move_a_case_forward_in_time() -> None:
    case = new_case(kind="need_help", citizen_id="c-1", crisis_id="op-1", country="MY", lat=3.1, lon=101.7,
                    note="trapped", now=T0)
    assigned = change(case, state="assigned", assignee=" KBRI duty officer ", note=None, now=T0 + timedelta(minutes=3))
    assert (assigned.state, assigned.assignee, assigned.note) == ("assigned", "KBRI duty officer", "trapped")
    closed = change(assigned, state="closed", assignee=None, note="reached by phone, safe", now=T0)  # clock behind
    assert (closed.state, closed.assignee, closed.note) == ("closed", "KBRI duty officer", "reached by phone, safe")
    assert closed.updated_at > assigned.updated_at
    assert change(closed, state="open", assignee=None, note=None, now=T0).assignee is None


@pytest.mark.parametrize(("state", "assignee", "field"), [
    ("assigned", None, "$.assignee"), ("assigned", "  ", "$.assignee"), ("resolved", None, "$.state")])
def test_impossible_changes_are_refused_with_the_field(state: str, assignee: str | None, field: str) -> None:
    case = new_case(kind="sos", citizen_id="c-1", crisis_id=None, country=None, lat=None, lon=None, note="", now=T0)
    with pytest.raises(CaseChangeError) as refused:
        change(case, state=state, assignee=assignee, note=None, now=T0)
    assert refused.value.field == field


def test_the_schema_examples_are_valid_cases() -> None:
    schema = json.loads(resources.files("schemas").joinpath("json", "case-1.schema.json").read_text("utf-8"))
    assert len(schema["examples"]) == 3
    for example in schema["examples"]:
        assert check(example, "case/1") == "case/1"
        assert Case.from_dict(example).to_dict() == example


# --- the reply page --------------------------------------------------------------------------------


def test_the_pages_load_nothing_and_the_policy_allows_only_their_own_style() -> None:
    for html in (ask_page("Banjir <b>Jakarta</b>"), thanks_page("safe"), thanks_page("need_help"),
                 problem_page("<script>alert(1)</script>")):
        assert "<script" not in html and "src=" not in html and "http" not in html.split("</head>")[1]
        [style] = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert f"style-src 'sha256-{digest}'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert "Banjir &lt;b&gt;Jakarta&lt;/b&gt;" in ask_page("Banjir <b>Jakarta</b>")
    ask = ask_page()
    assert 'value="safe"' in ask and 'value="need_help"' in ask and 'method="post"' in ask
    assert "Saya aman" in ask and "Saya butuh bantuan" in ask
    assert SECURITY_HEADERS["Referrer-Policy"] == "no-referrer" and "frame-ancestors 'none'" in \
        SECURITY_HEADERS["Content-Security-Policy"]


def test_the_dispatcher_renders_each_message_with_the_citizens_own_link() -> None:
    from functools import partial

    from consumers.dispatch import CitizenContact, compose
    from pipeline.messages import EmbassyDirectory
    from schemas import Warning

    warning = Warning("w-1", "c-1", "op-flood", 1, "inside", "severe", "Banjir Jakarta", "Naik ke tempat tinggi", 0.0,
                      -6.2, 106.8, T0, T0, ("ID",))
    citizen = CitizenContact("c-1", "Siti", "id", (("sms", "+628123456789"),))
    settings = Settings(reply_secret=Secret("k"), public_url="https://lapor.example.go.id")
    clock = Clock(T0)

    message = compose(warning, citizen, EmbassyDirectory.load(), partial(make_reply_url, settings, clock=clock))
    [token] = re.findall(r"https://lapor\.example\.go\.id/r/([A-Za-z0-9_.\-]+)", message.sms)
    assert token in message.text and token in message.html
    verified = ReplyLinks("k", WEEK, clock).verify(token)
    assert (verified.citizen_id, verified.crisis_id) == ("c-1", "op-flood")
    assert "/r/" not in compose(warning, citizen, EmbassyDirectory.load()).text
