"""Command line of the grading side: ``python -m autograder {release,bundle,grade,bench,export} ...``."""
from __future__ import annotations

import argparse
import sys

from autograder.config import CELL_TIMEOUT_S

_MAX_FLAGGED_LINES = 50


def _add_grading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes (default: one per 2 CPU cores and 4 GiB, 1-2 per GPU)")
    p.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S,
                   help=f"per-cell time limit in seconds, also for the isolated re-check (default {CELL_TIMEOUT_S})")
    p.add_argument("--source", default=None, help="source (solution) notebooks (default: the kit's solutions/)")
    p.add_argument("--checks", default="autograder.checks",
                   help="comma-separated modules defining the hidden batteries (default autograder.checks)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory limit of each kernel and re-check process (default: 80%% of RAM / workers)")


def _grade(args: argparse.Namespace) -> int:
    from autograder.grade import grade

    summary = grade(args.submitted, args.out, workers=args.workers, timeout=args.timeout, source_dir=args.source,
                    check_modules=tuple(m for m in args.checks.split(",") if m), memory_gb=args.memory_gb,
                    submission_timeout=args.submission_timeout, progress=not args.quiet)
    print(f"graded {summary.submissions} submissions in {summary.seconds:.0f} s with {summary.workers} workers "
          f"({summary.per_minute:.1f}/min); {summary.problems} with notebooks that could not be graded, "
          f"{summary.unknown} unknown assignment folders")
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in (summary.phases or {}).items()))
    if summary.flagged:
        print(f"similarity: {len(summary.flagged)} flagged answer cells (scores unchanged; similarity.csv, "
              "formgrader comments):")
        for cell in summary.flagged[:_MAX_FLAGGED_LINES]:
            print(f"  {cell.describe()}")
        if len(summary.flagged) > _MAX_FLAGGED_LINES:
            print(f"  ... and {len(summary.flagged) - _MAX_FLAGGED_LINES} more in similarity.csv")
    else:
        print("similarity: no flagged answer cells")
    print(f"wrote {summary.out_dir}/grades.csv, cells.csv, submissions.csv, similarity.csv, feedback/, gradebook.db")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from autograder.bench import bench

    bench(copies=args.copies, workers=args.workers, assignments=args.assignment or None, timeout=args.timeout,
          source_dir=args.source, check_modules=tuple(m for m in args.checks.split(",") if m),
          memory_gb=args.memory_gb, keep=args.keep)
    return 0


def _export(args: argparse.Namespace) -> int:
    from autograder.export import export

    dest, left_out = export(args.course, args.format, args.out, mapping=args.mapping,
                            allow_unmapped=args.allow_unmapped, assignment_ids=args.assignment_ids,
                            moodle_id=args.moodle_id)
    print(f"wrote {dest} ({args.format})" + (f"; left out {len(left_out)} unmapped students" if left_out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="generate notebooks/ (student versions) from solutions/")
    rel.add_argument("--out", default=None, help="output folder (default: the kit's notebooks/)")

    bu = sub.add_parser("bundle", help="write what students get (released notebooks, helpers, README; no solutions)")
    bu.add_argument("--out", required=True, metavar="DIR", help="the bundle folder (new, empty, or an earlier bundle)")
    bu.add_argument("--zip", action="store_true", help="also write DIR.zip (what the Colab/Kaggle setup cell fetches)")

    gr = sub.add_parser("grade", help="autograde SUBMITTED_DIR/<student>/<assignment>/*.ipynb into OUT_DIR")
    gr.add_argument("submitted", metavar="SUBMITTED_DIR")
    gr.add_argument("--out", required=True, metavar="OUT_DIR", help="course folder for the gradebook and reports")
    _add_grading_options(gr)
    gr.add_argument("--submission-timeout", type=float, default=None,
                    help="hard limit per submission in seconds (default: per-cell timeout x (code cells + 5))")
    gr.add_argument("--quiet", action="store_true", help="no progress bar")

    be = sub.add_parser("bench", help="submissions/minute grading K copies of the reference, serial vs parallel")
    be.add_argument("--copies", type=int, default=4, help="K: students, each submitting the reference solutions")
    be.add_argument("--assignment", action="append", help="only this assignment (repeatable; default all)")
    be.add_argument("--keep", default=None, help="keep the benchmark folders here")
    _add_grading_options(be)

    ex = sub.add_parser("export", help="the gradebook's totals as an LMS grade-import CSV (Canvas, Moodle, plain)")
    ex.add_argument("--format", required=True, choices=("canvas", "moodle", "csv"))
    ex.add_argument("--out", required=True, metavar="FILE", help="the CSV file to write")
    ex.add_argument("--course", default=".", metavar="OUT_DIR", help="the graded course folder (default: .)")
    ex.add_argument("--mapping", default=None, metavar="MAP.csv",
                    help="student_id,lms_id,sis_user_id,name,section,email[,sis_login_id] (canvas, moodle: required)")
    ex.add_argument("--allow-unmapped", action="store_true",
                    help="leave out students without a mapping row instead of stopping")
    ex.add_argument("--assignment-ids", default=None, metavar="IDS.csv",
                    help="assignment,lms_id: Canvas columns 'Name (id)' update those Canvas assignments")
    ex.add_argument("--moodle-id", default="email", choices=("email", "idnumber", "username"),
                    help="Moodle identifier column (default email)")

    args = parser.parse_args(argv)
    if args.command == "release":
        from autograder.release import release
        from helpers.course import KIT_ROOT

        files = release(args.out or KIT_ROOT / "notebooks")
        for f in files:
            print(f"wrote {f}")
        return 0
    try:
        if args.command == "bundle":
            from autograder.bundle import main as bundle

            return bundle(args.out, args.zip)
        if args.command == "grade":
            return _grade(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "export":
            return _export(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
