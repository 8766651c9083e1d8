"""Faust's table manager starts without its one-second wait (``pipeline.app._no_table_registration_wait``).

Fails when Faust's ``TableManager.on_start`` is no longer the method the patch replaces: then the
patch is skipped, and whether the wait can still go must be read again."""

from __future__ import annotations

import asyncio

import faust
from faust.tables.manager import TableManager

from pipeline import app as worker_app


def test_faust_table_manager_is_the_one_patched() -> None:
    assert worker_app._no_table_registration_wait() is True
    assert getattr(TableManager, "_crisiswatch_no_wait", False) is True


def test_table_manager_starts_without_waiting() -> None:
    """The patched ``on_start`` goes straight to registering the channels and starting recovery (both
    stood in for here: they need a broker); Faust's own waited a second first."""
    assert worker_app._no_table_registration_wait() is True
    app = faust.App("test-faust-start", broker="kafka://127.0.0.1:1", store="memory://")
    manager = app.tables
    steps: list[str] = []

    async def update_channels() -> None:
        steps.append("channels")

    class Recovery:
        async def start(self) -> None:
            steps.append("recovery")

    manager._update_channels = update_channels  # type: ignore[method-assign]
    manager._recovery = Recovery()  # type: ignore[assignment]

    async def sleep(seconds: float) -> None:  # Faust's own on_start begins with self.sleep(1.0)
        steps.append(f"sleep {seconds}")

    manager.sleep = sleep  # type: ignore[method-assign]
    asyncio.run(manager.on_start())
    assert steps == ["channels", "recovery"]
