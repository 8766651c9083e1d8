"""``crisiswatch up``: the whole stack, embedded by default, until Ctrl-C or SIGTERM.

With ``CRISISWATCH_KAFKA_BOOTSTRAP`` and ``CRISISWATCH_DATABASE_URL`` set it uses those and
starts no embedded server. Every part that dies is started again, with a line on stderr
(:meth:`~pipeline.stack.Stack.supervise`). Exit 0 on a clean stop, 1 when a part could not be
started or kept running (one line on stderr names it and its log).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from pipeline.settings import Settings
from pipeline.stack import Stack, StackError


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feeds", type=Path, default=None, help="also run the feed pollers with this config file")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.feeds is not None and not args.feeds.is_file():
        print(f"crisiswatch up: no such feeds config: {args.feeds}", file=sys.stderr)
        return 2
    stack = Stack(settings, args.feeds)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        while True:
            stack.supervise()
            time.sleep(0.5)
    except StackError as exc:
        print(f"crisiswatch up: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
        return 0
    finally:
        # a second Ctrl-C or SIGTERM during shutdown must not cut the cleanup short and orphan children
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
