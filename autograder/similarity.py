"""Copy detection on answer cells (issue 17, item 2): a report for the instructor, never a score.

Every answer cell of every graded submission is reduced to a **normal form** (:func:`normalise`):

1. parsed with :mod:`ast` (comments and formatting vanish); docstrings and other bare constant expressions are
   dropped;
2. import aliases are replaced by what they import (``np`` -> ``numpy``, ``F`` -> ``torch.nn.functional``) and the
   import statements dropped (where a cell imports is no evidence); names
   the cell does not bind (``torch``, ``sum``, the notebook's other functions) and attribute names are kept, since
   they carry the meaning of the code;
3. independent statements of each block are put in a canonical order: a statement must stay after every earlier
   statement it depends on (one writes a name the other reads or writes; ``x.append(...)`` and torch's in-place
   ``x.add_(...)`` count as writing ``x``, ``x.mean()`` does not;
   ``return``/``raise``/``break``/``continue`` and ``yield`` keep their place), and among the statements free to go
   next the one whose *name-blind* text (every local name written ``_``) sorts first goes first;
4. every name the cell binds (variables, arguments, its functions, loop and comprehension targets) is renamed
   ``_0``, ``_1``, ... in order of first appearance in that canonical order;
5. written back with :func:`ast.unparse` (canonical formatting: one statement per line).

Renamed variables, reordered independent lines, added comments, docstrings and blank lines therefore give the
same normal form. A cell that does not parse keeps its lines without comments and blank lines.

What everyone got from the release is not evidence: the released stub of the cell (the solution region replaced
by nbgrader's code stub, :func:`release_stub`) is normalised too, and its lines are taken out of every student's
normal form (:func:`own_code`). An unchanged stub leaves nothing, so it is never flagged; the reference is reduced
the same way (its solution region only).

:func:`score` compares two such own parts, in ``[0, 1]``: the larger of

* the token similarity, :class:`difflib.SequenceMatcher` ``ratio`` on the tokens of the normal forms (2 x matched
  tokens / all tokens: catches copies with a few edited lines), and
* the statement overlap, the Dice coefficient of the two multisets of normal-form lines (catches reorderings the
  canonical order could not undo, e.g. ties between statements that look alike).

Cost: one normal form per cell, then all pairs of students per answer cell, O(students^2) comparisons of a few
hundred tokens each (a pair takes well under a millisecond; pairs whose quick upper bound is below
:data:`LIST_AT` are skipped): fine for hundreds of students.
"""
from __future__ import annotations

import ast
import csv
import difflib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["normalise", "tokens", "release_stub", "solution_code", "own_code", "Answer", "score", "FLAG_AT",
           "LIST_AT", "MIN_TOKENS", "SIMILARITY_COLUMNS", "CellSimilarity", "compare", "report", "COMMENT_PREFIX"]

#: Flag a cell whose score with the reference or with another student reaches this. A renamed, reordered or
#: re-commented copy scores 1.0; a copy with one of ten lines edited about 0.9. Honest solutions of the same task
#: share the API calls and the function signature, but not the whole body: in the tests they stay below 0.8.
FLAG_AT = 0.9
#: List another student in ``matches_students`` from this score on (context for the reviewer; not a flag).
LIST_AT = 0.8
#: Never flag a cell whose own code (without the stub) has fewer tokens than this. Below it (``return 2 * x`` is 4
#: tokens, ``return sum(x * x for x in v)`` 13) a task leaves too little freedom: honest students write the same.
MIN_TOKENS = 20
#: Start of the note written into the gradebook's comment of a flagged cell (recognised, and replaced, on regrade).
COMMENT_PREFIX = "[similarity check]"

SIMILARITY_COLUMNS = ["student_id", "assignment", "notebook", "grade_id", "matches_reference", "matches_students",
                      "max_similarity", "flagged", "tokens"]

_SOLUTION_BEGIN, _SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
_TOKEN = re.compile(r"[A-Za-z_][\w.]*|\d[\w.]*|'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"|\S")
_BARRIERS = (ast.Return, ast.Raise, ast.Break, ast.Continue, ast.Global, ast.Nonlocal)
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "add", "discard", "sort",
                       "reverse", "setdefault", "popitem", "write", "send", "step", "backward", "zero_grad"})
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


# --- the normal form ---------------------------------------------------------------------------------------

def _fallback(source: str) -> str:
    """Lines without comments and blank lines (a cell that does not parse)."""
    lines = (re.sub(r"\s+#.*$|^\s*#.*$", "", line).rstrip() for line in source.splitlines())
    return "\n".join(line for line in lines if line.strip())


