"""``crisiswatch``: one command, a verb per process or job.

Each verb lives in its own module, imported only when that verb runs, exposing
``configure(parser)`` and ``run(args) -> int``. Configuration comes from the environment
(``crisiswatch --help`` lists every variable, ``crisiswatch VERB --help`` those the verb uses);
flags override it per run. Verbs that talk to a running stack find what ``crisiswatch up`` started
in its state file when nothing is configured (:mod:`pipeline.state_file`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.settings import ENV_VARS, SettingsError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "up": ("pipeline.stack_cmd", "start the whole stack (embedded broker and PostgreSQL unless configured)"),
    "demo": ("pipeline.demo", "start the stack, play a scripted crisis scenario, print a summary, exit"),
    "worker": ("pipeline.worker_cmd", "run one Faust worker (locate and crisis agents); run several to scale"),
    "accountability": ("pipeline.accountability_cmd", "run the accountability agents: per-crisis counts on crisis-status"),
    "api": ("producers.api_cmd", "run the ingest API (check-ins, citizens, crises, acks)"),
    "sink": ("consumers.sink_cmd", "run the PostgreSQL sink and the per-country warning router"),
    "dispatch": ("consumers.dispatch_cmd", "deliver warnings to citizens (webhook, email, SMS/push), once per channel"),
    "simulate": ("producers.simulator", "publish check-ins of simulated travellers around real cities"),
    "replay": ("producers.replay", "publish a JSON-lines file of events into the right topics"),
    "tail": ("consumers.tail", "print warnings as they arrive, filtered by crisis, country or kind"),
    "geofence": ("pipeline.offline", "offline: crises + check-ins JSONL in, warning/1 lines out, no broker"),
    "parse": ("producers.feeds.parse_cmd", "parse feed documents (CAP, GDACS, USGS, RSS, advisories) to crisis/1"),
    "feeds": ("producers.feeds.poll_cmd", "poll the configured feeds and publish crisis events"),
    "migrate": ("consumers.migrate_cmd", "apply the SQL migrations in deploy/sql to CRISISWATCH_DATABASE_URL"),
    "status": ("pipeline.status_cmd", "what the running stack is made of, where, and whether each part is healthy"),
    "token": ("pipeline.token_cmd", "print the running stack's ingest or operator token (OPERATOR_TOKEN=$(crisiswatch token operator))"),
    "psql": ("pipeline.psql_cmd", "psql on the running stack's database"),
    "restore": ("pipeline.restore_cmd", "republish active crises, citizens and citizen states from PostgreSQL "
                "into a Kafka that lost them (before workers start)"),
}


def env_help(verb: str | None = None) -> str:
    """The environment variables ``verb`` uses (every one without a verb), one line each."""
    used = [v for v in ENV_VARS if verb is None or v.used_by(verb)]
    width = max(len(v.name) for v in used)
    lines = ["environment (flags override):"]
    lines += [f"  {v.name:<{width}}  {v.meaning} [default: {v.default or 'empty'}]" for v in used]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crisiswatch", description="Crisis-monitoring event pipeline for citizens abroad.",
        epilog=env_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_module, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_in or args_in[0] not in VERBS:
        parser.parse_args(args_in)  # prints usage / errors and exits
        return 2
    verb = args_in[0]
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    verb_parser = argparse.ArgumentParser(
        prog=f"crisiswatch {verb}", description=help_text, epilog=env_help(verb),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure(verb_parser)
    args = verb_parser.parse_args(args_in[1:])
    try:
        return int(module.run(args))
    except SettingsError as exc:
        print(f"crisiswatch {verb}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
