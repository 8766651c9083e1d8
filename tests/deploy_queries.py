"""The PromQL that deploy/ runs: every alert rule's and every dashboard panel's expression, and the
metric names each one reads, found by parsing the expression (``promql-parser``), not by a regular
expression: a name in a label value or an annotation is not a metric, a selector without the
``crisiswatch_`` prefix (``up``) is one. Shared by tests/unit/test_deploy.py (names exist in code,
with the right type) and tests/e2e/test_metrics_exported.py (names are served by a running stack)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "crisiswatch.json"

# Grafana's built-in variables, as a Prometheus data source substitutes them before the query runs.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

# Series Prometheus itself makes for every target, not served by a process's /metrics.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text("utf-8"))["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def queries() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression in alerts.yml and the dashboard."""
    rules = yaml.safe_load(ALERTS.read_text("utf-8"))
    out = [(f"alert {r['alert']}", str(r["expr"])) for g in rules["groups"] for r in g["rules"]]
    out += [(f"panel {p['title']!r}", str(t["expr"])) for p in dashboard_panels() for t in p.get("targets", [])]
    return out


def parse(expr: str) -> Any:
    """The expression's syntax tree, Grafana variables replaced; raises ValueError when it does not parse."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    if re.search(r"\$\w+", expr):
        raise ValueError(f"unknown template variable in {expr!r}")
    return promql_parser.parse(expr)


def selectors(node: Any) -> list[Any]:
    """Every vector selector in the tree (the ones inside range selectors and subqueries too)."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, promql_parser.BinaryExpr):
        return selectors(node.lhs) + selectors(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr):
        return selectors(node.expr) + (selectors(node.param) if node.param is not None else [])
    if isinstance(node, promql_parser.Call):
        return [s for arg in node.args for s in selectors(arg)]
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return selectors(node.expr)
    return []  # number and string literals


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (``__name__`` matchers too)."""
    names: set[str] = set()
    for selector in selectors(parse(expr)):
        if selector.name:
            names.add(selector.name)
        names.update(m.value for m in selector.matchers.matchers if m.name == "__name__")
    return names


def functions(expr: str) -> list[tuple[str, set[str]]]:
    """(function name, metric names in its arguments) for every function call in ``expr``."""
    out: list[tuple[str, set[str]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.Call):
            out.append((node.func.name, {s.name for arg in node.args for s in selectors(arg) if s.name}))
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.AggregateExpr | promql_parser.ParenExpr | promql_parser.UnaryExpr
                        | promql_parser.SubqueryExpr):
            walk(node.expr)

    walk(parse(expr))
    return out
