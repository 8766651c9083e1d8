"""Generated API tokens are kept in the data directory (mode 0600) and reused; configured ones win."""

from __future__ import annotations

import itertools
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.settings import Secret, Settings
from pipeline.tokens import TokenFileError, load_or_create_tokens, tokens_path, with_kept_tokens


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
    assert json.loads(path.read_text()) == {"ingest": "token-1", "operator": "token-2", "reply": "token-3"}
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]  # no temporary file left


def test_configured_tokens_win_and_are_never_written(tmp_path: Path) -> None:
    every = Settings(data_dir=tmp_path, ingest_token=Secret("mine"), operator_token=Secret("ours"),
                     reply_secret=Secret("links"))
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
    assert load_or_create_tokens(path, lambda: "new") == {"ingest": "kept", "operator": "new", "reply": "new"}
    assert json.loads(path.read_text()) == {"ingest": "kept", "operator": "new", "reply": "new"}


def test_a_file_others_can_read_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"ingest": "a", "operator": "b", "reply": "c"}')
    path.chmod(0o644)
    assert load_or_create_tokens(path) == {"ingest": "a", "operator": "b", "reply": "c"}
    assert mode(path) == 0o600


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"ingest": 5}'])
def test_a_damaged_file_is_refused_with_what_to_do(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(TokenFileError, match="delete it to generate new tokens") as caught:
        load_or_create_tokens(path)
    assert str(path) in str(caught.value)
    assert path.read_text() == content
