"""Grading across hosts (``autograder/shard.py``, ``autograder/slurm/``): two shards of the toy course graded one
after the other through the Slurm job script, merged through the merge script, must equal one unsharded run;
a regrade of one shard followed by a merge changes only that shard's rows; inconsistent shards are refused.

Four students of one assignment: ann (her own long ``norm2``) and bob (the reference) hash to shard 1/2, cat (a
copy of ann's ``norm2``) and dan (a faulty, cheating notebook) to shard 2/2, so the copy is seen only by a
merge that compares the whole class.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autograder.shard import Shard, shard_of
from autograder.testing import BAD_CASES, TOY_CHECKS_MODULE, dump, substitute
from helpers.course import KIT_ROOT
from test_autograder import TIMEOUT, gradebook, grade, rows, toy  # noqa: F401 - toy is a fixture
from test_similarity import NORM2_COPY, NORM2_ORIGINAL

SLURM = KIT_ROOT / "autograder" / "slurm"
SHARD_OF = {"ann": 1, "bob": 1, "cat": 2, "dan": 2}
OPTIONS = ["--checks", TOY_CHECKS_MODULE, "--workers", "1", "--timeout", str(TIMEOUT), "--memory-gb", "3"]


def test_students_hash_to_the_shards_the_test_assumes():
    assert {s: shard_of(s, 2) for s in SHARD_OF} == SHARD_OF


def test_shards_spread_students_evenly():
    shards = [shard_of(f"student-{k:03d}", 4) for k in range(400)]
    sizes = [shards.count(i) for i in (1, 2, 3, 4)]
    assert sum(sizes) == 400 and min(sizes) > 70, sizes  # about 100 each; 1-based, none outside 1..4


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "-1/2"])
def test_bad_shard_values_are_refused(text):
    with pytest.raises(ValueError, match="I/N"):
        Shard.parse(text)


def test_the_command_line_rejects_a_bad_shard(tmp_path):
    done = subprocess.run([sys.executable, "-m", "autograder", "grade", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--shard", "3/2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "between 1 and N" in done.stderr and not (tmp_path / "o").exists()


def _slurm(script: str, args: list[str], env: dict, task: int | None = None) -> subprocess.CompletedProcess:
    env = dict(env, PYTHON=sys.executable, KIT_DIR=str(KIT_ROOT))
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    return subprocess.run(["bash", str(SLURM / script), *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def course(toy, tmp_path_factory):
    """The class graded once unsharded and as shards 1/2 and 2/2 (grade.sbatch), merged (merge.sbatch)."""
    source, files, env = toy
    root = tmp_path_factory.mktemp("shard")
    sub = root / "submitted"
    name, ref = files.notebook("01_toy")
    for student, nb in (("ann", substitute(ref, "norm2", NORM2_ORIGINAL)), ("bob", ref),
                        ("cat", substitute(ref, "norm2", NORM2_COPY))):
        files.write(sub / student / "01_toy", {f"{name}.ipynb": dump(nb)})
    files.write(sub / "dan" / "01_toy", BAD_CASES["monkeypatch"](files, "01_toy"))
    done = grade(sub, root / "whole", source, env, 1)
    assert done.returncode == 0, done.stdout + done.stderr
    graded = root / "graded"
    for i in (1, 2):
        done = _slurm("grade.sbatch", ["2", str(sub), str(graded), "--source", str(source), *OPTIONS], env, task=i)
        assert done.returncode == 0, done.stdout + done.stderr
    done = _slurm("merge.sbatch", ["2", str(graded)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "sub": sub, "whole": root / "whole", "graded": graded, "merged": graded / "course",
            "source": source, "env": env, "merge_stdout": done.stdout}


def test_each_shard_holds_only_its_students(course):
    for i in (1, 2):
        out = course["graded"] / f"shard-{i}-of-2"
        assert {r["student_id"] for r in rows(out / "cells.csv")} == {s for s, k in SHARD_OF.items() if k == i}
        assert json.loads((out / "shard.json").read_text())["index"] == i


def test_merged_scores_equal_one_unsharded_run(course):
    whole, merged = course["whole"], course["merged"]
    assert gradebook(merged) == gradebook(whole)
    for name in ("cells.csv", "grades.csv", "similarity.csv"):
        assert rows(merged / name) == rows(whole / name), name
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "worker")} for r in rows(merged / "submissions.csv")]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "worker")}
                     for r in rows(whole / "submissions.csv")]
    for student in SHARD_OF:
        assert (merged / "autograded" / student / "01_toy" / "toy.ipynb").is_file()
        assert (merged / "feedback" / student / "01_toy" / "toy.html").is_file()
        assert (merged / "submitted" / student / "01_toy" / "toy.ipynb").is_file()
    assert str(merged) in (merged / "nbgrader_config.py").read_text()


def test_merge_recomputes_copy_detection_over_all_shards(course):
    def flagged(out: Path) -> set:
        return {(r["student_id"], r["grade_id"]) for r in rows(out / "similarity.csv") if r["flagged"] == "yes"}

    assert ("cat", "norm2") in flagged(course["merged"]) and ("ann", "norm2") in flagged(course["merged"])
    for i in (1, 2):  # each shard alone saw one side of the copy
        assert not {("ann", "norm2"), ("cat", "norm2")} & flagged(course["graded"] / f"shard-{i}-of-2")
    assert "similarity over all shards" in course["merge_stdout"]


def test_regrading_one_shard_then_merging_updates_only_its_rows(course, tmp_path):
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID

    merged, source, env = course["merged"], course["source"], course["env"]
    with Gradebook(f"sqlite:///{merged / 'gradebook.db'}", COURSE_ID) as gb:  # graders at work on the merged folder
        gb.find_grade("explain", "toy", "01_toy", "ann").manual_score = 1
        gb.find_grade("explain", "toy", "01_toy", "dan").manual_score = 0.5
        gb.db.commit()
    before = {"book": gradebook(merged), "cells": rows(merged / "cells.csv")}
    ann_notebook = (merged / "autograded" / "ann" / "01_toy" / "toy.ipynb").stat().st_mtime_ns
    # dan hands in an honest notebook; only his shard is regraded (nbgrader's way: a folder with him alone)
    resubmitted = tmp_path / "submitted"
    shutil.copytree(course["sub"] / "dan", resubmitted / "dan")
    shutil.copyfile(course["sub"] / "bob" / "01_toy" / "toy.ipynb", resubmitted / "dan" / "01_toy" / "toy.ipynb")
    done = _slurm("grade.sbatch", ["2", str(resubmitted), str(course["graded"]), "--source", str(source), *OPTIONS],
                  env, task=2)
    assert done.returncode == 0, done.stdout + done.stderr
    done = _slurm("merge.sbatch", ["2", str(course["graded"])], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged shards 2; kept as merged before: 1" in done.stdout
    after = {"book": gradebook(merged), "cells": rows(merged / "cells.csv")}

    def of(table: list, shard: int) -> list:
        return [r for r in table if SHARD_OF[r[0] if isinstance(r, tuple) else r["student_id"]] == shard]

    assert of(after["book"], 1) == of(before["book"], 1), "the merge touched shard 1's gradebook rows"
    unscored = [{k: v for k, v in r.items() if k != "score"} for r in of(after["cells"], 1)]
    assert unscored == [{k: v for k, v in r.items() if k != "score"} for r in of(before["cells"], 1)]
    scores = {(r["student_id"], r["grade_id"]): float(r["score"]) for r in after["cells"]}
    assert scores[("ann", "explain")] == 1, "cells.csv's scores are re-read from the merged gradebook"
    assert (merged / "autograded" / "ann" / "01_toy" / "toy.ipynb").stat().st_mtime_ns == ann_notebook
    dan = {r[3]: r for r in after["book"] if r[0] == "dan"}
    assert (dan["test_double"][4], dan["test_norm2"][4]) == (1, 2), "dan's regrade did not reach the merge"
    assert dan["explain"][5] == 0.5 and dan["explain"][6], "a manual grade is kept and flagged for review"
    grades = {r["student_id"]: float(r["score"]) for r in rows(merged / "grades.csv") if r["assignment"] == "01_toy"}
    assert grades == {"ann": 4, "bob": 3, "cat": 3, "dan": 3.5}
    # cat (shard 2, not in the regrade's folder) keeps the rows of the first merge
    for name in ("cells.csv", "submissions.csv"):
        assert {r["student_id"] for r in rows(merged / name)} == set(SHARD_OF), name
    assert [r for r in after["cells"] if r["student_id"] == "cat"] == [r for r in before["cells"] if r["student_id"] == "cat"]
    done = _slurm("merge.sbatch", ["2", str(course["graded"])], env)  # nothing new: nothing written
    assert done.returncode == 0 and "nothing to merge" in done.stdout


def _copy_shard(src: Path, dest: Path, **marker) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    data = json.loads((dest / "shard.json").read_text())
    (dest / "shard.json").write_text(json.dumps({**data, **marker}))
    return dest


@pytest.mark.parametrize("kind", ["overlap", "same_index", "different_n", "different_source", "missing"])
def test_inconsistent_shards_are_refused_and_nothing_is_written(course, tmp_path, kind):
    one, two = course["graded"] / "shard-1-of-2", course["graded"] / "shard-2-of-2"
    if kind == "overlap":  # shard 1's folder relabelled as shard 2: its students would be in two shards
        shards, message = [one, _copy_shard(one, tmp_path / "x", index=2)], "overlapping shards: student 'ann'"
    elif kind == "same_index":
        shards, message = [one, _copy_shard(one, tmp_path / "x")], "given twice"
    elif kind == "different_n":
        shards, message = [one, _copy_shard(two, tmp_path / "x", count=3)], "different N"
    elif kind == "different_source":
        x = _copy_shard(two, tmp_path / "x")
        (x / "source" / "01_toy" / "toy.ipynb").write_text((x / "source" / "01_toy" / "toy.ipynb").read_text() + " ")
        shards, message = [one, x], "different source notebooks"
    else:
        shards, message = [one], "shards 2/2 missing"
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "autograder", "merge", *map(str, shards), "--out", str(out)],
                          env=course["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))


def test_merge_never_overwrites_a_folder_that_is_not_a_merge(course, tmp_path):
    shards = [course["graded"] / f"shard-{i}-of-2" for i in (1, 2)]
    for out in (course["whole"], tmp_path / "notes"):
        if not out.exists():
            out.mkdir()
            (out / "mine.txt").write_text("keep me")
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        done = subprocess.run([sys.executable, "-m", "autograder", "merge", *map(str, shards), "--out", str(out)],
                              env=course["env"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "is not a merged course folder" in done.stderr, done.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_shard_folder_refuses_another_shard_or_an_unsharded_grading(course):
    one = course["graded"] / "shard-1-of-2"
    for extra in (["--shard", "2/2"], []):
        done = grade(course["sub"], one, course["source"], course["env"], 1) if not extra else subprocess.run(
            [sys.executable, "-m", "autograder", "grade", str(course["sub"]), "--out", str(one), "--source",
             str(course["source"]), *OPTIONS, *extra], env=course["env"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "holds shard 1/2" in done.stderr, done.stderr


def test_submit_script_chains_the_merge_after_the_whole_array(tmp_path):
    """submit.sh with a stand-in ``sbatch`` that records its arguments (no Slurm here)."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho "4242;cluster"\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(SLURM / "submit.sh"), "3", "subs", "graded", "--workers", "2"],
                          env={"PATH": f"{fake.parent}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    grade_call, merge_call = log.read_text().splitlines()
    assert grade_call.startswith("--parsable --array=1-3 ") and grade_call.endswith(
        "grade.sbatch 3 subs graded --workers 2")
    assert merge_call.startswith("--parsable --dependency=afterok:4242 ") and merge_call.endswith("merge.sbatch 3 graded")
