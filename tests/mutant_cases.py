"""The mutant answer cells in ``tests/mutants/a<assignment_id>.py``: for each graded function, ``WRONG`` versions
(plausible mistakes, the old course's defects among them) and ``CORRECT`` ones (other correct formulations)."""
from __future__ import annotations

import runpy
from collections.abc import Sequence
from pathlib import Path

MUTANTS = Path(__file__).resolve().parent / "mutants"


def mutant_cases(kinds: Sequence[str] = ("WRONG", "CORRECT"), assignments: Sequence[str] | None = None
                 ) -> list[tuple[str, str, str, str, str]]:
    """``(kind, assignment, function, label, source)`` of every mutant of ``kinds`` in ``assignments`` (default:
    all), file by file in course order."""
    found = []
    for path in sorted(MUTANTS.glob("a[0-9][0-9]_*.py")):
        assignment = path.stem[1:]
        if assignments is not None and assignment not in assignments:
            continue
        ns = runpy.run_path(str(path))
        for kind in kinds:
            for fn, labels in ns[kind].items():
                found += [(kind, assignment, fn, label, src) for label, src in labels.items()]
    return found
