"""``python -m autograder export``: LMS grade-import CSVs from the gradebook (``autograder/export.py``).

The gradebook is built directly with nbgrader's Gradebook API (no grading run): two assignments (3 and 2 points),
three students; ann submitted both (the second late, with a penalty), bob only the first, cat nothing.
"""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from autograder.export import ExportError, export

pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")  # from inside nbgrader's add_submission

MAPPING = [
    {"student_id": "ann", "lms_id": "1001", "sis_user_id": "S-ann", "name": "Lee, Ann", "section": "A",
     "email": "ann@uni.example", "sis_login_id": "alee"},
    {"student_id": "bob", "lms_id": "1002", "sis_user_id": "S-bob", "name": "", "section": "B",
     "email": "bob@uni.example", "sis_login_id": ""},
    {"student_id": "cat", "lms_id": "1003", "sis_user_id": "", "name": "Cat Z", "section": "A",
     "email": "cat@uni.example", "sis_login_id": ""},
]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID, fast_gradebook_creation

    fast_gradebook_creation()
    root = tmp_path_factory.mktemp("course")
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}", COURSE_ID) as gb:
        for a, nb, cells in (("01_toy", "toy", (("test_double", 1), ("test_norm2", 2))),
                             ("02_toy_next", "next", (("test_quad", 2),))):
            gb.add_assignment(a)
            gb.add_notebook(nb, a)
            for name, points in cells:
                gb.add_grade_cell(name, nb, a, max_score=points, cell_type="code")
        gb.add_student("ann", first_name="Ann", last_name="Lee", email="ann@gradebook.example")
        gb.add_student("bob", first_name="Bob", last_name="Ray")
        gb.add_student("cat")
        gb.add_submission("01_toy", "ann")
        gb.add_submission("02_toy_next", "ann")
        gb.add_submission("01_toy", "bob")
        for (cell, nb, a, student), score in {("test_double", "toy", "01_toy", "ann"): 1,
                                              ("test_norm2", "toy", "01_toy", "ann"): 1.5,
                                              ("test_quad", "next", "02_toy_next", "ann"): 2,
                                              ("test_double", "toy", "01_toy", "bob"): 1,
                                              ("test_norm2", "toy", "01_toy", "bob"): 0}.items():
            gb.find_grade(cell, nb, a, student).auto_score = score
        gb.find_submission_notebook("next", "02_toy_next", "ann").late_submission_penalty = 0.5
        gb.db.commit()
    mapping = root / "mapping.csv"
    write_csv(mapping, MAPPING)
    return root, mapping


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_canvas_headers_points_possible_and_rows(course, tmp_path):
    root, mapping = course
    ids = tmp_path / "ids.csv"
    write_csv(ids, [{"assignment": "01_toy", "lms_id": "555"}])
    dest, left_out = export(root, "canvas", tmp_path / "canvas.csv", mapping=mapping, assignment_ids=ids)
    assert left_out == []
    assert read(dest) == [
        ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "01_toy (555)", "02_toy_next"],
        ["Points Possible", "", "", "", "", "3", "2"],
        ["Lee, Ann", "1001", "S-ann", "alee", "A", "2.5", "1.5"],
        ["Ray, Bob", "1002", "S-bob", "", "B", "1", "0"],  # name from the gradebook where the mapping has none
        ["Cat Z", "1003", "", "", "A", "0", "0"],
    ]


def test_moodle_identifier_column_and_grade_items(course, tmp_path):
    root, mapping = course
    dest, _ = export(root, "moodle", tmp_path / "moodle.csv", mapping=mapping)
    assert read(dest) == [["Email address", "01_toy", "02_toy_next"], ["ann@uni.example", "2.5", "1.5"],
                          ["bob@uni.example", "1", "0"], ["cat@uni.example", "0", "0"]]
    dest, _ = export(root, "moodle", tmp_path / "moodle-id.csv", mapping=mapping, moodle_id="idnumber")
    assert read(dest)[0] == ["ID number", "01_toy", "02_toy_next"] and read(dest)[1][0] == "1001"


def test_plain_csv_with_and_without_mapping(course, tmp_path):
    root, mapping = course
    dest, _ = export(root, "csv", tmp_path / "plain.csv")
    assert read(dest) == [["student_id", "lms_id", "name", "section", "email", "01_toy", "02_toy_next", "total"],
                          ["ann", "", "Lee, Ann", "", "ann@gradebook.example", "2.5", "1.5", "4"],
                          ["bob", "", "Ray, Bob", "", "", "1", "0", "1"],
                          ["cat", "", "cat", "", "", "0", "0", "0"]]
    dest, _ = export(root, "csv", tmp_path / "mapped.csv", mapping=mapping)
    assert read(dest)[1][:5] == ["ann", "1001", "Lee, Ann", "A", "ann@uni.example"]


def test_missing_mapping_rows_are_listed_and_nothing_is_written(course, tmp_path):
    root, _ = course
    partial = tmp_path / "partial.csv"
    write_csv(partial, MAPPING[:1])
    dest = tmp_path / "canvas.csv"
    dest.write_text("previous export\n")
    with pytest.raises(ExportError, match=r"2 student\(s\).*bob, cat.*--allow-unmapped"):
        export(root, "canvas", dest, mapping=partial)
    assert dest.read_text() == "previous export\n", "a failed export must leave the old file as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canvas.csv", "partial.csv"], "no temporary file left"
    written, left_out = export(root, "canvas", dest, mapping=partial, allow_unmapped=True)
    assert left_out == ["bob", "cat"] and [r[0] for r in read(written)] == ["Student", "Points Possible", "Lee, Ann"]
    # csv keeps the unmapped students, with empty LMS fields
    plain, _ = export(root, "csv", tmp_path / "plain.csv", mapping=partial, allow_unmapped=True)
    assert [r[:2] for r in read(plain)[1:]] == [["ann", "1001"], ["bob", ""], ["cat", ""]]


def test_other_input_errors(course, tmp_path):
    root, mapping = course
    with pytest.raises(ExportError, match="needs --mapping"):
        export(root, "canvas", tmp_path / "x.csv")
    with pytest.raises(ExportError, match="No gradebook"):
        export(tmp_path, "csv", tmp_path / "x.csv")
    dup = tmp_path / "dup.csv"
    write_csv(dup, MAPPING + MAPPING[:1])
    with pytest.raises(ExportError, match="'ann' appears twice"):
        export(root, "moodle", tmp_path / "x.csv", mapping=dup)
    no_email = tmp_path / "no_email.csv"
    write_csv(no_email, [dict(r, email="") for r in MAPPING])
    with pytest.raises(ExportError, match="email, empty for: bob, cat;"):  # ann's comes from the gradebook
        export(root, "moodle", tmp_path / "x.csv", mapping=no_email)
    no_ids = tmp_path / "no_ids.csv"
    write_csv(no_ids, [dict(r, lms_id="", sis_user_id="", sis_login_id="") for r in MAPPING])
    with pytest.raises(ExportError, match="ID, SIS User ID or SIS Login ID"):
        export(root, "canvas", tmp_path / "x.csv", mapping=no_ids)
    assert not (tmp_path / "x.csv").exists()


def test_command_line(course, tmp_path):
    root, mapping = course
    cmd = [sys.executable, "-m", "autograder", "export", "--format", "canvas", "--course", str(root),
           "--out", str(tmp_path / "c.csv"), "--mapping", str(mapping)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read(tmp_path / "c.csv")[0][:5] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
    done = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs --mapping" in done.stderr
