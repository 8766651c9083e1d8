"""``crisiswatch geofence``: the pipeline's engine on files, with no broker.

    crisiswatch geofence --crises CRISES.jsonl --checkins CHECKINS.jsonl

prints, one JSON line each, the ``warning/1`` events the pipeline would emit. Invalid lines are
reported on stderr with their file, line number and reason, and skipped; the exit code is 2 if
any line was invalid, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO, TypeVar

from pipeline.domain.timeline import Timeline
from pipeline.domain.tracking import GeofenceConfig
from pipeline.domain.validation import decode_event
from pipeline.settings import Settings
from schemas import Checkin, Crisis, InvalidEvent, encode
from schemas.models import LATEST_TIME

E = TypeVar("E", Crisis, Checkin)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crises", type=Path, required=True, help="crisis/1 events, JSON lines")
    parser.add_argument("--checkins", type=Path, required=True, help="checkin/1 events, JSON lines")
    parser.add_argument("--dwell-seconds", type=float, default=None,
                        help="exit dwell time [env: CRISISWATCH_DWELL_SECONDS]")
    parser.add_argument("--hysteresis-m", type=float, default=None,
                        help="minimum distance past the edge to count as outside [env: CRISISWATCH_HYSTERESIS_M]")
    parser.add_argument("--exercise", action="store_true", default=None,
                        help="let non-Actual crises warn citizens [env: CRISISWATCH_EXERCISE_MODE]")


def read_events(path: Path, expected: type[E], errors: TextIO) -> tuple[list[E], int]:
    """Decode a JSON-lines file as a stage would (areas normalised); report each invalid line on ``errors``;
    return (events, invalid count). A file is a timeline of its own, so no time counts as "in the future"."""
    events: list[E] = []
    invalid = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                events.append(decode_event(line, expected, now=LATEST_TIME))
            except InvalidEvent as exc:
                invalid += 1
                print(f"{path}:{number}: invalid {expected.SCHEMA}: {exc}", file=errors)
    return events, invalid


def geofence_files(crises_path: Path, checkins_path: Path, config: GeofenceConfig,
                   errors: TextIO = sys.stderr) -> tuple[Iterator[bytes], int]:
    crises, bad_crises = read_events(crises_path, Crisis, errors)
    checkins, bad_checkins = read_events(checkins_path, Checkin, errors)
    timeline = Timeline(config)
    return (encode(w) for w in timeline.run([*crises, *checkins])), bad_crises + bad_checkins


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    config = GeofenceConfig(
        hysteresis_m=settings.hysteresis_m if args.hysteresis_m is None else args.hysteresis_m,
        dwell_seconds=settings.dwell_seconds if args.dwell_seconds is None else args.dwell_seconds,
        exercise_mode=settings.exercise_mode if args.exercise is None else args.exercise)
    for path in (args.crises, args.checkins):
        if not path.is_file():
            print(f"crisiswatch geofence: no such file: {path}", file=sys.stderr)
            return 2
    lines, invalid = geofence_files(args.crises, args.checkins, config)
    out = sys.stdout.buffer
    for line in lines:
        out.write(line + b"\n")
    out.flush()
    return 2 if invalid else 0
