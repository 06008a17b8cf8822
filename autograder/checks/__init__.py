"""Hidden-test batteries: one function per graded function, comparing the student's version with the
reference on fresh random inputs and edge cases.

Each module ``autograder/checks/aNN_<name>.py`` defines ``CHECKS = {"q_sample": check_q_sample, ...}``;
a check has the signature ``check(student_fn, ref: dict) -> None`` and raises ``AssertionError`` with a
message that says what is wrong. ``ref`` is a namespace holding every reference function of the course
(from the solution notebooks) and the answer-cell names (torch, F, math, ...).

The solution notebooks' hidden tests call :func:`hidden_check` inside the student's kernel. That result
is not trusted on its own: the autograder re-runs the same check on the student's answer cell alone, in a
fresh process (``autograder/sandbox.py`` via ``autograder/forkserver.py``), and the lower of the two scores
counts.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from contextlib import contextmanager

from helpers.course import assignment_of

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "all_checks", "hidden_check", "reference_globals"]

Check = Callable[[Callable, dict], None]


def _discover() -> tuple[dict[str, Check], dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    checks: dict[str, Check] = {}
    depends: dict[str, tuple[str, ...]] = {}
    forbidden: dict[str, tuple[str, ...]] = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("a"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        checks.update(getattr(mod, "CHECKS", {}))
        depends.update({k: tuple(v) for k, v in getattr(mod, "DEPENDS", {}).items()})
        forbidden.update({k: tuple(v) for k, v in getattr(mod, "FORBIDDEN_NAMES", {}).items()})
    return checks, depends, forbidden


#: ``{function: check}``, ``{function: same-assignment functions it may call}`` and ``{function: names its
#: answer cell may not use}`` (the isolated re-check's static policy), merged from every ``aNN_*`` module.
CHECKS, DEPENDS, FORBIDDEN_NAMES = _discover()


def all_checks() -> dict[str, Check]:
    return dict(CHECKS)


def reference_globals(name: str) -> dict:
    """The namespace a student's ``name`` runs against when graded: the answer-cell names, every reference
    function of the earlier assignments, and the same-assignment functions listed in ``DEPENDS[name]``.
    Never the reference of ``name`` itself, nor other functions of its own assignment."""
    from autograder.reference import reference_namespace

    a = assignment_of(name)
    ns = reference_namespace(a.id)
    for other in a.functions:
        if other not in DEPENDS.get(name, ()):
            ns.pop(other, None)
    return ns


@contextmanager
def _graded_against_reference(fn, name: str):
    """Temporarily point the names ``fn`` looks up globally (q_sample, ddim_solver_step, ...) at the reference,
    so that a mistake elsewhere in the student's notebook does not cost points here."""
    # a decorated function (e.g. @torch.no_grad()) is a wrapper living in the decorator's module: unwrap it
    g = getattr(inspect.unwrap(fn), "__globals__", None)
    if g is None:
        yield
        return
    ref = reference_globals(name)
    swapped = {k: g[k] for k in ref if k in g and callable(ref[k]) and k != name}
    absent = [k for k in ref if k not in g and callable(ref[k]) and k != name]
    try:
        for k in swapped:
            g[k] = ref[k]
        for k in absent:
            g[k] = ref[k]
        yield
    finally:
        g.update(swapped)
        for k in absent:
            g.pop(k, None)


_OPEN: dict[str, object] = {}


def grade_alone(name: str, student_fn) -> None:
    """From here until :func:`hidden_check` for ``name``, ``student_fn`` calls the reference versions of the
    other graded functions (e.g. the sampler uses the reference boundaries), so the *visible* tests of one
    function do not fail because of a mistake in another. Used in a hidden block above the visible tests."""
    if name in _OPEN:
        return
    ctx = _graded_against_reference(student_fn, name)
    ctx.__enter__()
    _OPEN[name] = ctx


def _close(name: str) -> None:
    ctx = _OPEN.pop(name, None)
    if ctx is not None:
        ctx.__exit__(None, None, None)


def hidden_check(name: str, student_fn) -> None:
    """Run the hidden battery for ``name`` on ``student_fn`` (called from the hidden tests of a notebook)."""
    _close(name)
    if name not in CHECKS:
        raise KeyError(f"no hidden checks registered for {name!r}")
    if not callable(student_fn):
        raise AssertionError(f"{name} must be a function, got {type(student_fn).__name__}")
    ref = reference_globals(name)
    from autograder.reference import reference

    ref[name] = reference(name)  # the battery compares with it; the student's function never sees it
    with _graded_against_reference(student_fn, name):
        CHECKS[name](student_fn, ref)
