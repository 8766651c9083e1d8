"""The messages a citizen receives: a warning rendered in their language, for every channel.

A warning that reaches a phone but cannot be read protects nobody, so each message says, in the
citizen's language, what happened, where, how far they are (where that means something), what to
do, how to answer ("are you safe?") and whom to call: the embassy responsible for the country.

Why here and not in ``pipeline/domain``: rendering uses Jinja2 and Babel, which the domain's
layering rule keeps out (tests/unit/test_layering.py). It is still pure: no I/O beyond reading the
templates and the directory file that ship with the package (or that the operator names); the
dispatcher calls :func:`render` and only moves the result.

The words live in templates, one ``words.j2`` per language under ``pipeline/templates/messages/``
(Bahasa Indonesia and English today); the layouts (plain text, HTML) are shared. A citizen's
``language`` chooses by its BCP 47 primary subtag, English when there is no template for it.
HTML is autoescaped; the SMS body is assembled so that, cut to ``sms_max_segments``, it keeps
the reply keywords and the reply link and loses the end of the explanation instead.

SMS length follows 3GPP TS 23.038: a body in the GSM 7-bit alphabet takes 160 septets in one
segment and 153 per segment when concatenated (characters of the extension table, ``€[]{}^~|\\``,
take two septets and are never split across segments); one character outside it makes the whole
body UCS-2: 70 UTF-16 units in one segment, 67 per segment, an emoji taking two.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import gsm0338  # registers the "gsm03.38" codec
import jinja2
import markupsafe
import pycountry
from babel import Locale
from babel.dates import format_datetime
from babel.lists import format_list
from babel.numbers import format_decimal

from schemas import Warning

__all__ = [
    "DEFAULT_LANGUAGE",
    "Embassy",
    "EmbassyDirectory",
    "EmbassyDirectoryError",
    "Recipient",
    "RenderedMessage",
    "available_languages",
    "language_for",
    "render",
    "render_templates",
    "sms_segments",
]

DEFAULT_LANGUAGE = "en"
SAMPLE_DIRECTORY = "data/embassies.sample.toml"

# Deprecated ISO 639 codes still sent by older phones and systems, to the code the templates use.
_LANGUAGE_ALIASES = {"in": "id"}

# Kinds where "how far" is meaningful: inside/entered are in the area, an all-clear is over.
_DISTANCE_KINDS = frozenset({"near", "exited"})

_GSM_CODEC = "gsm03.38"
assert gsm0338  # the import is for its side effect: the codec above
GSM_SINGLE_SEGMENT, GSM_CONCAT_SEGMENT = 160, 153
UCS2_SINGLE_SEGMENT, UCS2_CONCAT_SEGMENT = 70, 67

# Typographic characters outside GSM-7 that would otherwise turn a whole SMS into UCS-2 (halving
# what fits), replaced by their plain equivalents before the body is measured.
_SMS_PLAIN = str.maketrans({
    "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"',
    "\u201d": '"', "\u201e": '"', "\u2026": "...", "\u00a0": " ", "\u202f": " ", "\u2009": " ", "\t": " ",
    "\u00b7": "-", "\u2022": "-",
})


# --- the embassy directory -----------------------------------------------------------------------


class EmbassyDirectoryError(ValueError):
    """The embassy directory file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Embassy:
    """One mission: the embassy (or consulate) responsible for a country."""

    country: str  # ISO 3166-1 alpha-2 of the country it covers
    name: str
    phone: str
    email: str


