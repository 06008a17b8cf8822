"""``python -m autograder bench --vs-nbgrader`` on the toy course: plain ``nbgrader autograde`` and the kit grade the
same reference and faulty submissions; the JSON holds the three runs and a row per submission, and the rows say
what the two graders are known to do (agree on honest work, differ on a patched kernel, no grade from plain
nbgrader for a file that is not a notebook). Timing is recorded, never asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autograder.testing import TOY_CHECKS_MODULE
from test_autograder import toy  # noqa: F401 - the toy course fixture

pytestmark = pytest.mark.slow


def test_plain_nbgrader_and_the_kit_on_the_same_submissions(toy, tmp_path):
    source, _, env = toy
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "autograder", "bench", "--vs-nbgrader", "--copies", "1", "--workers",
                           "2", "--assignment", "01_toy", "--timeout", "20", "--memory-gb", "3", "--source", str(source),
                           "--checks", TOY_CHECKS_MODULE, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["runs"]) == {"nbgrader", "kit_serial", "kit_parallel"}
    assert result["runs"]["kit_parallel"]["workers"] == 2 and result["kit_serial_equals_parallel"]
    assert all(r["per_minute"] > 0 for r in result["runs"].values())
    rows = {r["case"]: r for r in result["submissions_compared"]}
    assert set(rows) == {"reference", "blank", "constant", "monkeypatch", "truncated_json"}
    for case, score in (("reference", 3), ("blank", 0), ("constant", 0)):  # 01_toy: double 1 + norm2 2 points
        assert (rows[case]["kit_score"], rows[case]["nbgrader_score"], rows[case]["agree"]) == (score, score, True)
    cheat = rows["monkeypatch"]
    assert (cheat["kit_score"], cheat["nbgrader_score"], cheat["agree"]) == (0, 3, False)
    assert "recheck_failed" in cheat["kit_statuses"] and "patches the tests" in cheat["why"]
    broken = rows["truncated_json"]
    assert not broken["nbgrader_graded"] and broken["nbgrader_score"] is None and broken["agree"] is None
    assert broken["kit_statuses"] == ["invalid_notebook"] and result["runs"]["nbgrader"]["exit_codes"]["01_toy"] != 0
    assert "could not grade" in done.stdout and "ratio vs plain nbgrader" in done.stdout
