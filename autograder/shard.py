"""Grading across hosts: ``grade --shard I/N`` grades a deterministic share of the students, ``merge`` puts the
shards' course folders together (issue 17, item 4).

A student belongs to shard ``sha256(student_id) mod N + 1`` (``I`` is 1-based, as Slurm's ``--array=1-N``): the
share depends on the student's id and ``N`` only, so adding students never moves anyone else, and every
submission of a student lands in the same shard. Each shard's ``OUT_DIR`` is an ordinary graded course folder plus
``shard.json`` (which shard, the graded source's digest, the batteries, the seed, a fresh id per grading run).

:func:`merge` writes one course folder from all ``N`` shards: the gradebook through nbgrader's ``Gradebook`` API,
``autograded/``, ``feedback/``, ``submitted/`` and ``logs/`` per student, ``cells.csv`` and ``submissions.csv``
(the shards' rows, scores re-read from the merged gradebook), ``grades.csv`` (nbgrader's CSV export of the merged
gradebook) and the copy check over the whole class (``similarity.csv`` and the gradebook notes, recomputed from
the autograded notebooks: inside a shard it saw only that shard's students). It refuses inconsistent shards and
never destroys an existing folder: the merge is built in a sibling folder and swapped in at the end.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Shard", "shard_of", "MARKER", "MERGE_MARKER", "write_marker", "check_out_dir", "source_digest",
           "merge", "MergeSummary", "mark_in_progress"]

MARKER = "shard.json"  # in a shard's OUT_DIR
MERGE_MARKER = "merge.json"  # in a merged OUT_DIR
SCHEME = "sha256(student_id) mod N + 1"


def shard_of(student: str, count: int) -> int:
    """The 1-based shard of ``student`` among ``count`` shards (stable: depends on the id and ``count`` only)."""
    return int.from_bytes(hashlib.sha256(student.encode("utf-8")).digest()[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1 <= index <= count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 1 <= I <= N; a clear ``ValueError`` otherwise."""
        hint = "give --shard I/N with whole numbers 1 <= I <= N, e.g. --shard 1/4 ... --shard 4/4"
        parts = str(text).strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--shard {text!r} is not of the form I/N: {hint}")
        index, count = (int(p) for p in parts)
        if count < 1 or not 1 <= index <= count:
            raise ValueError(f"--shard {text!r}: I must be between 1 and N (shards are numbered from 1): {hint}")
        return cls(index, count)

    def holds(self, student: str) -> bool:
        return shard_of(student, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def source_digest(source: Path) -> str:
    """SHA-256 over the names and bytes of the source notebooks (``<assignment>/<notebook>.ipynb``)."""
    h = hashlib.sha256()
    for path in sorted(Path(source).glob("*/*.ipynb")):
        h.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable ({err}): was the folder written by `python -m autograder`?") from err


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_out_dir(out: Path, shard: Shard | None) -> None:
    """Refuse to mix a shard with another shard, an unsharded grading or a merged folder in one ``OUT_DIR``."""
    if (out / MERGE_MARKER).exists():
        raise ValueError(f"{out} is a merged course folder ({MERGE_MARKER}): grade the shards into their own folders "
                         "and run `python -m autograder merge` again")
    if (out / MARKER).exists():
        recorded = _read_json(out / MARKER)
        if shard is None or (recorded.get("index"), recorded.get("count")) != (shard.index, shard.count):
            raise ValueError(f"{out} holds shard {recorded.get('index')}/{recorded.get('count')} ({MARKER}): regrade "
                             f"it with --shard {recorded.get('index')}/{recorded.get('count')}, or grade into another folder")
    elif shard is not None and (out / "gradebook.db").exists():
        raise ValueError(f"{out} already holds an unsharded grading: grade shard {shard} into a new folder")


def mark_in_progress(out: Path) -> None:
    """Before a shard is regraded: its ``run_id`` is cleared until the grading finishes (merge refuses it until then)."""
    if (out / MARKER).is_file():
        marker = _read_json(out / MARKER)
        marker["run_id"] = None
        _write_json(out / MARKER, marker)


def write_marker(out: Path, shard: Shard, source: Path, check_modules: Sequence[str], check_seed: int) -> None:
    """``OUT_DIR/shard.json``: what :func:`merge` checks the shards against; a fresh ``run_id`` per grading run."""
    _write_json(out / MARKER, {"index": shard.index, "count": shard.count, "scheme": SCHEME,
                               "source_digest": source_digest(source), "checks": list(check_modules),
                               "check_seed": check_seed, "run_id": uuid.uuid4().hex,
                               "graded_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})


# --- merge ------------------------------------------------------------------------------------------------

@dataclass
class _ShardDir:
    path: Path
    marker: dict
    digest: str
    students: set[str]

    @property
    def label(self) -> str:
        return f"{self.path} (shard {self.marker['index']}/{self.marker['count']})"


@dataclass
class MergeSummary:
    """What a merge did: the shards whose rows were (re)written, those kept as merged before, the students."""

    out_dir: Path
    updated: list[int]
    unchanged: list[int]
    students: int
    flagged: list


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _students(out: Path) -> set[str]:
    """Students of a graded folder: the gradebook's and those with only unknown folders (``cells.csv``)."""
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID

    with Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as gb:
        found = {s.id for s in gb.students}
    return found | {r["student_id"] for r in _csv_rows(out / "cells.csv")}


def _open_shard(path: Path) -> _ShardDir:
    path = Path(path).resolve()
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a shard's output (no {MARKER}): grade it with "
                         "`python -m autograder grade SUBMITTED --out DIR --shard I/N`")
    for needed in ("gradebook.db", "source", "cells.csv"):
        if not (path / needed).exists():
            raise ValueError(f"{path} has no {needed}: its grading did not finish; grade that shard again")
    marker = _read_json(path / MARKER)
    if not marker.get("run_id"):
        raise ValueError(f"{path}: the grading of this shard did not finish (or is still running); grade it again "
                         f"with --shard {marker.get('index')}/{marker.get('count')}")
    return _ShardDir(path, marker, source_digest(path / "source"), _students(path))


def _check_consistent(shards: list[_ShardDir], previous: dict | None) -> None:
    """Same N, source, batteries and seed; each index once; each student in one shard, the one its id hashes to."""
    first = shards[0]
    for s in shards[1:]:
        if s.marker["count"] != first.marker["count"]:
            raise ValueError(f"different N: {first.label} and {s.label}; grade every shard with the same N")
        if s.digest != first.digest:
            raise ValueError(f"different source notebooks: {first.label} and {s.label} were graded against different "
                             "solutions; regrade the stale shards with the same --source")
        for key in ("checks", "check_seed"):
            if s.marker.get(key) != first.marker.get(key):
                raise ValueError(f"different {key}: {first.label} has {first.marker.get(key)!r}, {s.label} "
                                 f"{s.marker.get(key)!r}; regrade with the same settings")
    seen: dict[int, _ShardDir] = {}
    for s in shards:
        if s.marker["index"] in seen:
            raise ValueError(f"shard {s.marker['index']}/{s.marker['count']} given twice: "
                             f"{seen[s.marker['index']].path} and {s.path}")
        seen[s.marker["index"]] = s
    owner: dict[str, _ShardDir] = {}
    for s in shards:
        for student in sorted(s.students):
            if student in owner:
                raise ValueError(f"overlapping shards: student {student!r} is in {owner[student].label} and in "
                                 f"{s.label}; each student must be graded in one shard only")
            owner[student] = s
    for student, s in owner.items():
        home = shard_of(student, s.marker["count"])
        if home != s.marker["index"]:
            raise ValueError(f"student {student!r} is in {s.label} but belongs to shard {home}/{s.marker['count']} "
                             f"({SCHEME}): regrade that folder with its own --shard")
    if previous is not None:
        if previous["count"] != first.marker["count"]:
            raise ValueError(f"the merged folder was built from N={previous['count']} shards, these are "
                             f"N={first.marker['count']}: merge into a new folder")
        for key in ("checks", "check_seed"):
            if previous.get(key) != first.marker.get(key):
                raise ValueError(f"different {key} than the merged folder ({previous.get(key)!r}): merge into a new "
                                 "folder or regrade with the same settings")
    given = set(seen)
    kept = set(int(i) for i in (previous or {}).get("shards", {})) - given
    missing = sorted(set(range(1, first.marker["count"] + 1)) - given - kept)
    if missing:
        count = first.marker["count"]
        raise ValueError(f"shards {', '.join(f'{i}/{count}' for i in missing)} missing: pass every "
                         "shard's OUT_DIR (a merged folder may be updated from some of them once it holds all)")
    if kept and previous["source_digest"] != first.digest:
        raise ValueError(f"the shards given were graded against other solutions than shards "
                         f"{sorted(kept)} of the merged folder: regrade and pass every shard")


def _copy_submission(src, dst, student: str, assignment: str) -> None:
    """One submission from the shard's gradebook into the merged one (nbgrader's ``Gradebook`` API). Automatic
    fields come from the shard; a manual grade or comment entered in the merged gradebook is kept (and, as on a
    regrade, the cell is flagged for review); one entered in the shard's formgrader fills an empty one."""
    s = src.find_student(student)
    dst.update_or_create_student(student, first_name=s.first_name, last_name=s.last_name, email=s.email,
                                 lms_user_id=s.lms_user_id)
    sub = src.find_submission(assignment, student)
    fields = {"timestamp": sub.timestamp} if sub.timestamp is not None else {}
    dst.update_or_create_submission(assignment, student, **fields)
    for nb in sub.notebooks:
        target = dst.find_submission_notebook(nb.name, assignment, student)
        target.late_submission_penalty = nb.late_submission_penalty
        for g in nb.grades:
            d = dst.find_grade(g.name, nb.name, assignment, student)
            kept_manual = d.manual_score is not None
            d.auto_score = g.auto_score
            d.manual_score = d.manual_score if kept_manual else g.manual_score
            d.extra_credit = d.extra_credit if d.extra_credit is not None else g.extra_credit
            d.needs_manual_grade = bool(g.needs_manual_grade or kept_manual)
        for c in nb.comments:
            d = dst.find_comment(c.name, nb.name, assignment, student)
            d.auto_comment = c.auto_comment
            d.manual_comment = d.manual_comment if d.manual_comment is not None else c.manual_comment
    dst.db.commit()


def _replace_tree(src: Path, dst: Path) -> None:
    from autograder.grade import _rmtree

    _rmtree(dst)
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, symlinks=True)


def _merge_shard(shard: _ShardDir, out: Path) -> None:
    """The shard's gradebook rows and per-student folders into ``out``."""
    from nbgrader.api import Gradebook

    from autograder.config import COURSE_ID

    with Gradebook(f"sqlite:///{(shard.path / 'gradebook.db').resolve()}", COURSE_ID) as src, \
            Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as dst:
        keys = sorted((st.id, sub.assignment.name) for st in src.students for sub in st.submissions)
        for student, assignment in keys:
            _copy_submission(src, dst, student, assignment)
    for student in sorted(shard.students):
        for folder in ("autograded", "feedback", "submitted", "logs"):
            _replace_tree(shard.path / folder / student, out / folder / student)
    for log in sorted((shard.path / "logs").glob("worker-*.log")):
        dest = out / "logs" / f"shard-{shard.marker['index']}" / log.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)