def _bound_names(tree: ast.AST) -> tuple[set[str], dict[str, str]]:
    """(names the cell binds and may be renamed, import alias -> what it imports)."""
    bound: set[str] = set()
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, _DEFS):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    return bound - set(aliases), aliases


class _Rename(ast.NodeTransformer):
    """Rename the bound names with ``new_name(name)`` and import aliases to what they import."""

    def __init__(self, bound: set[str], aliases: dict[str, str], new_name):
        self.bound, self.aliases, self.new_name = bound, aliases, new_name

    def _name(self, name: str) -> str:
        if name in self.aliases:
            return self.aliases[name]
        return self.new_name(name) if name in self.bound else name

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self._name(node.id)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg, node.annotation = self._name(node.arg), None
        return node

    def _def(self, node):
        node.name = self._name(node.name)
        if hasattr(node, "returns"):
            node.returns = None
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
        if node.name:
            node.name = self._name(node.name)
        self.generic_visit(node)
        return node

    def visit_alias(self, node: ast.alias) -> ast.AST:
        node.asname = None
        return node

    def visit_Global(self, node):
        node.names = [self._name(n) for n in node.names]
        return node

    visit_Nonlocal = visit_Global


def _strip(tree: ast.AST) -> None:
    """Drop docstrings, other bare constant expressions (string 'comments', ``...``) and import statements (their
    uses keep the full module name); keep the bodies valid."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                kept = [s for s in block if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 or isinstance(s, (ast.Import, ast.ImportFrom)))]
                keep_valid = name == "body" and not isinstance(node, ast.Module)
                setattr(node, name, kept or ([ast.Pass()] if keep_valid else []))


def _reads_writes(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    reads, writes = set(), set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name):
            (writes if isinstance(node.ctx, (ast.Store, ast.Del)) else reads).add(node.id)
        elif isinstance(node, _DEFS):
            writes.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            writes.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Attribute, ast.Subscript)) and not isinstance(node.ctx, ast.Load):
            root = node
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(root, ast.Name):
                writes.add(root.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _mutates(node.func.attr):
            root = node.func.value  # x.append(...), x.add_(...) change x; x.mean(...) does not
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(root, ast.Name):
                writes.add(root.id)
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
        reads.add(stmt.target.id)
    return reads, writes


def _mutates(method: str) -> bool:
    """Whether a method of this name changes its object (torch's in-place ``*_`` and the containers' methods)."""
    return (method.endswith("_") and not method.startswith("_")) or method in _MUTATORS


def _is_barrier(stmt: ast.stmt) -> bool:
    return isinstance(stmt, _BARRIERS) or any(isinstance(n, (ast.Yield, ast.YieldFrom, ast.Await))
                                              for n in ast.walk(stmt))


def _order_block(block: list[ast.stmt], blind) -> list[ast.stmt]:
    """The statements of one block in canonical order (a topological order of their dependencies that takes the
    smallest name-blind text first)."""
    if len(block) < 2:
        return block
    info = [(_reads_writes(s), _is_barrier(s)) for s in block]
    keys = [blind(s) for s in block]
    deps: list[set[int]] = []
    for j, ((rj, wj), bj) in enumerate(info):
        deps.append({i for i in range(j) if bj or info[i][1] or info[i][0][1] & (rj | wj) or info[i][0][0] & wj})
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(block):
        ready = [j for j in range(len(block)) if j not in done and deps[j] <= done]
        j = min(ready, key=lambda k: (keys[k], k))
        done.add(j)
        order.append(j)
    return [block[j] for j in order]


def _canonical_order(tree: ast.AST, bound: set[str], aliases: dict[str, str]) -> None:
    import copy

    def blind(stmt: ast.stmt) -> str:
        return ast.unparse(_Rename(bound, aliases, lambda _n: "_").visit(copy.deepcopy(stmt)))

    def visit(node: ast.AST) -> None:  # inner blocks first: the outer keys see them in canonical order
        for child in ast.iter_child_nodes(node):
            visit(child)
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(node, name, _order_block(block, blind))

    visit(tree)


def normalise(source: str) -> str:
    """The normal form of a cell's code (module docstring): comments, docstrings, formatting, local names and the
    order of independent statements no longer matter."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _fallback(source)
    bound, aliases = _bound_names(tree)
    _strip(tree)
    _canonical_order(tree, bound, aliases)
    names: dict[str, str] = {}
    tree = _Rename(bound, aliases, lambda n: names.setdefault(n, f"_{len(names)}")).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def tokens(normal_form: str) -> list[str]:
    """The tokens of a normal form (names with their dots, numbers, strings, operators; one per indent level)."""
    out: list[str] = []
    for line in normal_form.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 4
        out += [">"] * depth + _TOKEN.findall(line)
    return out


