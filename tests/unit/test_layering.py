"""Dependencies point inward (DESIGN.md §2): the domain does no I/O, schemas depend on nothing here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Pure libraries the domain may use. defusedxml and feedparser are parsers handed bytes (never a URL):
# the hardened XML entry point and the RSS/Atom reader of the feed parsers.
DOMAIN_THIRD_PARTY = {"shapely", "numpy", "numba", "geopy", "defusedxml", "feedparser"}
# Standard-library modules that reach outside the process.
IO_STDLIB = {"socket", "ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "subprocess", "asyncio",
             "sqlite3", "multiprocessing", "selectors", "telnetlib", "xmlrpc", "webbrowser", "wsgiref", "socketserver"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_domain_imports_no_io_library() -> None:
    offences = []
    for path in sorted((ROOT / "pipeline" / "domain").rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = (top in sys.stdlib_module_names and top not in IO_STDLIB) or top in DOMAIN_THIRD_PARTY \
                or top == "schemas" or name.startswith("pipeline.domain")
            if not allowed:
                offences.append(f"{path.relative_to(ROOT)}: {name}")
    assert offences == []


def test_the_check_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import psycopg\nfrom kafka import KafkaProducer\nimport urllib.request\nfrom pipeline import app\n")
    names = imported_modules(bad)
    assert names == {"psycopg", "kafka", "urllib.request", "pipeline"}
    assert all(not (n.split(".")[0] in DOMAIN_THIRD_PARTY or n.startswith("pipeline.domain")) for n in names)


def test_schemas_depend_on_nothing_in_the_project() -> None:
    for path in sorted((ROOT / "schemas").rglob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] not in {"pipeline", "producers", "consumers"}, f"{path}: {name}"


def test_pipeline_imports_neither_producers_nor_consumers_except_the_stack() -> None:
    # The stack and the demo drive the whole system (they start producers and consumers), and so does the
    # restore the stack runs at start (it publishes what PostgreSQL recorded); nothing else may.
    drivers = {"demo.py", "stack.py", "stack_cmd.py", "cli.py", "restore.py"}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name in drivers:
            continue
        for name in imported_modules(path):
            assert name.split(".")[0] not in {"producers", "consumers"}, f"{path}: {name}"


def test_test_modules_have_distinct_basenames() -> None:
    """pytest's default import mode imports test modules by basename: two files of one name in different
    folders make the whole run stop at collection."""
    from collections import Counter

    names = Counter(p.name for p in (Path(__file__).resolve().parents[1]).rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