def _sort_key(row: dict) -> tuple:
    """The unsharded grade command's order: graded submissions by (student, assignment), then unknown folders."""
    from autograder.types import Status

    return (row["status"] == Status.UNKNOWN_ASSIGNMENT, row["student_id"], row["assignment"])


def _write_reports(out: Path, replaced: dict[str, Path], similar: Iterable) -> None:
    """``grades.csv`` from the merged gradebook; ``cells.csv`` and ``submissions.csv``: the rows of the shards in
    ``replaced`` (student -> shard folder) and, for every (student, assignment) they do not list, the rows ``out``
    held, with scores re-read from the merged gradebook (manual grades count) and the similarity of the whole class."""
    from nbgrader.api import Gradebook
    from nbgrader.plugins import CsvExportPlugin

    from autograder.config import COURSE_ID
    from autograder.grade import CELL_COLUMNS, SUBMISSION_COLUMNS, _fmt, _scores, _write_csv
    from autograder.types import Status

    with Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as gb:
        CsvExportPlugin(to=str(out / "grades.csv")).export(gb)
    scores = _scores(out)
    similarity = {(c.student, c.assignment, c.notebook, c.grade_id): f"{c.max_similarity:.2f}" for c in similar}
    tables = {}
    for name in ("cells.csv", "submissions.csv"):
        # a shard regraded for some of its students lists only those: the others keep their merged rows
        fresh = [r for shard in sorted(set(replaced.values())) for r in _csv_rows(shard / name)
                 if replaced.get(r["student_id"]) == shard]
        keys = {(r["student_id"], r["assignment"]) for r in fresh}
        kept = [r for r in _csv_rows(out / name) if (r["student_id"], r["assignment"]) not in keys]
        tables[name] = sorted(kept + fresh, key=_sort_key)
    totals: dict[tuple[str, str], float] = {}
    for r in tables["cells.csv"]:
        if r["status"] == Status.UNKNOWN_ASSIGNMENT:
            continue
        score = scores.get((r["student_id"], r["assignment"], r["notebook"], r["grade_id"]))
        r["score"] = _fmt(score)
        r["similarity"] = similarity.get((r["student_id"], r["assignment"], r["notebook"],
                                          r["grade_id"].removeprefix("test_")), "")
        key = (r["student_id"], r["assignment"])
        totals[key] = totals.get(key, 0.0) + (score or 0.0)
    for r in tables["submissions.csv"]:
        if r["status"] != Status.UNKNOWN_ASSIGNMENT:
            r["score"] = _fmt(totals.get((r["student_id"], r["assignment"]), 0.0))
    _write_csv(out / "cells.csv", CELL_COLUMNS, tables["cells.csv"])
    _write_csv(out / "submissions.csv", SUBMISSION_COLUMNS, tables["submissions.csv"])


