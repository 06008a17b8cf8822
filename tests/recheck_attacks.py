"""Cheating answer cells that try to reach the reference of the function they are graded on (issue 19's class of
attack), shared by ``tests/test_recheck_attacks.py``.

Each cheat is an answer cell for ``ddim_solver_step`` (assignment 02) that implements nothing: it looks for a
callable that computes the answer (the reference, or the grader's own expected value) by one route, and returns
whatever it finds. Routes: computed attribute names; ``functools.reduce``/``map`` over ``getattr``; a library
function's ``__globals__`` leading to the real built-ins and their ``__import__``; importing the grader's
reference module or its batteries; ``sys._getframe``; generator, coroutine and traceback frames; ``gc`` reached
through the escaped built-ins; reading the solutions or the tests' correct mutants from disk; and forging the
re-check's tape protocol. When a route finds nothing it raises ``LookupError("cheat: ...")`` saying how far it
got, so a test can tell "the route ran and found nothing" from "the route was blocked before it ran".
"""
from __future__ import annotations

import textwrap

FUNCTION = "ddim_solver_step"
ARGS = "model_output, x_t, t, s, scheduler"

# Everything below uses only names an answer cell has (torch, F, functools, math) and computes every special name.
_PRELUDE = '''
D = "_" * 2

def _attr(obj, *names):
    return functools.reduce(getattr, names, obj)

def _real_builtins():
    g = _attr(F.mse_loss, D + "glo" + "bals" + D)
    b = g[D + "built" + "ins" + D]
    return b if isinstance(b, dict) else _attr(b, D + "dict" + D)

def _imp(name):
    return _real_builtins()[D + "imp" + "ort" + D](name, None, None, ["x"], 0)

def _frames_from(frame):
    while frame is not None:
        yield frame
        frame = _attr(frame, "f_" + "back")

def _useful(value):
    return (callable(value) and value is not FN_SELF() and type(value).__name__ != "_Mirror"
            and not getattr(value, "__name__", "").startswith("check"))

def _find_in_frames(frame, name):
    for fr in _frames_from(frame):
        for scope in (_attr(fr, "f_" + "locals"), _attr(fr, "f_" + "globals")):
            for key, value in list(scope.items()):
                if isinstance(value, dict) and _useful(value.get(name)):
                    return value[name]
                if key in ("expected_fn", "reference") and _useful(value):
                    return value
    return None
'''

