"""compose/monitoring (issue 15): the alerting rules pass ``promtool check rules`` and
their unit tests (``promtool test rules``), the scrape configuration passes ``promtool
check config``, the Grafana dashboard has the shape of Grafana's dashboard schema, and
every metric the rules and the dashboard name is one a real running agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh import __version__
from mesh.engine.ops import metrics
from tests.cluster import Cluster, Node, running, wait_for
from tests.test_ops import status_doc

MONITORING = Path(__file__).resolve().parents[1] / "compose" / "monitoring"
RULES = MONITORING / "meshsync-rules.yml"
RULE_TESTS = MONITORING / "meshsync-rules.test.yml"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "meshsync-dashboard.json"
NETS = ("127.0.23", "127.0.24")  # see tests.cluster.Cluster.nets
METRIC = re.compile(r"\bmesh_[a-z0-9_]+\b")
# Labels Prometheus adds itself: the target's, and a histogram's bucket bound.
TARGET_LABELS = {"instance", "job", "le"}


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: ./scripts/_setup.sh installs it (prometheus)"
    done = subprocess.run([tool, *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    assert "SUCCESS: 11 rules found" in promtool("check", "rules", RULES.name)
    assert "is valid prometheus config file syntax" in promtool("check", "config",
                                                               SCRAPE_CONFIG.name)


def test_the_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name)
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in _rules()}, "every alert is seen firing"


# --- the dashboard -------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a row's


# What Grafana's dashboard schema (schemaVersion 36 on; kind "dashboard" v0) allows and
# requires at the top, in a panel, in a grid position; checked offline, by hand.
DASHBOARD_KEYS = {
    "id", "uid", "title", "description", "revision", "gnetId", "tags", "timezone", "editable",
    "graphTooltip", "time", "timepicker", "fiscalYearStartMonth", "liveNow", "weekStart",
    "refresh", "schemaVersion", "version", "panels", "templating", "annotations", "links",
    "snapshot",
}
PANEL_KEYS = {
    "type", "id", "pluginVersion", "tags", "targets", "title", "description", "transparent",
    "datasource", "gridPos", "links", "repeat", "repeatDirection", "maxPerRow",
    "maxDataPoints", "transformations", "interval", "timeFrom", "timeShift",
    "hideTimeOverride", "libraryPanel", "options", "fieldConfig",
}
VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom",
                  "system"}


def test_the_dashboard_has_the_shape_of_grafanas_schema() -> None:
    doc = _dashboard()
    assert set(doc) <= DASHBOARD_KEYS, set(doc) - DASHBOARD_KEYS
    assert {"schemaVersion", "templating", "annotations"} <= set(doc)
    assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 36
    assert isinstance(doc["uid"], str) and 8 <= len(doc["uid"]) <= 40
    assert doc["graphTooltip"] in (0, 1, 2) and set(doc["time"]) == {"from", "to"}
    for annotation in doc["annotations"]["list"]:
        assert {"name", "datasource", "enable", "iconColor"} <= set(annotation)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert all(v["type"] in VARIABLE_TYPES for v in variables.values())
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _panels(doc)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for panel in _panels(doc):
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert set(panel) <= PANEL_KEYS | {"collapsed", "panels"}, where
        assert panel["type"] and panel["title"], where
        pos = panel["gridPos"]
        assert set(pos) >= {"h", "w", "x", "y"}, where
        assert pos["h"] > 0 and 0 < pos["w"] <= 24 and 0 <= pos["x"] < 24, where
        assert pos["x"] + pos["w"] <= 24, where
        if panel["type"] == "row":
            continue
        assert set(panel["fieldConfig"]) == {"defaults", "overrides"}, where
        steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        values = [step["value"] for step in steps]
        assert values == sorted(values) and all(isinstance(v, int | float) for v in values)
        assert panel["targets"], where
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where
        for target in panel["targets"]:
            # Every query on the dashboard's data source variable: chosen at import.
            assert target["datasource"] == panel["datasource"] == {
                "type": "prometheus", "uid": "${datasource}"}, where
            assert target["expr"].strip(), where
    _no_overlap(list(_panels(doc)))


def _no_overlap(panels: list[dict[str, Any]]) -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_the_readme_names_each_panels_queries() -> None:
    readme = (MONITORING.parents[1] / "README.md").read_text()
    for panel in _panels(_dashboard()):
        assert f"| {panel['title']} |" in readme, panel["title"]
        for target in panel.get("targets", []):
            assert f"`{target['expr']}`" in readme.replace("\\|", "|"), target["expr"]


# --- what the rules and the dashboard name, against a real agent ----------------------------


def _queries() -> list[str]:
    doc = _dashboard()
    out = [rule["expr"] for rule in _rules()]
    out += [t["expr"] for panel in _panels(doc) for t in panel.get("targets", [])]
    out += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return out


def _labels_used() -> set[str]:
    """Label names in matchers, ``by``/``without`` lists, legends and annotations."""
    used: set[str] = set()
    for query in _queries():
        for inside in re.findall(r"\{([^}]*)\}", query):
            used |= set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", inside))
        for inside in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            used |= {name.strip() for name in inside.split(",") if name.strip()}
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", target.get("legendFormat", "")))
    for rule in _rules():
        for text in rule["annotations"].values():
            used |= set(re.findall(r"\$labels\.([a-z_]+)", text))
    return used


def _exported(text: str) -> tuple[set[str], set[str]]:
    """The series names an agent's /metrics exports (a counter with no sample yet counts
    under its ``_total`` name), and every label name it uses."""
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(f"{family.name}_total")
        for sample in family.samples:
            names.add(sample.name)
            labels |= set(sample.labels)
    return names, labels


def _scrape(node: Node) -> str:
    status = node.status()
    assert status is not None and status["metrics"], status
    with urllib.request.urlopen(f"http://{status['metrics']}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def _conflict(cluster: Cluster) -> None:
    """Both nodes write plan.txt while cut off from each other: a conflict, which puts the
    conflict counter's ``rule`` label on /metrics."""
    cluster.partition([cluster.nodes[0]])
    wait_for(lambda: all(n.up_peers() == 0 for n in cluster.nodes), 20, "the nodes apart")
    for node in cluster.nodes:
        seq = node.status()["seq"]  # type: ignore[index]
        # Sizes differ: rsync's quick check skips a same-size file of the same second.
        (node.data / "plan.txt").write_text(f"{node.name}'s plan\n" * node.index)
        wait_for(lambda node=node, seq=seq: node.status()["seq"] > seq, 10,  # type: ignore[misc, index]
                 f"{node.name} published its write")
    cluster.heal()
    cluster.wait_linked()