_PHONE = re.compile(r"\+?[0-9][0-9 ().\-]{4,30}")
_EMAIL = re.compile(r"[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"'.]+")
_MISSION_KEYS = frozenset({"country", "name", "phone", "email"})


@dataclass(frozen=True, slots=True)
class EmbassyDirectory:
    """Country → responsible mission, loaded from a TOML file of ``[[mission]]`` tables.

    The shipped sample (``pipeline/data/embassies.sample.toml``) has example entries whose numbers
    and addresses reach nobody; a deployment names its own file (CRISISWATCH_EMBASSY_DIRECTORY).
    """

    by_country: Mapping[str, Embassy]

    @classmethod
    def load(cls, path: Path | None = None) -> EmbassyDirectory:
        """Read and check a directory file; ``None`` loads the shipped sample."""
        if path is None:
            source = f"pipeline/{SAMPLE_DIRECTORY} (shipped sample)"
            text = resources.files("pipeline").joinpath(SAMPLE_DIRECTORY).read_text(encoding="utf-8")
        else:
            source = str(path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise EmbassyDirectoryError(f"embassy directory {source}: cannot read it: {exc}") from None
        return cls.parse(text, source=source)

    @classmethod
    def parse(cls, text: str, *, source: str = "<text>") -> EmbassyDirectory:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise EmbassyDirectoryError(f"embassy directory {source}: not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - {"mission"})
        if unknown:
            raise EmbassyDirectoryError(f"embassy directory {source}: unknown top-level key(s) {unknown}; expected [[mission]] tables")
        missions = doc.get("mission", [])
        if not isinstance(missions, list) or not missions:
            raise EmbassyDirectoryError(f"embassy directory {source}: no [[mission]] entries")
        by_country: dict[str, Embassy] = {}
        for number, entry in enumerate(missions, start=1):
            embassy = _embassy(entry, f"embassy directory {source}, mission {number}")
            if embassy.country in by_country:
                raise EmbassyDirectoryError(f"embassy directory {source}, mission {number}: country {embassy.country} "
                                            f"is already covered by {by_country[embassy.country].name!r}")
            by_country[embassy.country] = embassy
        return cls(MappingProxyType(by_country))

    def for_country(self, country: str | None) -> Embassy | None:
        """The mission responsible for a country (ISO alpha-2, any case), if the directory has one."""
        if not country:
            return None
        return self.by_country.get(country.strip().upper())

    def __len__(self) -> int:
        return len(self.by_country)


def _embassy(entry: Any, where: str) -> Embassy:
    if not isinstance(entry, dict):
        raise EmbassyDirectoryError(f"{where}: expected a table with country, name, phone, email")
    unknown = sorted(set(entry) - _MISSION_KEYS)
    if unknown:
        raise EmbassyDirectoryError(f"{where}: unknown key(s) {unknown}; expected country, name, phone, email")
    missing = sorted(k for k in _MISSION_KEYS if k not in entry)
    if missing:
        raise EmbassyDirectoryError(f"{where}: missing {', '.join(missing)}")
    values: dict[str, str] = {}
    for key in sorted(_MISSION_KEYS):
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise EmbassyDirectoryError(f"{where}: {key} must be a non-empty string, got {value!r}")
        values[key] = value.strip()
    country = values["country"].upper()
    if len(country) != 2 or pycountry.countries.get(alpha_2=country) is None:
        raise EmbassyDirectoryError(f"{where}: country {values['country']!r} is not an ISO 3166-1 alpha-2 code")
    if not _PHONE.fullmatch(values["phone"]):
        raise EmbassyDirectoryError(f"{where} ({country}): phone {values['phone']!r} is not a phone number "
                                    "(digits, spaces, ()-. and an optional leading +)")
    if not _EMAIL.fullmatch(values["email"]):
        raise EmbassyDirectoryError(f"{where} ({country}): email {values['email']!r} is not an e-mail address")
    return Embassy(country, values["name"], values["phone"], values["email"])


# --- rendering -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipient:
    """What rendering needs of a citizen (from ``citizen/1``)."""

    citizen_id: str
    name: str
    language: str  # BCP 47 ("id", "en", "id-ID"); a language without templates gets English


class SmsBody:
    """An SMS body, fitted to its segments when first read: fitting costs more than the rest of a
    message, and only the SMS channel reads it."""

    __slots__ = ("_body", "_parts")

    def __init__(self, *, head: str, replies: str, contact: str, max_segments: int) -> None:
        self._parts = (head, replies, contact, max_segments)
        self._body: str | None = None

    @property
    def body(self) -> str:
        if self._body is None:
            head, replies, contact, max_segments = self._parts
            self._body = _fit_sms(head=head, replies=replies, contact=contact, max_segments=max_segments)
        return self._body


@dataclass(frozen=True)  # not slotted: a slotted frozen class lets a property be set with a TypeError, not FrozenInstanceError
class RenderedMessage:
    language: str  # the language actually used ("id", "en", ...)
    subject: str  # e-mail subject / push title
    text: str  # plain-text body: e-mail text part, webhook, push body
    html: str  # HTML body (e-mail html part), autoescaped
    sms_body: SmsBody = field(repr=False, compare=False)

    @property
    def sms(self) -> str:
        """SMS body, within sms_max_segments."""
        return self.sms_body.body

    @property
    def sms_segments(self) -> int:
        """Segments the SMS body takes."""
        return sms_segments(self.sms)


@functools.cache
def _environment(html: bool) -> jinja2.Environment:
    # Two environments, not one with autoescape by file extension: a macro is compiled with the
    # autoescape of the file that defines it (words.j2), so only an environment that escapes
    # everything escapes a title interpolated inside a macro called from the HTML layout.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates/messages"),
        autoescape=html,  # noqa: S701 -- the other environment renders plain text (SMS, text part), never HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        auto_reload=False,  # the templates are package data: no stat per render
    )


@functools.cache
def available_languages() -> frozenset[str]:
    """Languages with a ``words.j2`` of their own."""
    root = resources.files("pipeline").joinpath("templates/messages")
    return frozenset(entry.name for entry in root.iterdir() if entry.is_dir() and entry.joinpath("words.j2").is_file())


def language_for(tag: str | None) -> str:
    """The template language for a BCP 47 tag: its primary subtag when there are templates for it, else English."""
    primary = (tag or "").strip().replace("_", "-").split("-")[0].lower()
    primary = _LANGUAGE_ALIASES.get(primary, primary)
    return primary if primary in available_languages() else DEFAULT_LANGUAGE


def render(warning: Warning, recipient: Recipient, *, embassy: Embassy | None,
           reply_url: str | None, sms_max_segments: int = 2) -> RenderedMessage:
    """The message for one warning to one citizen, in every channel's form.

    ``reply_url`` is the citizen's own answer link (carrying their signed token); only http(s)
    links are accepted. ``sms_max_segments`` bounds the SMS body: the explanation is cut, with an
    ellipsis, before the reply keywords, the link or the embassy's number would be.

    The templates are rendered once per crisis wording, kind, language, embassy and minute of issue
    (:func:`_layout`, a bounded cache) with markers where the citizen's name, reply link and distance
    go; each message is that layout with this citizen's values put in, HTML-escaped in the HTML part
    — what rendering the templates for this citizen gives (a test compares the two), at a fraction
    of the cost when a crisis warns thousands of people.
    """
    if sms_max_segments < 1:
        raise ValueError(f"sms_max_segments must be >= 1, got {sms_max_segments}")
    if reply_url is not None and urlsplit(reply_url).scheme not in ("https", "http"):
        raise ValueError(f"reply_url must be an http(s) link, got {reply_url!r}")
    language = language_for(recipient.language)
    distance = _distance(warning, language) if warning.kind in _DISTANCE_KINDS else None
    layout = _layout(language, warning.kind, warning.title, warning.severity, warning.instruction, warning.country_codes,
                     embassy, _issued(warning.emitted_at, language), bool(recipient.name), reply_url is not None,
                     distance is not None)
    values = {_NAME: recipient.name, _REPLY_URL: reply_url or "", _DISTANCE: distance or ""}
    escaped = {marker: str(markupsafe.escape(value)) for marker, value in values.items()}
    headline = _fill(layout.headline, values)
    return RenderedMessage(language, layout.subject, _fill(layout.text, values), _fill(layout.html, escaped), SmsBody(
        head=_one_line(f"{headline} {warning.instruction}"),
        replies=_one_line(f"{layout.reply_sms_short}{': ' + reply_url if reply_url else '.'}"),
        contact=layout.contact, max_segments=sms_max_segments))


def render_templates(warning: Warning, recipient: Recipient, *, embassy: Embassy | None,
                     reply_url: str | None, sms_max_segments: int = 2) -> RenderedMessage:
    """:func:`render` without the layout cache: the templates rendered for this one citizen. The
    reference :func:`render` is checked against."""
    language = language_for(recipient.language)
    words = _environment(html=False).get_template(f"{language}/words.j2").module
    place = _place(warning.country_codes, language)
    distance = _distance(warning, language) if warning.kind in _DISTANCE_KINDS else None
    subject = _one_line(str(words.subject(warning.kind, warning.title, warning.severity)))  # type: ignore[attr-defined]
    context = {
        "language": language, "subject": subject, "kind": warning.kind, "title": warning.title,
        "instruction": warning.instruction, "severity": warning.severity, "place": place, "distance": distance,
        "name": recipient.name, "embassy": embassy, "reply_url": reply_url,
        "issued": _issued(warning.emitted_at, language),
    }
    text = _environment(html=False).get_template("text.txt").render(context).strip() + "\n"
    html = _environment(html=True).get_template("body.html").render(context).strip() + "\n"
    headline = str(words.headline(warning.kind, warning.title, place, distance))  # type: ignore[attr-defined]
    return RenderedMessage(language, subject, text, html, SmsBody(
        head=_one_line(f"{headline} {warning.instruction}"),
        replies=_one_line(f"{words.reply_sms_short()}{': ' + reply_url if reply_url else '.'}"),  # type: ignore[attr-defined]
        contact=_one_line(str(words.embassy_short(embassy.name, embassy.phone))) if embassy else "",  # type: ignore[attr-defined]
        max_segments=sms_max_segments))


# Markers standing for a citizen's values in a cached layout: letters and digits only, so autoescaping
# leaves them as they are; a random part per process, so no title or instruction can contain one.
_MARKER_KEY = secrets.token_hex(6)
_NAME, _REPLY_URL, _DISTANCE = (f"zq{_MARKER_KEY}{slot}qz" for slot in ("n", "r", "d"))
_MARKERS = re.compile(f"zq{_MARKER_KEY}[nrd]qz")


def _fill(layout: str, values: Mapping[str, str]) -> str:
    """The layout with each marker replaced by its value, in one pass (a value is never read again)."""
    return _MARKERS.sub(lambda m: values[m.group(0)], layout)


@dataclass(frozen=True, slots=True)
class _Layout:
    subject: str
    text: str
    html: str
    headline: str
    reply_sms_short: str
    contact: str


@functools.lru_cache(maxsize=2048)
def _layout(language: str, kind: str, title: str, severity: str, instruction: str, country_codes: tuple[str, ...],
            embassy: Embassy | None, issued: str, named: bool, linked: bool, distant: bool) -> _Layout:
    """The templates rendered with markers for the citizen's values; which of them are present is part
    of the key (the templates say "Hello," without a name, leave out the link without one)."""
    words = _environment(html=False).get_template(f"{language}/words.j2").module
    place = _place(country_codes, language)
    distance = _DISTANCE if distant else None
    subject = _one_line(str(words.subject(kind, title, severity)))  # type: ignore[attr-defined]
    context = {
        "language": language, "subject": subject, "kind": kind, "title": title, "instruction": instruction,
        "severity": severity, "place": place, "distance": distance, "name": _NAME if named else "",
        "embassy": embassy, "reply_url": _REPLY_URL if linked else None, "issued": issued,
    }
    text = _environment(html=False).get_template("text.txt").render(context).strip() + "\n"
    html = _environment(html=True).get_template("body.html").render(context).strip() + "\n"
    headline = str(words.headline(kind, title, place, distance))  # type: ignore[attr-defined]
    contact = _one_line(str(words.embassy_short(embassy.name, embassy.phone))) if embassy else ""  # type: ignore[attr-defined]
    return _Layout(subject, text, html, headline, str(words.reply_sms_short()), contact)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4096)
def _issued(emitted_at: datetime, language: str) -> str:
    return format_datetime(emitted_at.astimezone(UTC), "d MMM y, HH:mm 'UTC'", tzinfo=UTC, locale=language)


def _place(country_codes: tuple[str, ...], language: str) -> str:
    names = [_country_name(code, language) for code in country_codes]
    return format_list(names, locale=language) if names else ""


def _country_name(code: str, language: str) -> str:
    iso2 = code.strip().upper()
    name = Locale.parse(language).territories.get(iso2)
    if name:
        return str(name)
    found = pycountry.countries.get(alpha_2=iso2)
    return str(found.name) if found is not None else iso2


def _distance(warning: Warning, language: str) -> str | None:
    """How far, in the language's number format; ``None`` where there is no meaningful distance.

    Under a kilometre it is said in metres (rounded to 10 m, at least 10 m), under 10 km with one
    decimal, beyond that in whole kilometres: never "0.00 km".
    """
    km = warning.distance_km
    if not math.isfinite(km) or km <= 0:
        return None
    if km < 1:
        return f"{max(10, round(km * 100) * 10)} m"
    pattern = "#,##0.#" if km < 10 else "#,##0"
    return f"{format_decimal(km, format=pattern, locale=language)} km"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- SMS -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _gsm_septets(char: str) -> int | None:
    """Septets a character takes in the GSM 7-bit alphabet (2 for the extension table), None outside it."""
    try:
        return len(char.encode(_GSM_CODEC))
    except UnicodeEncodeError:
        return None


def _units(text: str) -> tuple[list[int], bool]:
    """Per-character cost and whether the text can go as GSM-7 (else UCS-2, in UTF-16 units)."""
    septets = [_gsm_septets(c) for c in text]
    if all(s is not None for s in septets):
        return [s for s in septets if s is not None], True
    return [len(c.encode("utf-16-le")) // 2 for c in text], False


def sms_segments(text: str) -> int:
    """How many SMS segments ``text`` takes (3GPP TS 23.038; see the module docstring)."""
    costs, gsm = _units(text)
    single, concat = (GSM_SINGLE_SEGMENT, GSM_CONCAT_SEGMENT) if gsm else (UCS2_SINGLE_SEGMENT, UCS2_CONCAT_SEGMENT)
    if sum(costs) <= single:
        return 1
    # Concatenated: a two-unit character (an escape sequence, a surrogate pair) never straddles two segments.
    segments, used = 1, 0
    for cost in costs:
        if used + cost > concat:
            segments, used = segments + 1, 0
        used += cost
    return segments


def _sms_plain(text: str) -> str:
    """Typographic characters replaced so that an otherwise GSM-7 body stays GSM-7."""
    plain = unicodedata.normalize("NFC", text).translate(_SMS_PLAIN)
    return "".join(c for c in plain if c == " " or unicodedata.category(c)[0] != "C")


def _fit_sms(*, head: str, replies: str, contact: str, max_segments: int) -> str:
    """The SMS body within ``max_segments``: the head (what happened, what to do) is cut first, with an
    ellipsis; then the embassy contact goes; the reply keywords and link are kept whole as long as they fit."""
    head, replies, contact = _sms_plain(head), _sms_plain(replies), _sms_plain(contact)
    tail_with_contact = f"{replies} {contact}".strip()
    full = f"{head} {tail_with_contact}".strip()
    if sms_segments(full) <= max_segments:
        return full
    for tail, min_head in ((tail_with_contact, _MIN_HEAD_CHARS), (replies, _MIN_HEAD_CHARS), (replies, 1)):
        cut = _cut_head(head, tail, max_segments, min_head)
        if cut is not None:
            return cut
    # Not even the keywords and link fit: keep as much of them as fits.
    return _truncate(replies, "", max_segments) or replies[:1]


# Shortest useful start of the explanation; below it, the embassy contact gives way instead.
_MIN_HEAD_CHARS = 40


def _cut_head(head: str, tail: str, max_segments: int, min_head: int) -> str | None:
    """``head tail`` with the head cut to fit, if at least ``min_head`` characters of it (or all of it) stay."""
    whole = f"{head} {tail}".strip()
    if sms_segments(whole) <= max_segments:
        return whole
    cut = _truncate(head, " " + tail, max_segments)
    if cut is None:
        return None
    kept = cut[: len(cut) - len(tail) - 1].rstrip(".\u2026")
    return cut if len(kept) >= min(min_head, len(head)) else None


def _truncate(text: str, suffix: str, max_segments: int) -> str | None:
    """The longest start of ``text`` (cut at a word where possible, with an ellipsis) that fits before ``suffix``."""
    # The segment count grows with the length kept, except where the cut drops the first character
    # outside GSM-7 and the body turns GSM-7 again: search the UCS-2 lengths first, then the GSM-7 ones.
    first_ucs2 = next((i for i, c in enumerate(text) if _gsm_septets(c) is None), len(text))
    best = _longest_fitting(text, suffix, max_segments, first_ucs2 + 1, len(text)) \
        or _longest_fitting(text, suffix, max_segments, 1, first_ucs2)
    if best == 0:
        return None
    start = text[:best]
    word_end = start.rfind(" ")
    if word_end >= best * 2 // 3:  # cut at a word unless that throws away a third
        start = start[:word_end]
    return _ellipsised(start, suffix)


def _longest_fitting(text: str, suffix: str, max_segments: int, low: int, high: int) -> int:
    best = 0
    while low <= high:
        mid = (low + high) // 2
        if sms_segments(_ellipsised(text[:mid], suffix)) <= max_segments:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def _ellipsised(start: str, suffix: str) -> str:
    # "..." in a GSM-7 body: the single-character ellipsis is not in the GSM alphabet and would make it UCS-2.
    kept = start.rstrip(" ,;:-")
    return kept + ("..." if _units(kept + suffix)[1] else "\u2026") + suffix
