"""`mesh versions` and `mesh restore` on the command's side, and the keep area's line in
`mesh health` (issue 14); against a cluster: tests/integration/test_keep.py."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mesh.cli import app
from mesh.cli.ops import keep_notes

runner = CliRunner()


def test_versions_wants_a_path_or_deleted_not_both(tmp_path: Path) -> None:
    for args in ([], ["a.txt", "--deleted"], ["a.txt", "--since", "1h"]):
        result = runner.invoke(app, ["versions", *args, "--state-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output


def test_versions_without_an_agent_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["versions", "a.txt", "--state-dir", str(tmp_path)])
    assert result.exit_code == 3 and "no agent is running" in result.output


def test_health_warns_only_when_the_keep_area_is_over_its_cap() -> None:
    keep = {"bytes": 3 << 20, "cap_bytes": 2 << 20, "held_bytes": 1 << 20}
    [note] = keep_notes({"keep": keep})
    assert "over its cap: 3.0 MiB of 2.0 MiB, 1.0 MiB" in note
    assert keep_notes({"keep": {**keep, "cap_bytes": 4 << 20}}) == []
    assert keep_notes({"keep": {**keep, "cap_bytes": None}}) == []
    assert keep_notes({}) == []
