"""Issue 19: cheating answer cells that try to reach the reference of the function they are graded on.

Every route of ``tests/recheck_attacks.py`` must earn nothing — with the re-check's filters on (static policy,
restricted built-ins, audit hook, snapshot) *and with them off*: the second run shows the reference is out of
reach by construction (the re-check process never holds it, Landlock keeps the solutions unreadable, the recorded
values arrive one at a time after the student's answer, and the grader compares the committed answers itself).
"""
from __future__ import annotations

import pytest

from autograder.forkserver import RecheckClient
from autograder.grade import kit_private_paths
from autograder.landlock import abi_version
from helpers.course import SOLUTIONS_DIR
from helpers.notebook_functions import source_functions
from recheck_attacks import FUNCTION, ROUTES, cheat_cell

pytestmark = pytest.mark.skipif(not any(SOLUTIONS_DIR.glob("*/*.ipynb")), reason="no solution notebooks")


def _client(filters: bool) -> RecheckClient:
    return RecheckClient(SOLUTIONS_DIR, ["autograder.checks"], [str(p) for p in kit_private_paths()], timeout_s=120,
                         memory_bytes=None, threads=1, filters=filters)


@pytest.fixture(scope="module")
def unfiltered():
    client = _client(filters=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def filtered():
    client = _client(filters=True)
    yield client
    client.close()


def _reference_source() -> str:
    return source_functions(SOLUTIONS_DIR)[FUNCTION][1]


def test_honest_answers_pass_with_and_without_filters(filtered, unfiltered):
    assert filtered.check(FUNCTION, _reference_source()).status == "passed"
    assert unfiltered.check(FUNCTION, _reference_source()).status == "passed"


def test_the_filters_really_are_off(filtered, unfiltered):
    """A correct answer that imports os passes only without the filters: the second client runs with none."""
    source = "import os\n" + _reference_source()
    assert filtered.check(FUNCTION, source).status == "policy_violation"
    assert unfiltered.check(FUNCTION, source).status == "passed"


def test_made_up_values_fail():
    """The first stage compares the function with itself; made-up values must still fail (the recorded stage)."""
    client = _client(filters=True)
    try:
        verdict = client.check(FUNCTION, "def ddim_solver_step(model_output, x_t, t, s, scheduler):\n"
                                         "    return x_t.clone()\n")
    finally:
        client.close()
    assert verdict.status == "failed" and verdict.against_reference, verdict


@pytest.mark.skipif(abi_version() < 1, reason="Landlock is not available on this kernel")
@pytest.mark.parametrize("route", ROUTES)
def test_each_route_earns_nothing_even_without_the_filters(unfiltered, route):
    verdict = unfiltered.check(FUNCTION, cheat_cell(route))
    assert verdict.status in ("failed", "error", "timeout"), (route, verdict)
    # the route ran (nothing filtered it out) and found no reference: the message says what stopped it
    assert any(m in verdict.message for m in ("Permission denied", "cheat:", "out of turn", "differ from the recorded",
                                              "differs from the reference", "took longer",
                                              "RecursionError")), (route, verdict)  # found only itself


@pytest.mark.parametrize("route", ROUTES)
def test_each_route_earns_nothing_with_the_filters(filtered, route):
    verdict = filtered.check(FUNCTION, cheat_cell(route))
    assert verdict.status in ("policy_violation", "failed", "error"), (route, verdict)


def test_the_static_policy_rejects_getattr_as_a_value():
    from autograder.policy import check_cell

    for source in ("def f(x):\n    return functools.reduce(getattr, ['real'], x)\n",
                   "def f(x):\n    return list(map(getattr, [x], ['real']))[0]\n",
                   "def f(x):\n    g = hasattr\n    return g(x, 'real')\n",
                   "def f(x):\n    return getattr(x, '_' * 2 + 'class' + '_' * 2)\n"):
        assert check_cell(source, "f", ()), source