_BODIES = {
    # 1. computed names through reduce(getattr): a library function's globals -> real builtins -> __import__
    "import_reference_module": '''
mod = _imp("autograder.reference")
found = _attr(mod, "reference")("ddim_solver_step")
''',
    # 2. the same through map(getattr, ...) and the batteries' own package
    "import_checks_via_map": '''
checks = _imp("autograder.checks")
glob = list(map(getattr, [checks], ["reference" + "_globals"]))[0]
found = glob("ddim_solver_step", _attr(_imp("helpers.course"), "SOLUTIONS_DIR")).get("ddim_solver_step")
if found is None:
    raise LookupError("cheat: reference_globals has no ddim_solver_step")
''',
    # 3. reference_in on every folder that may hold the solutions (the kit's, the graded copy)
    "reference_in_any_folder": '''
ref_mod = _imp("autograder.reference")
course = _imp("helpers.course")
errors = []
found = None
for folder in (_attr(course, "SOLUTIONS_DIR"), _attr(course, "KIT_ROOT") / "out" / "reference" / "notebooks"):
    try:
        found = _attr(ref_mod, "reference_in")("ddim_solver_step", folder)
        break
    except BaseException as err:
        errors.append(type(err).__name__)
if found is None:
    raise LookupError(f"cheat: reference_in failed everywhere: {errors}")
''',
    # 4. sys._getframe through the real __import__, then the battery's frames
    "sys_getframe": '''
sys_ = _imp("sys")
found = _find_in_frames(_attr(sys_, "_get" + "frame")(0), "ddim_solver_step")
''',
    # 5. a running generator's frame
    "generator_frame": '''
def _gen():
    yield None
g = _gen()
next(g)
frame = _attr(g, "gi_" + "frame")
try:
    raise RuntimeError
except RuntimeError as err:
    frame = _attr(_attr(err, D + "trace" + "back" + D), "tb_" + "frame")
found = _find_in_frames(frame, "ddim_solver_step")
''',
    # 6. a coroutine's frame, reached from inside the coroutine through a caught exception
    "coroutine_frame": '''
async def _co():
    try:
        raise RuntimeError
    except RuntimeError as err:  # searched while the coroutine runs: its frame still has the caller behind it
        return _find_in_frames(_attr(_attr(err, D + "trace" + "back" + D), "tb_" + "frame"), "ddim_solver_step")
co = _co()
try:
    co.send(None)
except StopIteration as stop:
    found = stop.value
''',
    # 7. traceback frames of an exception raised by a library call
    "traceback_frames": '''
try:
    torch.zeros(2) + torch.zeros(3)
except RuntimeError as err:
    frame = _attr(_attr(err, D + "trace" + "back" + D), "tb_" + "frame")
found = _find_in_frames(frame, "ddim_solver_step")
''',
    # 8. gc through the escaped built-ins: every live function named like the task, but not this one
    "gc_objects": '''
gc_ = _imp("gc")
cache = _attr(FN_SELF(), D + "dict" + D)  # one scan per process: get_objects() is slow with torch loaded
if "found" not in cache:
    kinds = ("function", "Replay")
    cache["found"] = [o for o in _attr(gc_, "get_" + "objects")() if type(o).__name__ in kinds and _useful(o)
                      and (type(o).__name__ == "Replay" or getattr(o, "__name__", None) == "ddim_solver_step")]
found = cache["found"][0] if cache["found"] else None
''',
    # 9. the solution notebook on disk, through the real open()
    "read_solutions_from_disk": '''
json_ = _imp("json")
course = _imp("helpers.course")
path = _attr(course, "SOLUTIONS_DIR") / "02_ddim_step" / "ddim_step.ipynb"
nb = json_.loads(_real_builtins()["op" + "en"](path).read())
ns = {}
for cell in nb["cells"]:
    if "def ddim_solver_step" in "".join(cell["source"]):
        _real_builtins()["ex" + "ec"]("".join(cell["source"]), {**_attr(F.mse_loss, D + "glo" + "bals" + D), **ns}, ns)
found = ns["ddim_solver_step"]
''',
    # 10. the tests' correct mutants on disk (a correct implementation in the kit's tests)
    "read_test_mutants": '''
course = _imp("helpers.course")
path = _attr(course, "KIT_ROOT") / "tests" / "mutants" / "a02_ddim_step.py"
text = _real_builtins()["op" + "en"](path).read()
raise LookupError(f"cheat: read {len(text)} characters of mutants (a correct one is in there)")
''',
    # 11. forge the tape protocol: commit nothing, then ask the grader's replay for the expected value
    "forge_tape_protocol": '''
sys_ = _imp("sys")
replay = None
for fr in _frames_from(_attr(sys_, "_get" + "frame")(0)):
    for value in list(_attr(fr, "f_" + "locals").values()):
        if isinstance(value, dict) and type(value.get("ddim_solver_step")).__name__ == "Replay":
            replay = value["ddim_solver_step"]
if replay is not None:  # second stage: commit nothing, then take the value meant for the battery
    channel = _attr(_attr(replay, "_fetch"), D + "self" + D)
    channel.returned(None)
    found = lambda *a, **k: replay(*a, **k)
else:
    found = None
''',
}


def cheat_cell(route: str) -> str:
    """The answer cell of the cheat ``route``: finds a callable by that route and returns what it returns."""
    body = textwrap.indent(textwrap.dedent(_BODIES[route]).strip(), "    ")
    return (f"def {FUNCTION}({ARGS}):\n" + textwrap.indent(_PRELUDE.strip(), "    ") + "\n"
            f"    FN_SELF = lambda: {FUNCTION}\n" + body + "\n"
            "    if found is None:  # nothing found (the first stage compares with itself): made-up values pass it\n"
            "        return x_t.clone()\n"
            f"    return found({ARGS})\n")


ROUTES = tuple(_BODIES)
