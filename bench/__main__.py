"""Every benchmark in one run, one table: ``python -m bench [--quick] [--json] [--only NAME,...]``.

Each benchmark module exposes ``run(quick: bool) -> dict[str, list[float]]``: for every key it
measures, the value of each round, and every ratio computed from figures of the same round. The
harness runs each module in its own child process (a fresh interpreter: one benchmark's brokers,
threads or memory cannot slow the next, and a crash is reported, not fatal), then prints one row
per key: the median of the rounds, the rounds themselves, and the issue's target. A module that is
missing, fails or runs out of time shows its keys as missing with the reason, never a number.

``--quick`` runs the same keys on smaller sizes (under 3 minutes on 2 cores); the full run takes
under 20 minutes. ``--json`` prints one JSON object instead: the keys at the top level (each
``{"median", "rounds", "target", "met"}`` or ``{"missing": true, "error"}``) and ``_run`` with the
date, the machine and the duration of each module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    op: str  # ">=" or "<="
    value: float

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


# The keys, in the order of the table, with the module expected to report each and its target.
KEYS: dict[str, tuple[str, Target | None]] = {
    "raw_passthrough_msgs_per_s": ("worker", None),
    "worker_checkins_per_s": ("worker", None),
    "worker_vs_raw_ratio": ("worker", Target(">=", 0.5)),
    "worker_ready_s": ("worker", Target("<=", 3.0)),
    "geofence_points_per_s": ("geofence", Target(">=", 1_000_000)),
    "geofence_vs_bare_shapely_ratio": ("geofence", Target(">=", 0.5)),
    "geofence_vs_naive_ratio": ("geofence", None),
    "latency_p50_ms": ("latency", Target("<=", 50.0)),
    "latency_p99_ms": ("latency", Target("<=", 250.0)),
    "latency_vs_passthrough_p99_ratio": ("latency", Target("<=", 1.5)),
    "sweep_first_warning_s": ("sweep", Target("<=", 1.0)),
    "sweep_all_warnings_s": ("sweep", Target("<=", 10.0)),
    "bytes_per_citizen": ("sweep", Target("<=", 200.0)),
    "api_vs_raw_producer_ratio": ("api", Target(">=", 0.8)),
    "dispatch_msgs_per_s": ("dispatch", None),
    "dispatch_plain_client_msgs_per_s": ("dispatch", None),
    "dispatch_vs_plain_ratio": ("dispatch", None),
}
MODULES = ("geofence", "worker", "api", "latency", "sweep", "dispatch")
TIMEOUT_S = {True: 300, False: 1200}  # per module, quick and full: generous, a loaded machine is slow


@dataclass(frozen=True, slots=True)
class Outcome:
    module: str
    values: dict[str, list[float]]
    error: str | None
    seconds: float


def run_module(module: str, quick: bool) -> dict[str, list[float]]:
    """Import ``bench.<module>`` and call its ``run``; the result checked to be what the harness prints."""
    mod = importlib.import_module(f"bench.{module}")
    run: Callable[[bool], Mapping[str, Sequence[float]]] | None = getattr(mod, "run", None)
    if run is None:
        raise RuntimeError(f"bench.{module} has no run(quick)")
    values = run(quick)
    checked: dict[str, list[float]] = {}
    for key, rounds in values.items():
        numbers = [float(v) for v in rounds]
        if not numbers:
            raise RuntimeError(f"bench.{module} reported no rounds for {key}")
        checked[str(key)] = numbers
    return checked


def child(module: str, quick: bool) -> None:
    """In the child process: run one module, print its values as one JSON line (last line of stdout).
    SIGTERM (the harness's timeout) becomes SystemExit, so the module's ``finally`` stops its servers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    values = run_module(module, quick)
    sys.stdout.flush()
    print("\n" + json.dumps({"values": values}), flush=True)


def in_child(module: str, quick: bool, timeout_s: float, verbose: bool) -> Outcome:
    started = time.monotonic()
    command = [sys.executable, "-m", "bench", "--child", module] + (["--quick"] if quick else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the module's own clean-up stops its broker and workers
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return Outcome(module, {}, f"timed out after {timeout_s:.0f} s", time.monotonic() - started)
    seconds = time.monotonic() - started
    if verbose:
        sys.stderr.write(stdout + stderr)
    lines = [line for line in stdout.splitlines() if line.startswith('{"values"')]
    if proc.returncode != 0 or not lines:
        return Outcome(module, {}, _reason(stderr) or f"exit status {proc.returncode}", seconds)
    return Outcome(module, json.loads(lines[-1])["values"], None, seconds)


def _reason(stderr: str) -> str:
    """The last line of a traceback (the exception), or the last line of whatever was written."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}, load {load}"


def collect(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """One entry per key: the issue's keys first, then any further key a module reported."""
    errors = {o.module: o.error for o in outcomes if o.error}
    values: dict[str, list[float]] = {}
    source: dict[str, str] = {}
    for outcome in outcomes:
        for key, rounds in outcome.values.items():
            values[key] = rounds
            source[key] = outcome.module
    table: dict[str, dict[str, Any]] = {}
    for key in [*KEYS, *(k for k in values if k not in KEYS)]:
        module, target = KEYS.get(key, (source.get(key, "?"), None))
        if key not in values:
            ran = [o.module for o in outcomes]
            why = errors.get(module) or (f"bench.{module} did not report it" if module in ran else f"bench.{module} not run")
            table[key] = {"missing": True, "error": why, "module": module}
            continue
        rounds = values[key]
        median = statistics.median(rounds)
        entry: dict[str, Any] = {"median": median, "rounds": rounds, "module": source[key]}
        if target is not None:
            entry["target"] = str(target)
            entry["met"] = target.met(median)
        table[key] = entry
    return table


def render(table: Mapping[str, Mapping[str, Any]], run_info: Mapping[str, Any]) -> str:
    lines = [f"crisiswatch benchmarks, {'quick' if run_info['quick'] else 'full'} run, {run_info['date']}",
             f"machine: {run_info['machine']}", ""]
    width = max(len(k) for k in table)
    lines.append(f"{'key':<{width}}  {'median':>14}  {'target':>12}  {'':4}  rounds")
    for key, entry in table.items():
        if entry.get("missing"):
            lines.append(f"{key:<{width}}  {'missing':>14}  {'':>12}  {'':4}  {entry['error']}")
            continue
        met = "" if "met" not in entry else ("met" if entry["met"] else "MISS")
        rounds = ", ".join(_fmt(v) for v in entry["rounds"])
        lines.append(f"{key:<{width}}  {_fmt(entry['median']):>14}  {entry.get('target', ''):>12}  {met:4}  {rounds}")
    lines.append("")
    lines.append("module seconds: " + ", ".join(f"{m} {s:.0f}" for m, s in run_info["module_seconds"].items()))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, same keys (under 3 minutes on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--only", default=",".join(MODULES), help=f"comma-separated modules to run (default: {','.join(MODULES)})")
    parser.add_argument("--verbose", action="store_true", help="pass each module's own output through to stderr")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.quick)
        return 0
    modules = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules: {', '.join(unknown)} (known: {', '.join(MODULES)})")
    started = datetime.now(UTC)
    outcomes = []
    for module in modules:
        if not args.json:
            print(f"running bench.{module} ...", file=sys.stderr, flush=True)
        outcomes.append(in_child(module, args.quick, TIMEOUT_S[args.quick], args.verbose))
    run_info = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "quick": args.quick,
                "module_seconds": {o.module: round(o.seconds, 1) for o in outcomes},
                "seconds": round((datetime.now(UTC) - started).total_seconds(), 1)}
    table = collect(outcomes)
    if args.json:
        print(json.dumps({**table, "_run": run_info}, indent=2))
    else:
        print(render(table, run_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
