"""Command line of the grading side: ``python -m autograder {release,grade} ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="generate notebooks/ (student versions) from solutions/")
    rel.add_argument("--out", default=None, help="output folder (default: the kit's notebooks/)")
    args = parser.parse_args(argv)
    if args.command == "release":
        from autograder.release import release
        from helpers.course import KIT_ROOT

        files = release(args.out or KIT_ROOT / "notebooks")
        for f in files:
            print(f"wrote {f}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
