"""The poller's config file: valid files load, every mistake names the feed and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.feeds.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[3]

GOOD = """
[defaults]
interval_s = 120
timeout_s = 15

[[feeds]]
name = "usgs-significant"
url = "https://earthquake.usgs.gov/earthquakes/feed/v1.0/summary/significant_week.geojson"
format = "usgs"
interval_s = 60

[[feeds]]
name = "local-cap"
path = "docs/alert.xml"
language = "id"
exercise = true
max_bytes = 500000
"""


def test_a_valid_file_loads_with_defaults_and_paths_relative_to_it(tmp_path: Path) -> None:
    config_file = tmp_path / "feeds.toml"
    config_file.write_text(GOOD, "utf-8")
    config = load_config(config_file)
    usgs, cap = config.feeds
    assert (usgs.name, usgs.format, usgs.interval_s, usgs.timeout_s) == ("usgs-significant", "usgs", 60.0, 15.0)
    assert usgs.exercise is None and usgs.language is None and usgs.path is None
    assert cap.format == "auto" and cap.url is None and cap.path == tmp_path / "docs" / "alert.xml"
    assert (cap.interval_s, cap.language, cap.exercise, cap.max_bytes) == (120.0, "id", True, 500_000)


def test_the_geocoder_defaults_to_the_offline_gazetteer_and_takes_geopy_options() -> None:
    feeds = '[[feeds]]\nname = "news"\nurl = "https://x.example/rss"\nformat = "rss"\nmin_confidence = 0.8\n'
    assert parse_config(feeds).geocoder_service == "offline"
    config = parse_config(f'[geocoder]\nservice = "nominatim"\nuser_agent = "ministry-crisis-desk"\ntimeout = 5\n{feeds}')
    assert (config.geocoder_service, dict(config.geocoder_options)) == ("nominatim", {"user_agent": "ministry-crisis-desk",
                                                                                     "timeout": 5})
    assert config.feeds[0].min_confidence == 0.8


def test_the_shipped_example_config_is_valid() -> None:
    config = load_config(REPO / "deploy" / "feeds.example.toml")
    assert {f.format for f in config.feeds} >= {"gdacs", "usgs", "cap", "advisory"}
    assert all(f.url is not None and f.url.startswith("https://") for f in config.feeds)


@pytest.mark.parametrize(("body", "expected"), [
    ('url = "https://x.example/a"\nformat = "usgs"', "feeds #1: name: required"),
    ('name = "a b"\nurl = "https://x.example/a"', "name: required"),
    ('name = "x"\nurl = "https://x.example/a"\nformat = "atom"', "feed 'x' (#1): format: expected one of auto, cap"),
    ('name = "x"', "feed 'x' (#1): url: give exactly one of 'url' or 'path'"),
    ('name = "x"\nurl = "https://x.example/a"\npath = "a.xml"', "url: give exactly one"),
    ('name = "x"\nurl = "file:///etc/passwd"', "url: expected an http:// or https:// URL"),
    ('name = "x"\nurl = "https://x.example/a"\ninterval_s = "300"', "feed 'x' (#1): interval_s: expected a number"),
    ('name = "x"\nurl = "https://x.example/a"\ninterval_s = 0', "interval_s: must be at least 1"),
    ('name = "x"\nurl = "https://x.example/a"\ntimeout_s = 900', "timeout_s: must be from 0.001 to 300"),
    ('name = "x"\nurl = "https://x.example/a"\nmax_bytes = 0', "max_bytes: expected an integer from 1"),
    ('name = "x"\nurl = "https://x.example/a"\nlanguage = "english please"', "language: expected a language tag"),
    ('name = "x"\nurl = "https://x.example/a"\nexercise = "yes"', "exercise: expected true or false"),
    ('name = "x"\nurl = "https://x.example/a"\nintervall_s = 60', "feed 'x' (#1): intervall_s: unknown field"),
    ('name = "x"\nurl = "https://x.example/a"\nmin_confidence = 1.5', "min_confidence: expected a number from 0 to 1"),
])
def test_each_mistake_names_the_feed_and_the_field(body: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^feeds\.toml: ") as err:
        parse_config(f"[[feeds]]\n{body}\n", origin="feeds.toml")
    assert expected in str(err.value)


def test_duplicate_names_empty_files_and_broken_toml_are_refused(tmp_path: Path) -> None:
    twice = '[[feeds]]\nname = "a"\nurl = "https://x.example/1"\n[[feeds]]\nname = "a"\nurl = "https://x.example/2"\n'
    with pytest.raises(ConfigError, match=r"feed 'a' \(#2\): name: used by an earlier feed"):
        parse_config(twice)
    with pytest.raises(ConfigError, match="no feeds"):
        parse_config("")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[[feeds]\nname=")
    with pytest.raises(ConfigError, match=r"\[defaults\]: unknown field 'url'"):
        parse_config('[defaults]\nurl = "https://x.example"\n[[feeds]]\nname = "a"\nurl = "https://x.example/1"\n')
    with pytest.raises(ConfigError, match=r"\[geocoder\]: service: expected a name"):
        parse_config('[geocoder]\nservice = ""\n[[feeds]]\nname = "a"\nurl = "https://x.example/1"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
