"""``crisiswatch restore``: republish from PostgreSQL what a Kafka that lost its data needs.

For production after data loss (a cluster rebuilt, topics deleted): the active crises, the
registry and every citizen's state (last location, what they were warned of) go back into Kafka,
so geofencing, sweeps and all-clears carry on. ``crisiswatch up`` does the same at start when its
broker holds nothing (``--if-needed``). Exit 0 when done, 2 for a configuration error or while
workers are running, 1 when Kafka or PostgreSQL failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from pipeline.settings import Settings

DETAILS = """
Run it BEFORE starting the workers: a running worker never reads its state changelog again and
would overwrite what was restored, so restore refuses (exit 2) while the worker group has members.
Without --if-needed it restores unconditionally: crisis events already on the topic are ignored by
the workers as old versions, the registry is written back unchanged, and each citizen's state is
replaced by the one rebuilt from PostgreSQL.
The accountability standings (per crisis: warned, delivered, safe, ...) are rebuilt from PostgreSQL
too, into the accountability process's changelog (with --if-needed: only when it is empty); restore
refuses while `crisiswatch accountability` runs, for the same reason.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = f"{parser.description}\n{DETAILS}"
    parser.add_argument("--if-needed", action="store_true",
                        help="restore only when crisis-events and the worker's state changelog are both empty "
                             "(what `crisiswatch up` does at start)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read PostgreSQL and print what would be restored; write nothing to Kafka")


def run(args: argparse.Namespace) -> int:
    from pipeline.restore import (
        RestoreError,
        RestoreReport,
        WorkersActive,
        plan_from_postgres,
        restore,
        restore_if_needed,
        standings_from_postgres,
        utc_now,
    )

    settings = Settings.from_env()
    given = {"CRISISWATCH_DATABASE_URL": settings.database_url.get(), "CRISISWATCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
    needed = ["CRISISWATCH_DATABASE_URL"] + ([] if args.dry_run else ["CRISISWATCH_KAFKA_BOOTSTRAP"])
    missing = [name for name in needed if not given[name]]
    if missing:
        print(f"crisiswatch restore: {' and '.join(missing)} not set (the embedded stack restores by itself "
              "in `crisiswatch up`)", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            plan, recorded = plan_from_postgres(settings, utc_now())
            would = RestoreReport.of(plan, len(recorded.skipped))
            print(replace(would, standings=len(standings_from_postgres(settings))).line("would restore"))
            return 0
        report = restore_if_needed(settings) if args.if_needed else restore(settings)
    except WorkersActive as exc:
        print(f"crisiswatch restore: refused: {exc}", file=sys.stderr)
        return 2
    except RestoreError as exc:
        print(f"crisiswatch restore: {exc}", file=sys.stderr)
        return 1
    if report is None:
        print("nothing restored: the broker already holds crisis events or citizen states, "
              "or PostgreSQL holds nothing to restore")
    else:
        print(report.line())
    return 0