@pytest.mark.integration
def test_every_metric_the_rules_and_the_dashboard_name_is_exported(tmp_path: Path) -> None:
    named = {m for query in _queries() for m in METRIC.findall(query)}
    assert len(named) > 20, named
    with running(tmp_path, size=2, nets=NETS,
                 extra_args=["--metrics-listen", "127.0.0.1:0"]) as cluster:
        _conflict(cluster)
        cluster.wait_converged()
        n1, n2 = cluster.nodes
        for node in cluster.nodes:
            text = ""

            def settled(node: Node = node) -> bool:
                nonlocal text
                text = _scrape(node)
                return "mesh_healthy 1.0" in text and "mesh_conflicts_total{" in text

            wait_for(settled, 30, f"{node.name}'s /metrics: healthy, the conflict counted")
            names, labels = _exported(text)
            assert named <= names, f"not exported by {node.name}: {sorted(named - names)}"
            assert _labels_used() <= labels | TARGET_LABELS, sorted(
                _labels_used() - labels - TARGET_LABELS)
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            assert samples[("mesh_agent_info", (("cluster", "test"), ("node", node.name),
                                                ("version", __version__)))] == 1
            assert samples[("mesh_data_filesystem_size_bytes", ())] > 0
            assert samples[("mesh_data_filesystem_avail_bytes", ())] > 0
            other = (n2 if node is n1 else n1).name
            assert samples[("mesh_peer_catching_up", (("peer", other),))] == 0


# --- the metrics added for the alerts, from a status document -------------------------------


def _samples(m: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_health_and_lag_are_what_mesh_health_decides(tmp_path: Path) -> None:
    from mesh.store.index import Index

    doc = status_doc(data_dir=str(tmp_path))
    m = metrics.Metrics("n1", lambda: doc, Index(":memory:"))
    first = _samples(m)
    assert first[("mesh_healthy", ())] == 1 and first[("mesh_lag_entries", ())] == 0
    doc.update(backlog=60, pending_content=50)
    assert _samples(m)[("mesh_healthy", ())] == 0  # 110 > 100, as `mesh health` says
    assert _samples(m)[("mesh_lag_entries", ())] == 110
    doc.update(backlog=0, pending_content=0)
    doc["peers"]["127.0.0.12:8883"]["catching_up"] = True
    after = _samples(m)
    assert after[("mesh_peer_catching_up", (("peer", "n2"),))] == 1
    assert after[("mesh_healthy", ())] == 0
