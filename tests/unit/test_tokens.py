"""Generated API tokens are kept in the data directory (mode 0600) and reused; configured ones win."""

from __future__ import annotations

import itertools
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.settings import Secret, Settings
from pipeline.tokens import (
    ApiToken,
    RateLimiter,
    TokenFileError,
    configured_tokens,
    find_token,
    load_or_create_tokens,
    parse_rate_limits,
    tokens_path,
    with_kept_tokens,
)


def maker() -> Callable[[], str]:
    numbers = itertools.count(1)
    return lambda: f"token-{next(numbers)}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_is_created_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first, path = with_kept_tokens(settings, maker())
    assert path == tmp_path / "data" / "tokens.json"
    assert mode(path) == 0o600
    assert (first.ingest_token.get(), first.operator_token.get(), first.reply_secret.get()) == \
        ("token-1", "token-2", "token-3")
    again, _ = with_kept_tokens(settings, maker())
    assert (again.ingest_token.get(), again.operator_token.get(), again.reply_secret.get()) == \
        ("token-1", "token-2", "token-3")
    assert again.admin_token.get() == "token-4"
    assert json.loads(path.read_text()) == {"ingest": "token-1", "operator": "token-2", "reply": "token-3",
                                            "admin": "token-4"}
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]  # no temporary file left


def test_configured_tokens_win_and_are_never_written(tmp_path: Path) -> None:
    every = Settings(data_dir=tmp_path, ingest_token=Secret("mine"), operator_token=Secret("ours"),
                     admin_token=Secret("boss"), reply_secret=Secret("links"))
    assert with_kept_tokens(every) == (every, None)
    assert not tokens_path(tmp_path).exists()

    one = Settings(data_dir=tmp_path, ingest_token=Secret("mine"))
    filled, path = with_kept_tokens(one, maker())
    assert path is not None
    assert filled.ingest_token.get() == "mine"
    assert "mine" not in path.read_text()
    assert filled.operator_token.get() == json.loads(path.read_text())["operator"]


def test_a_missing_token_is_added_and_the_kept_one_stays(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"ingest": "kept"}')
    assert load_or_create_tokens(path, lambda: "new") == {"ingest": "kept", "operator": "new", "reply": "new",
                                                          "admin": "new"}
    assert json.loads(path.read_text()) == {"ingest": "kept", "operator": "new", "reply": "new", "admin": "new"}


def test_a_file_others_can_read_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"ingest": "a", "operator": "b", "reply": "c", "admin": "d"}')
    path.chmod(0o644)
    assert load_or_create_tokens(path) == {"ingest": "a", "operator": "b", "reply": "c", "admin": "d"}
    assert mode(path) == 0o600


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"ingest": 5}'])
def test_a_damaged_file_is_refused_with_what_to_do(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(TokenFileError, match="delete it to generate new tokens") as caught:
        load_or_create_tokens(path)
    assert str(path) in str(caught.value)
    assert path.read_text() == content


# --- roles and rate limits -----------------------------------------------------------------------------


def test_roles_include_the_ones_before_them_and_tokens_are_named_by_role() -> None:
    tokens = configured_tokens(Settings(ingest_token=Secret("i"), operator_token=Secret("o"), admin_token=Secret("a")))
    assert [(t.name, t.role) for t in tokens] == [("ingest", "ingest"), ("operator", "operator"), ("admin", "admin")]
    ingest, operator, admin = tokens
    assert ingest.may("ingest") and not ingest.may("operator") and not ingest.may("admin")
    assert operator.may("ingest") and operator.may("operator") and not operator.may("admin")
    assert admin.may("ingest") and admin.may("operator") and admin.may("admin")
    assert find_token(tokens, "o") == operator
    assert find_token(tokens, "") is None
    assert find_token(tokens, "oo") is None
    assert configured_tokens(Settings(operator_token=Secret("o")))[0].role == "operator"  # unset ones left out


def test_rate_limits_parse_and_refuse_what_they_cannot_use() -> None:
    assert parse_rate_limits("ingest:1000, operator:50,admin:0.5") == {"ingest": 1000.0, "operator": 50.0, "admin": 0.5}
    assert parse_rate_limits("") == {}
    for bad in ("reader:5", "ingest", "ingest:fast", "ingest:-1", "ingest:nan"):
        with pytest.raises(ValueError):
            parse_rate_limits(bad)


def test_a_token_bucket_per_token_says_how_long_to_wait() -> None:
    now = [0.0]
    limiter = RateLimiter({"operator": 2.0}, clock=lambda: now[0])
    alice, bob = ApiToken("alice", "operator", Secret("a")), ApiToken("bob", "operator", Secret("b"))
    assert limiter.admit(alice) is None
    assert limiter.admit(alice) is None  # a burst of one second's worth
    wait = limiter.admit(alice)
    assert wait == pytest.approx(0.5)
    assert limiter.admit(bob) is None  # each token has its own bucket
    now[0] = 0.5
    assert limiter.admit(alice) is None
    assert limiter.admit(ApiToken("ingest", "ingest", Secret("i"))) is None  # no limit for the role: never refused
