"""The accountability process stands apart from the worker: its own app id (so its own consumer group),
its own internal topics, which ``up`` creates with the worker's, and none of its agents left in the
worker. Built without a broker: nothing here starts an app."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline import accountability_cmd, stack
from pipeline.accountability_app import APP_ID, create_accountability_app, internal_topics, regrouped_topic
from pipeline.app import APP_ID as WORKER_APP_ID
from pipeline.app import create_app
from pipeline.app import internal_topics as worker_topics
from pipeline.cli import VERBS
from pipeline.settings import Settings


def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": "127.0.0.1:1", "CRISISWATCH_DATA_DIR": str(tmp_path),
                              "CRISISWATCH_ACCOUNTABILITY_WEB_PORT": "6077"})


def test_own_app_id_and_topics_created_with_the_workers() -> None:
    assert APP_ID != WORKER_APP_ID
    assert not set(internal_topics()) & set(worker_topics())
    assert all(name.startswith(APP_ID + "-") for name in internal_topics())
    assert set(stack.internal_topics()) == {*worker_topics(), *internal_topics()}
    assert VERBS["accountability"][0] == "pipeline.accountability_cmd"


def test_the_agents_run_in_the_accountability_app_only(tmp_path: Path) -> None:
    app, _ = create_accountability_app(settings(tmp_path))
    assert app.conf.id == APP_ID
    assert app.conf.web_port == 6077
    assert {agent.name for agent in app.agents.values()} == {"accountability-rekey", "accountability"}
    [table] = app.tables.values()
    assert table.changelog_topic.get_topic_name() in internal_topics()
    assert regrouped_topic() in internal_topics()

    worker, _ = create_app(settings(tmp_path))
    assert not any("accountability" in agent.name for agent in worker.agents.values())
    assert not any("accountability" in t.changelog_topic.get_topic_name() for t in worker.tables.values())


def test_the_verb_refuses_to_start_without_kafka(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CRISISWATCH_KAFKA_BOOTSTRAP", raising=False)
    parser = argparse.ArgumentParser()
    accountability_cmd.configure(parser)
    assert accountability_cmd.run(parser.parse_args([])) == 2
    assert "CRISISWATCH_KAFKA_BOOTSTRAP" in capsys.readouterr().err