def _previous(out: Path) -> dict | None:
    """The merge record of an existing ``out``; ``None`` for a new or empty folder; refuse anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    if (out / MERGE_MARKER).is_file():
        return _read_json(out / MERGE_MARKER)
    if any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not a merged course folder (no {MERGE_MARKER}): it is left as "
                         "it is; give a new folder, or the folder of an earlier merge to update it")
    return None


def merge(shard_dirs: Sequence[str | Path], out_dir: str | Path, progress: bool = False) -> MergeSummary:
    """Merge the shards' course folders into ``out_dir`` (new, empty, or an earlier merge of the same shards, whose
    manual grades are kept). Shards whose grading run is the one merged before are left as they are."""
    from autograder.grade import _rmtree, _similarity, prepare_course, write_nbgrader_config

    out = Path(out_dir).resolve()
    paths = [Path(p).resolve() for p in shard_dirs]
    if not paths:
        raise ValueError("give the shards' OUT_DIRs: python -m autograder merge OUT_1 ... OUT_N --out OUT")
    for p in paths:
        if p == out or out.is_relative_to(p) or p.is_relative_to(out):
            raise ValueError(f"--out {out} must lie outside the shard folder {p}")
    if len(set(paths)) != len(paths):
        raise ValueError("a shard folder is given twice")
    shards = [_open_shard(p) for p in paths]
    previous = _previous(out)
    _check_consistent(shards, previous)
    recorded = (previous or {}).get("shards", {})
    changed = [s for s in shards if recorded.get(str(s.marker["index"]), {}).get("run_id") != s.marker["run_id"]]
    unchanged = sorted(int(i) for i in recorded if int(i) not in {s.marker["index"] for s in changed})
    if not changed:
        return MergeSummary(out, [], unchanged, sum(len(v["students"]) for v in recorded.values()), [])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        if previous is not None:
            shutil.rmtree(staging)
            shutil.copytree(out, staging, symlinks=True)
        with tempfile.TemporaryDirectory(prefix="cd-merge-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy and nbformat warnings from inside nbgrader
            prepare_course(staging, changed[0].path / "source", Path(tmp), config_root=out)
            replaced: dict[str, Path] = {}
            for s in sorted(changed, key=lambda s: s.marker["index"]):
                _merge_shard(s, staging)
                replaced.update({student: s.path for student in s.students})
            similar = _similarity(staging)
            _write_reports(staging, replaced, similar)
        write_nbgrader_config(staging, out)
        shards_record = dict(recorded)
        for s in changed:
            shards_record[str(s.marker["index"])] = {"run_id": s.marker["run_id"], "from": str(s.path),
                                                     "graded_at": s.marker.get("graded_at"),
                                                     "students": sorted(s.students)}
        _write_json(staging / MERGE_MARKER, {"count": changed[0].marker["count"], "scheme": SCHEME,
                                             "source_digest": changed[0].digest, "checks": changed[0].marker["checks"],
                                             "check_seed": changed[0].marker["check_seed"], "shards": shards_record})
        _swap_in(staging, out)
    except BaseException:
        _rmtree(staging)
        raise
    students = sum(len(v["students"]) for v in shards_record.values())
    return MergeSummary(out, sorted(s.marker["index"] for s in changed), unchanged, students,
                        [c for c in similar if c.flagged])


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with two renames; the old folder is removed only once the new one is in place."""
    from autograder.grade import _rmtree

    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        os.replace(staging, out)
        _rmtree(old)
    else:
        os.replace(staging, out)
