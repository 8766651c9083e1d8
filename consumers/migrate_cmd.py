"""``crisiswatch migrate``: apply deploy/sql/*.sql to CRISISWATCH_DATABASE_URL, each file once."""

from __future__ import annotations

import argparse
import sys

from pipeline.embedded import MIGRATIONS_DIR, apply_migrations
from pipeline.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="URL", help="PostgreSQL URL [env CRISISWATCH_DATABASE_URL]")


def run(args: argparse.Namespace) -> int:
    import psycopg
    import psycopg.conninfo

    url = args.database_url or Settings.from_env().database_url.get()
    if not url:
        print("crisiswatch migrate: CRISISWATCH_DATABASE_URL is not set", file=sys.stderr)
        return 2
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        print("crisiswatch migrate: CRISISWATCH_DATABASE_URL is not a valid PostgreSQL URL", file=sys.stderr)
        return 2
    try:
        applied = apply_migrations(url)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"crisiswatch migrate: cannot reach PostgreSQL: {reason}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"crisiswatch migrate: migration failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    if applied:
        print(f"applied {len(applied)} migration(s) from {MIGRATIONS_DIR}: {', '.join(applied)}")
    else:
        print("database schema is up to date")
    return 0
