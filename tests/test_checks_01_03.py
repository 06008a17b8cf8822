"""The hidden batteries of assignments 01-03 reject every wrong mutant and accept the reference and every
differently written correct answer (``tests/mutants/a01..a03``)."""
from __future__ import annotations


import pytest

from autograder.checks import CHECKS, hidden_check
from autograder.reference import reference
from helpers.answer_env import namespace
from helpers.course import assignment
from mutant_cases import mutant_cases

ASSIGNMENTS = ("01_model_loading", "02_ddim_step", "03_ct_derivation")
FUNCTIONS = [f for a in ASSIGNMENTS for f in assignment(a).functions]


def _mutants(kind: str) -> list[tuple[str, str, str]]:
    return [(fn, label, src) for _, _, fn, label, src in mutant_cases([kind], ASSIGNMENTS)]


def _answer(source: str, function: str):
    """Run an answer cell the way a notebook does (answer-cell names only) and return its function."""
    ns = namespace()
    exec(compile(source, f"<mutant {function}>", "exec"), ns)
    return ns[function]


WRONG, CORRECT = _mutants("WRONG"), _mutants("CORRECT")


def test_every_function_has_a_battery_and_enough_mutants():
    for fn in FUNCTIONS:
        assert fn in CHECKS, f"no hidden battery registered for {fn}"
        assert sum(1 for f, *_ in WRONG if f == fn) >= 3, f"fewer than 3 wrong mutants for {fn}"
        assert sum(1 for f, *_ in CORRECT if f == fn) >= 2, f"fewer than 2 correct variants for {fn}"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_reference_passes(function):
    hidden_check(function, reference(function))


@pytest.mark.parametrize("function,label,source", WRONG, ids=[f"{f}:{label}" for f, label, _ in WRONG])
def test_wrong_mutant_is_rejected(function, label, source):
    with pytest.raises(AssertionError) as info:
        hidden_check(function, _answer(source, function))
    assert str(info.value).strip(), "a rejection must say what is wrong"


@pytest.mark.parametrize("function,label,source", CORRECT, ids=[f"{f}:{label}" for f, label, _ in CORRECT])
def test_correct_variant_passes(function, label, source):
    hidden_check(function, _answer(source, function))


def test_unimplemented_stub_is_rejected_with_a_clear_message():
    stub = "def q_sample(x, t, scheduler, noise=None):\n    raise NotImplementedError()\n"
    with pytest.raises(AssertionError, match="not implemented"):
        hidden_check("q_sample", _answer(stub, "q_sample"))


def test_checks_leave_the_callers_random_state_alone():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    hidden_check("q_sample", reference("q_sample"))
    assert torch.equal(torch.rand(3), expected)
