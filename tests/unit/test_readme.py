"""The README stays true to the code: every setting and every verb is documented there."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import VERBS
from pipeline.settings import ENV_VARS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")


def test_every_environment_variable_is_in_the_configuration_table() -> None:
    missing = [v.name for v in ENV_VARS if f"| `{v.name}` |" not in README]
    assert missing == []


def test_every_verb_is_documented() -> None:
    missing = [verb for verb in VERBS if f"`crisiswatch {verb}" not in README]
    assert missing == []


def test_the_two_commands_are_the_makefile_targets() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text("utf-8")
    assert "make demo" in README and "make test" in README
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text("utf-8")
    assert "make test" in ci
