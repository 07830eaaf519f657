"""The load harness's ``faults`` profile, 30 s, on a real local cluster (issue 11).

Runs ``python -m loadtest run --profile faults --duration 30 --seed 9`` as a user
would, on addresses of its own (127.0.6.x: away from the other cluster tests, the
quick profile's 127.0.2 and the harness's default), and requires nothing lost:
no lost write, no delete undone, no content that no write made, the same
conflict log on every node, converged, and an empty node's join that changes
nothing. The plan is a function of the seed (the same ops, faults and times
every run); what the agents make of it is not. The harness's own deadlines bound
the run; a subprocess timeout bounds the harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.loadtest.harness import run_profile

pytestmark = pytest.mark.integration

NET = "127.0.6"
SEED = 9


def run_faults(tmp_path: Path) -> tuple[int, str]:
    return run_profile(tmp_path, "--profile", "faults", "--duration", "30", "--seed", str(SEED),
                       "--nodes", "3", "--net", NET)


def test_faults_profile_loses_nothing(tmp_path: Path) -> None:
    code, output = run_faults(tmp_path)
    assert code in (0, 1), f"the harness failed (exit {code}):\n{output[-4000:]}"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    text = (tmp_path / "report" / "report.md").read_text()
    # the run's paragraph: counts, faults, the join, each finding's path history
    detail = text[text.find("## faults"):text.find("![")]
    # the plan did what the profile is for
    kinds = {f["kind"] for f in report["faults"]}
    assert {"kill", "start", "freeze", "thaw", "partition", "heal"} <= kinds, kinds
    assert len(report["kills_during_push"]) >= 2, report["kills_during_push"]
    assert report["ops"].get("rmdir", 0) > 0 and report["conflicts_expected"] > 0, detail
    # nothing lost
    findings = {
        "converged": report["converged"],
        "lost writes": report["lost_writes"],
        "deletes undone": report["resurrected_deletes"],
        "invented content": report["invented_content"],
        "conflict logs identical": report["conflict_logs_identical"],
        "empty node's join changed nothing": report["join"]["ok"],
    }
    assert findings == {
        "converged": True, "lost writes": 0, "deletes undone": 0, "invented content": 0,
        "conflict logs identical": True, "empty node's join changed nothing": True,
    }, f"{findings}\n\n{detail}"
