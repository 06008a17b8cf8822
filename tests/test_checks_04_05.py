"""The hidden batteries of assignments 04-05 reject every wrong mutant and accept the reference and every
differently written correct answer (``tests/mutants/a04``, ``a05``)."""
from __future__ import annotations

import time

import pytest
import torch

from autograder.checks import CHECKS, DEPENDS, hidden_check, reference_globals
from autograder.checks.a04_consistency_loss import FORBIDDEN_NAMES as FORBIDDEN_04
from autograder.checks.a05_multi_boundary import FORBIDDEN_NAMES as FORBIDDEN_05
from autograder.reference import reference
from helpers.course import SOLUTIONS_DIR
from helpers.course import assignment
from mutant_cases import mutant_cases

ASSIGNMENTS = ("04_consistency_loss", "05_multi_boundary")
FUNCTIONS = [f for a in ASSIGNMENTS for f in assignment(a).functions]


def _mutants(kind: str) -> list[tuple[str, str, str]]:
    return [(fn, label, src) for _, _, fn, label, src in mutant_cases([kind], ASSIGNMENTS)]


def _answer(source: str, function: str):
    """Run an answer cell the way it is graded: in the answer-cell names plus the reference functions of the
    earlier assignments (and of the same-assignment functions it may call); return its function."""
    ns = reference_globals(function, SOLUTIONS_DIR)
    exec(compile(source, f"<mutant {function}>", "exec"), ns)
    return ns[function]


WRONG, CORRECT = _mutants("WRONG"), _mutants("CORRECT")


def test_every_function_has_a_battery_and_enough_mutants():
    for fn in FUNCTIONS:
        assert fn in CHECKS, f"no hidden battery registered for {fn}"
        assert fn in DEPENDS and (fn in FORBIDDEN_04 or fn in FORBIDDEN_05), f"{fn}: DEPENDS/FORBIDDEN_NAMES missing"
        assert sum(1 for f, *_ in WRONG if f == fn) >= 3, f"fewer than 3 wrong mutants for {fn}"
        assert sum(1 for f, *_ in CORRECT if f == fn) >= 2, f"fewer than 2 correct variants for {fn}"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_reference_passes_quickly(function):
    start = time.perf_counter()
    hidden_check(function, reference(function))
    assert time.perf_counter() - start < 30, f"the battery of {function} is too slow for grading"


@pytest.mark.parametrize("function,label,source", WRONG, ids=[f"{f}:{label}" for f, label, _ in WRONG])
def test_wrong_mutant_is_rejected(function, label, source):
    with pytest.raises(AssertionError) as info:
        hidden_check(function, _answer(source, function))
    assert str(info.value).strip(), "a rejection must say what is wrong"


@pytest.mark.parametrize("function,label,source", CORRECT, ids=[f"{f}:{label}" for f, label, _ in CORRECT])
def test_correct_variant_passes(function, label, source):
    hidden_check(function, _answer(source, function))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unimplemented_stub_is_rejected_with_a_clear_message(function):
    stub = f"def {function}(*args, **kwargs):\n    raise NotImplementedError()\n"
    with pytest.raises(AssertionError, match="not implemented"):
        hidden_check(function, _answer(stub, function))


@pytest.mark.parametrize("function", ["cm_loss_template", "consistency_sampling", "multi_boundary_sampling"])
def test_checks_leave_the_callers_random_state_alone(function):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    hidden_check(function, reference(function))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("function,label,source", CORRECT, ids=[f"{f}:{label}" for f, label, _ in CORRECT])
def test_correct_variants_and_references_respect_the_answer_cell_policy(function, label, source):
    from autograder.checks import FORBIDDEN_NAMES
    from autograder.policy import check_cell
    from helpers.notebook_functions import answer_cells
    from helpers.course import KIT_ROOT, assignment_of

    a = assignment_of(function)
    reference_source = answer_cells(KIT_ROOT / "solutions" / a.id / a.notebook)[function]
    for what, src in (("reference", reference_source), (label, source)):
        assert check_cell(src, function, FORBIDDEN_NAMES.get(function, ())) == [], f"{function} ({what})"
