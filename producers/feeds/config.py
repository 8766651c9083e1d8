"""The feed poller's configuration file (TOML).

```toml
[defaults]                 # optional; any per-feed field except name/url/path/format
interval_s = 300

[[feeds]]
name = "usgs-significant"  # letters, digits, '.', '_', '-'; a metrics label and a state key
url = "https://earthquake.usgs.gov/earthquakes/feed/v1.0/summary/significant_week.geojson"
format = "usgs"            # auto | cap | gdacs | usgs | rss | advisory
interval_s = 300           # seconds between polls
timeout_s = 20             # connect and read timeout
max_bytes = 10000000       # larger responses are refused, reading stops there
language = "en"            # preferred language of multilingual alerts; assumed where a document does not say
exercise = false           # let non-Actual CAP alerts (Exercise/Test) through for this feed
min_confidence = 0.6       # news items below this go to review instead of to citizens

[geocoder]                 # optional; where news place names are looked up
service = "offline"        # offline GeoNames gazetteer (default, no network) or a geopy service name
# user_agent = "..."       # every other key is passed to the geopy geocoder (nominatim needs user_agent)
```

Each feed has either ``url`` (http/https) or ``path`` (a local file, relative to the config
file's folder). Every error names the file, the feed and the field.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.domain.feeds.base import FORMATS

FEED_FORMATS: tuple[str, ...] = ("auto", *FORMATS)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LANGUAGE_PATTERN = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
MIN_INTERVAL_S = 1.0
MAX_TIMEOUT_S = 300.0
MAX_MAX_BYTES = 200_000_000

_TUNABLE = ("interval_s", "timeout_s", "max_bytes", "language", "exercise", "min_confidence")
_FEED_FIELDS = frozenset(("name", "url", "path", "format", *_TUNABLE))


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, the feed and the field."""


@dataclass(frozen=True, slots=True)
class FeedConfig:
    name: str
    format: str
    url: str | None = None
    path: Path | None = None
    interval_s: float = 300.0
    timeout_s: float = 20.0
    max_bytes: int = 10_000_000
    language: str | None = None
    # None: follow CRISISWATCH_EXERCISE_MODE; true/false: this feed's own choice.
    exercise: bool | None = None
    # None: the news parser's default.
    min_confidence: float | None = None

    @property
    def location(self) -> str:
        return self.url if self.url is not None else str(self.path)


@dataclass(frozen=True, slots=True)
class PollerConfig:
    feeds: tuple[FeedConfig, ...]
    source: Path | None = None
    geocoder_service: str = "offline"
    geocoder_options: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def feed(self, name: str) -> FeedConfig:
        return next(f for f in self.feeds if f.name == name)


def load_config(path: Path) -> PollerConfig:
    """Read and validate a config file; raises :class:`ConfigError`."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, base_dir=path.parent, origin=str(path))


def parse_config(text: str, base_dir: Path = Path("."), origin: str = "<config>") -> PollerConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"defaults", "feeds", "geocoder"})
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level key {unknown[0]!r} (expected [defaults], [geocoder] and [[feeds]])")
    service, options = _geocoder(doc.get("geocoder", {}), origin)
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{origin}: 'defaults' must be a table")
    bad_default = sorted(set(defaults) - set(_TUNABLE))
    if bad_default:
        raise ConfigError(f"{origin}: [defaults]: unknown field {bad_default[0]!r} (allowed: {', '.join(_TUNABLE)})")
    raw_feeds = doc.get("feeds")
    if not isinstance(raw_feeds, list) or not raw_feeds:
        raise ConfigError(f"{origin}: no feeds: add at least one [[feeds]] table")
    feeds: list[FeedConfig] = []
    for n, raw in enumerate(raw_feeds, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: feeds #{n}: must be a table")
        feed = _feed({**defaults, **raw}, n, base_dir, origin)
        if any(f.name == feed.name for f in feeds):
            raise ConfigError(f"{origin}: feed {feed.name!r} (#{n}): name: used by an earlier feed")
        feeds.append(feed)
    return PollerConfig(tuple(feeds), None if origin.startswith("<") else Path(origin), service, options)


def _geocoder(raw: Any, origin: str) -> tuple[str, dict[str, str | int | float | bool]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: [geocoder]: must be a table")
    service = raw.get("service", "offline")
    if not isinstance(service, str) or not service.strip():
        raise ConfigError(f"{origin}: [geocoder]: service: expected a name such as 'offline' or 'nominatim', got {service!r}")
    options: dict[str, str | int | float | bool] = {}
    for key, value in raw.items():
        if key == "service":
            continue
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{origin}: [geocoder]: {key}: expected a string, number or boolean, got {value!r}")
        options[key] = value
    return service.strip(), options


def _feed(raw: Mapping[str, Any], n: int, base_dir: Path, origin: str) -> FeedConfig:
    name = raw.get("name")
    label = f"{origin}: feed {name!r} (#{n})" if isinstance(name, str) else f"{origin}: feeds #{n}"

    def fail(field: str, reason: str) -> ConfigError:
        return ConfigError(f"{label}: {field}: {reason}")

    unknown = sorted(set(raw) - _FEED_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (allowed: {', '.join(sorted(_FEED_FIELDS))})")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise fail("name", "required; 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    fmt = raw.get("format", "auto")
    if fmt not in FEED_FORMATS:
        raise fail("format", f"expected one of {', '.join(FEED_FORMATS)}, got {fmt!r}")
    url, path = raw.get("url"), raw.get("path")
    if (url is None) == (path is None):
        raise fail("url", "give exactly one of 'url' or 'path'")
    if url is not None:
        if not isinstance(url, str):
            raise fail("url", "must be a string")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise fail("url", f"expected an http:// or https:// URL, got {url!r} (use 'path' for a local file)")
    resolved: Path | None = None
    if path is not None:
        if not isinstance(path, str) or not path:
            raise fail("path", "must be a non-empty string")
        resolved = Path(path) if Path(path).is_absolute() else base_dir / path
    interval = _number(raw.get("interval_s", 300.0), "interval_s", fail, minimum=MIN_INTERVAL_S)
    timeout = _number(raw.get("timeout_s", 20.0), "timeout_s", fail, minimum=0.001, maximum=MAX_TIMEOUT_S)
    max_bytes = raw.get("max_bytes", 10_000_000)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= MAX_MAX_BYTES:
        raise fail("max_bytes", f"expected an integer from 1 to {MAX_MAX_BYTES}, got {max_bytes!r}")
    language = raw.get("language")
    if language is not None and (not isinstance(language, str) or not LANGUAGE_PATTERN.match(language)):
        raise fail("language", f"expected a language tag such as 'en' or 'id-ID', got {language!r}")
    exercise = raw.get("exercise")
    if exercise is not None and not isinstance(exercise, bool):
        raise fail("exercise", f"expected true or false, got {exercise!r}")
    min_confidence = raw.get("min_confidence")
    if min_confidence is not None and (isinstance(min_confidence, bool) or not isinstance(min_confidence, int | float)
                                       or not 0.0 <= min_confidence <= 1.0):
        raise fail("min_confidence", f"expected a number from 0 to 1, got {min_confidence!r}")
    return FeedConfig(name=name, format=fmt, url=url, path=resolved, interval_s=interval, timeout_s=timeout,
                      max_bytes=max_bytes, language=language, exercise=exercise,
                      min_confidence=None if min_confidence is None else float(min_confidence))


def _number(value: Any, field: str, fail: Callable[[str, str], ConfigError], minimum: float, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(field, f"expected a number of seconds, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise fail(field, f"must be {bound}, got {value!r}")
    return float(value)