# --- the released stub, the solution, the student's own code ----------------------------------------------

def release_stub(source: str) -> str:
    """The cell as nbgrader releases it: each solution region replaced by the code stub at its indentation
    (nbgrader's ``ClearSolutions``; a solution cell without a region becomes the stub)."""
    from autograder.config import CODE_STUB

    lines, out, inside, replaced = source.splitlines(), [], False, False
    for line in lines:
        if _SOLUTION_BEGIN in line:
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + s for s in CODE_STUB.split("\n")]
            inside = replaced = True
        elif _SOLUTION_END in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out) + "\n" if replaced else CODE_STUB + "\n"


def solution_code(source: str) -> str:
    """The solution cell's code without the marker lines (what a student who wrote the reference would submit)."""
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (_SOLUTION_BEGIN, _SOLUTION_END)) + "\n"


@dataclass(frozen=True)
class Answer:
    """The part of an answer cell that is the author's own: its normal-form lines minus the released stub's."""

    lines: tuple[str, ...]
    tokens: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)


def own_code(source: str, stub: str) -> Answer:
    """``source``'s normal form without the lines (as a multiset) of the normal form of the released ``stub``."""
    left = Counter(normalise(stub).splitlines())
    own = []
    for line in normalise(source).splitlines():
        if left[line] > 0:
            left[line] -= 1
        elif line.strip():
            own.append(line)
    return Answer(tuple(own), tuple(tokens("\n".join(own))))


