"""How often a part of the stack may die before `crisiswatch up` gives up on it."""

from __future__ import annotations

from pipeline.stack import RestartBudget, RestartLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_third_death_within_the_window_is_one_too_many() -> None:
    clock = Clock()
    budget = RestartBudget(RestartLimit(times=3, window_s=60.0), clock)
    assert budget.died("broker")
    clock.now = 30
    assert budget.died("broker")
    clock.now = 59
    assert not budget.died("broker")
    assert budget.deaths("broker") == 3


def test_deaths_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    budget = RestartBudget(RestartLimit(times=3, window_s=60.0), clock)
    for t in (0, 30, 61, 92, 125, 160):  # never three within 60 s
        clock.now = t
        assert budget.died("worker"), t
    assert budget.deaths("worker") == 2


def test_each_part_has_its_own_count() -> None:
    budget = RestartBudget(RestartLimit(times=2, window_s=60.0), Clock())
    assert budget.died("sink")
    assert budget.died("worker")
    assert not budget.died("sink")
    assert budget.deaths("api") == 0
