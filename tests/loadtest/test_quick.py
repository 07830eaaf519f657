"""The load-test harness's ``quick`` profile on a real local cluster (issue 7).

Runs ``python -m loadtest run --profile quick`` as the CI would, on addresses of its
own (127.0.2.x: away from the other cluster tests and from the harness's default), and
checks what the report says — never how fast: no lost write, every node converged,
every conflict the workload made on purpose logged. The harness's own deadlines bound
the run; a subprocess timeout bounds the harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.loadtest.harness import run_profile

pytestmark = pytest.mark.integration

NET = "127.0.2"


def run_quick(tmp_path: Path) -> tuple[int, str]:
    return run_profile(tmp_path, "--profile", "quick", "--nodes", "3", "--net", NET)


def test_quick_profile_loses_nothing_and_logs_every_conflict(tmp_path: Path) -> None:
    code, output = run_quick(tmp_path)
    assert code in (0, 1), f"the harness failed (exit {code}):\n{output[-4000:]}"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    detail = (tmp_path / "report" / "report.md").read_text()
    assert report["converged"] is True, "not converged\n" + detail
    assert report["lost_writes"] == 0, "lost writes\n" + detail
    assert report["conflicts_expected"] > 0, "the storms made no conflict\n" + detail
    assert report["conflicts_missing"] == 0, "expected conflicts not logged\n" + detail
    assert report["conflicts_logged"] >= report["conflicts_expected"], detail
    # what the report must hold (issue 7)
    for key in ("p50", "p95", "p99", "max"):
        assert report["latency_ms"][key] is not None
    assert set(report["cpu_s"]) == set(report["peak_rss_mb"]) == {"n1", "n2", "n3"}
    assert report["throughput_files_s"] > 0 and report["converge_s"] is not None
    for chart in ("latency_cdf.png", "throughput.png", "comparison.png"):
        assert (tmp_path / "report" / chart).stat().st_size > 0
    assert code == 0, output[-4000:]