def _dice(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    if not a and not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2.0 * common / (len(a) + len(b))


def score(a: Answer | str, b: Answer | str, floor: float = 0.0) -> float:
    """Similarity of two answers in [0, 1] (module docstring); strings are taken as whole cells without a stub.
    ``floor``: a score known to be below it may be returned as its quick upper bound (faster)."""
    a = own_code(a, "") if isinstance(a, str) else a
    b = own_code(b, "") if isinstance(b, str) else b
    if not a.tokens or not b.tokens:
        return 0.0
    if a.tokens == b.tokens:
        return 1.0
    if a.tokens > b.tokens:  # SequenceMatcher is not symmetric: compare each pair in one fixed order
        a, b = b, a
    lines = _dice(a.lines, b.lines)
    matcher = difflib.SequenceMatcher(None, a.tokens, b.tokens, autojunk=False)
    if floor and max(lines, matcher.quick_ratio()) < floor:  # an upper bound of ratio(), cheap
        return max(lines, matcher.quick_ratio())
    return max(lines, matcher.ratio())


# --- a course: every answer cell of every submission --------------------------------------------------------

@dataclass
class CellSimilarity:
    """One answer cell of one submission: its best matches."""

    student: str
    assignment: str
    notebook: str
    grade_id: str
    reference: float
    students: list[tuple[str, float]] = field(default_factory=list)  # (other student, score), best first
    size: int = 0

    @property
    def max_similarity(self) -> float:
        return max([self.reference] + [s for _, s in self.students])

    @property
    def flagged(self) -> bool:
        return self.size >= MIN_TOKENS and self.max_similarity >= FLAG_AT

    def row(self) -> dict[str, str]:
        return {"student_id": self.student, "assignment": self.assignment, "notebook": self.notebook,
                "grade_id": self.grade_id, "matches_reference": f"{self.reference:.2f}",
                "matches_students": ";".join(f"{s}:{v:.2f}" for s, v in self.students),
                "max_similarity": f"{self.max_similarity:.2f}", "flagged": "yes" if self.flagged else "no",
                "tokens": str(self.size)}

    def describe(self) -> str:
        """One line for the grade command's summary (names the other students: for the instructor only)."""
        parts = [f"reference {self.reference:.2f}"] if self.reference >= FLAG_AT else []
        parts += [f"{s} {v:.2f}" for s, v in self.students if v >= FLAG_AT]
        return f"{self.student} {self.assignment}/{self.notebook} {self.grade_id}: matches " + ", ".join(parts)

    def comment(self) -> str:
        """The gradebook note (no other student's id: nbgrader copies comments into regenerated feedback)."""
        others = [v for _, v in self.students if v >= FLAG_AT]
        parts = [f"the reference solution ({self.reference:.2f})"] if self.reference >= FLAG_AT else []
        if others:
            parts.append(f"{len(others)} other submission(s) (up to {max(others):.2f})")
        return (f"{COMMENT_PREFIX} After normalisation (names, comments, formatting, order of independent lines) "
                f"this answer matches {' and '.join(parts)}; see similarity.csv. The score is not affected.")


def _answer_cells(nb: dict) -> dict[str, str]:
    found = {}
    for c in nb.get("cells", []):
        meta = c.get("metadata", {}).get("nbgrader", {}) if isinstance(c.get("metadata"), dict) else {}
        if c.get("cell_type") == "code" and meta.get("solution") and not meta.get("grade") and meta.get("grade_id"):
            src = c.get("source", "")
            found[meta["grade_id"]] = "".join(src) if isinstance(src, list) else str(src)
    return found


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def compare(source: Path, submissions: dict[tuple[str, str, str], dict]) -> list[CellSimilarity]:
    """Every answer cell of ``submissions`` (``(student, assignment, notebook) -> notebook JSON``) against the
    reference in ``source/<assignment>/<notebook>.ipynb`` and against the same cell of every other student."""
    groups: dict[tuple[str, str, str], dict[str, Answer]] = {}
    refs: dict[tuple[str, str, str], Answer] = {}
    stubs: dict[tuple[str, str], dict[str, str]] = {}
    for (student, a, notebook), nb in sorted(submissions.items()):
        if (a, notebook) not in stubs:
            cells = _answer_cells(_read(Path(source) / a / f"{notebook}.ipynb"))
            stubs[(a, notebook)] = {g: release_stub(src) for g, src in cells.items()}
            for g, src in cells.items():
                refs[(a, notebook, g)] = own_code(solution_code(src), stubs[(a, notebook)][g])
        for g, src in _answer_cells(nb).items():
            if g in stubs[(a, notebook)]:
                groups.setdefault((a, notebook, g), {})[student] = own_code(src, stubs[(a, notebook)][g])
    found = []
    for (a, notebook, g), answers in groups.items():
        students = sorted(answers)
        pair: dict[tuple[str, str], float] = {}
        for i, s in enumerate(students):
            for t in students[i + 1:]:
                pair[(s, t)] = pair[(t, s)] = score(answers[s], answers[t], floor=LIST_AT)
        for s in students:
            matches = sorted(((t, pair[(s, t)]) for t in students if t != s and pair[(s, t)] >= LIST_AT),
                             key=lambda m: (-m[1], m[0]))
            found.append(CellSimilarity(s, a, notebook, g, score(answers[s], refs[(a, notebook, g)]), matches,
                                        answers[s].size))
    found.sort(key=lambda c: (c.student, c.assignment, c.notebook, c.grade_id))
    return found


def _write_atomic(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _annotate(out: Path, cells: list[CellSimilarity]) -> None:
    """Put the note on each flagged cell's gradebook comment (``auto_comment``: a grader's manual comment wins
    in the formgrader and is never touched); remove an earlier note from cells no longer flagged."""
    from nbgrader.api import Gradebook, MissingEntry

    from autograder.config import COURSE_ID

    with Gradebook(f"sqlite:///{(out / 'gradebook.db').resolve()}", COURSE_ID) as gb:
        for c in cells:
            try:
                comment = gb.find_comment(c.grade_id, c.notebook, c.assignment, c.student)
            except MissingEntry:
                continue
            if c.flagged:
                comment.auto_comment = c.comment()
            elif (comment.auto_comment or "").startswith(COMMENT_PREFIX):
                comment.auto_comment = None
        gb.db.commit()


def report(out: str | Path) -> list[CellSimilarity]:
    """Compare every autograded submission of the course folder ``out`` (``autograded/<student>/<assignment>/``,
    so a regrade of one student is still compared with everyone), write ``out/similarity.csv`` and the gradebook
    notes; return the rows. Scores are never read or changed."""
    out = Path(out)
    submissions = {}
    for path in sorted((out / "autograded").glob("*/*/*.ipynb")):
        student, a = path.parent.parent.name, path.parent.name
        if (out / "source" / a / path.name).is_file():
            submissions[(student, a, path.stem)] = _read(path)
    cells = compare(out / "source", submissions)
    _write_atomic(out / "similarity.csv", SIMILARITY_COLUMNS, (c.row() for c in cells))
    _annotate(out, cells)
    return cells
