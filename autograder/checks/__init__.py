"""Hidden-test batteries: one function per graded function, comparing the student's version with the
reference on fresh random inputs and edge cases.

Each module ``autograder/checks/aNN_<name>.py`` defines ``CHECKS = {"q_sample": check_q_sample, ...}``;
a check has the signature ``check(student_fn, ref: dict) -> None`` and raises ``AssertionError`` with a
message that says what is wrong. ``ref`` is a namespace holding the reference functions the student's function
may call (every earlier assignment's, and ``DEPENDS[name]``), the answer-cell names (torch, F, math, ...) and,
under ``ref[name]``, whatever the student's result is compared with. A battery calls the student's function
*before* ``ref[name]`` on the same inputs (the re-check's recorded values are handed out in that order).

The solution notebooks' hidden tests call :func:`hidden_check` inside the student's kernel. Under autograde
that kernel is never given the reference of the function it tests: ``ref[name]`` is the student's own function,
so the kernel checks behaviour (types, shapes, in-place edits, the recorded calls, gradients, autocast) and the
comparison with the reference happens only in the isolated re-check (``autograder/sandbox.py`` via
``autograder/forkserver.py``), against values recorded by the grader (``autograder/tape.py``). Everywhere else
(the instructor running the solutions, the reference run, the tests) ``ref[name]`` is the reference itself.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from autograder.batteries import collect
from helpers.config import KitConfig
from helpers.notebook_functions import build_namespace, graded_sources

__all__ = ["CHECKS", "DEPENDS", "FORBIDDEN_NAMES", "KERNEL_HAS_REFERENCE", "hidden_check", "grade_alone",
           "reference_globals"]

#: Under autograde the kernel's hidden tests do not compare with the reference (see the module docstring):
#: ``autograder.batteries.collect`` reads this to report a re-check's value mismatch as a plain ``failed``.
KERNEL_HAS_REFERENCE = False

Check = Callable[[Callable, dict], None]


def _discover() -> tuple[dict[str, Check], dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if info.name.startswith("a")]
    found = collect(modules)
    return found.checks, found.depends, found.forbidden


#: ``{function: check}``, ``{function: same-assignment functions it may call}`` and ``{function: names its
#: answer cell may not use}`` (the isolated re-check's static policy), merged from every ``aNN_*`` module.
CHECKS, DEPENDS, FORBIDDEN_NAMES = _discover()


def reference_globals(name: str, source_dir: str | Path) -> dict:
    """The namespace a student's ``name`` runs against when graded: the answer-cell names, every reference
    function of the earlier assignments, and the same-assignment functions listed in ``DEPENDS[name]``, built
    from the solution notebooks in ``source_dir`` (:func:`helpers.notebook_functions.graded_sources`). Never the
    reference of ``name`` itself (its code is not even run), nor other functions of its own assignment."""
    return build_namespace(graded_sources(name, DEPENDS.get(name, ()), source_dir))


@contextmanager
def _graded_against_reference(fn, name: str, ref: dict):
    """Temporarily point the names ``fn`` looks up globally (q_sample, ddim_solver_step, ...) at the reference,
    so that a mistake elsewhere in the student's notebook does not cost points here."""
    # a decorated function (e.g. @torch.no_grad()) is a wrapper living in the decorator's module: unwrap it
    g = getattr(inspect.unwrap(fn), "__globals__", None)
    if g is None:
        yield
        return
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


class _OpenSwaps:
    """The swaps :func:`grade_alone` opened in this kernel, closed by :func:`hidden_check` of the same function.
    Written and read only by these two functions (a notebook's hidden block opens one, its tests cell closes it)."""

    def __init__(self) -> None:
        self._open: dict[str, object] = {}

    def open(self, name: str, ctx) -> None:
        if name not in self._open:
            ctx.__enter__()
            self._open[name] = ctx

    def is_open(self, name: str) -> bool:
        return name in self._open

    def close(self, name: str) -> None:
        ctx = self._open.pop(name, None)
        if ctx is not None:
            ctx.__exit__(None, None, None)


_SWAPS = _OpenSwaps()


def grade_alone(name: str, student_fn) -> None:
    """From here until :func:`hidden_check` for ``name``, ``student_fn`` calls the reference versions of the
    other graded functions (e.g. the sampler uses the reference boundaries), so the *visible* tests of one
    function do not fail because of a mistake in another. Used in a hidden block above the visible tests."""
    if _SWAPS.is_open(name):
        return
    config = KitConfig.from_environ()  # edge: a notebook's hidden block
    _SWAPS.open(name, _graded_against_reference(student_fn, name, reference_globals(name, config.solutions_path)))


def hidden_check(name: str, student_fn) -> None:
    """Run the hidden battery for ``name`` on ``student_fn`` (called from the hidden tests of a notebook)."""
    _SWAPS.close(name)
    if name not in CHECKS:
        raise KeyError(f"no hidden checks registered for {name!r}")
    if not callable(student_fn):
        raise AssertionError(f"{name} must be a function, got {type(student_fn).__name__}")
    config = KitConfig.from_environ()  # edge: a notebook's tests cell
    ref = reference_globals(name, config.solutions_path)
    if config.autograding:
        ref[name] = student_fn  # the kernel is untrusted: the comparison with the reference is the re-check's
    else:
        # lazy: only trusted runs (the instructor's solutions, the reference run, tests) load a reference here
        from autograder.reference import reference_in

        ref[name] = reference_in(name, config.solutions_path)
    with _graded_against_reference(student_fn, name, ref):
        CHECKS[name](student_fn, ref)
