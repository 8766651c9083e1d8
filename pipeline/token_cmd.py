"""``crisiswatch token ingest|operator|admin``: print one API token of the running stack, for scripts
(``OPERATOR_TOKEN=$(crisiswatch token operator)``): the configured one
(``CRISISWATCH_INGEST_TOKEN``/``CRISISWATCH_OPERATOR_TOKEN``), else the one ``crisiswatch up`` generated
and keeps in its data directory. Exit 1, with a line on stderr, when there is none."""

from __future__ import annotations

import argparse
import sys

from pipeline.state_file import client_settings, no_stack


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=("ingest", "operator", "admin"),
                        help="ingest: check-ins, citizens, replies; operator: crises, cases (and ingest); "
                             "admin: audit log, erasure (and operator)")


def run(args: argparse.Namespace) -> int:
    settings, state = client_settings()
    token = {"ingest": settings.ingest_token, "operator": settings.operator_token, "admin": settings.admin_token}[args.role]
    if not token:
        variable = f"CRISISWATCH_{args.role.upper()}_TOKEN"
        why = no_stack(settings) if state is None else f"the stack on {state.data_dir} has no {args.role} token"
        print(f"crisiswatch token: {variable} is not set and {why}", file=sys.stderr)
        return 1
    print(token.get())
    return 0
