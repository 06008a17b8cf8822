"""The kit's structure: one settings object (:class:`helpers.config.KitConfig`) read at the edge.

* No module of ``helpers/``, ``autograder/`` or ``scripts/`` (nor a solution notebook's code) reads a kit setting
  from the environment except ``helpers/config.py``; the few exceptions are listed with their reason.
* ``docs/configuration.md`` holds exactly the table that the fields generate.
* :meth:`KitConfig.from_environ` parses every variable and names it when a value is bad.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from helpers.config import DOCS_FILE, KitConfig, generated_table, markdown_table, setting_fields
from helpers.course import ASSIGNMENTS

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("helpers", "autograder", "scripts")
CONFIG_MODULE = "helpers/config.py"
KIT_NAMES = frozenset(f.metadata["env"] for f in setting_fields())

#: (file, what the check found) -> why it may stay. Every entry must still occur: delete it when the code goes.
ALLOWED: dict[tuple[str, str], str] = {
    ("autograder/forkserver.py", "CD_KIT_"):
        "copies the kit's variables into the kernels' environment (a write for child processes)",
    ("autograder/tape.py", "os.environ.get(variable)"):
        "saves CD_KIT_CHECK_SEED to restore it after the grader's recorded run sets it (the batteries read it "
        "through KitConfig)",
    ("autograder/forkserver.py", "os.environ[k]"):
        "copies _KEEP_ENV (PATH, HOME, ...: no kit setting) into the kernels' environment",
    **{(f"solutions/{a.id}/{a.notebook}", name):
       "the Colab/Kaggle setup cell runs before the kit is installed, so it cannot use KitConfig "
       "(helpers/platform_setup.py writes the cell)"
       for a in ASSIGNMENTS for name in ("CD_KIT_COURSE_DIR", "CD_KIT_COURSE_URL")},
}


def _is_kit_name(text: str) -> bool:
    """A kit variable's name (or the ``CD_KIT_`` prefix), as code that reads one would spell it."""
    return text in KIT_NAMES or bool(re.fullmatch(r"CD_KIT_[A-Z0-9_]*", text))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _writes(tree: ast.AST) -> set[int]:
    """Constants in a role that writes or removes a variable (for a child process): a subscript key being
    assigned or deleted, the key of ``.setdefault``/``.pop``, a key of a dict literal."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            ids.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and (
                node.func.attr in ("setdefault", "pop")):
            ids.add(id(node.args[0]))
        elif isinstance(node, ast.Dict):
            ids.update(id(k) for k in node.keys if k is not None)
    return ids


def _env_read_key(node: ast.AST) -> ast.AST | None:
    """The key of an environment read: ``os.environ[key]``, ``os.environ.get(key)``, ``os.getenv(key)``."""
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
        return node.slice
    if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
        if node.func.attr == "get" and _is_environ(node.func.value):
            return node.args[0]
        if node.func.attr == "getenv":
            return node.args[0]
    if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Name) and node.func.id == "getenv":
        return node.args[0]
    return None


def kit_setting_reads(source: str) -> list[tuple[int, str]]:
    """``(line, finding)`` for each place in ``source`` that may read a kit setting from the environment: a
    string that spells a kit variable (outside docstrings and writes), or an environment read whose key is
    not a literal (the check cannot tell which variable it reads)."""
    tree = ast.parse(source)
    skip = _docstrings(tree) | _writes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if _is_kit_name(node.value):
                found.append((node.lineno, node.value))
        key = _env_read_key(node)
        if key is not None and not isinstance(key, ast.Constant):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def _sources() -> dict[str, str]:
    """Every scanned Python file and solution notebook (its code cells joined) by path relative to the kit."""
    out = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        out[path.relative_to(ROOT).as_posix()] = "\n\n".join(
            "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))) for cell in code)
    return out


def test_only_the_config_module_reads_kit_settings_from_the_environment():
    found = {(path, finding): line for path, source in _sources().items() if path != CONFIG_MODULE
             for line, finding in kit_setting_reads(source)}
    unexplained = sorted(f"{path}:{line}: {finding}" for (path, finding), line in found.items()
                         if (path, finding) not in ALLOWED)
    assert not unexplained, (
        "These places read kit settings from the environment; take a KitConfig (or its field) as an argument "
        "instead, read once at the edge with KitConfig.from_environ() (see docs/configuration.md), or, for a "
        "variable written for a child process, use config.to_environ():\n  " + "\n  ".join(unexplained))
    stale = sorted(f"{path}: {finding}" for path, finding in ALLOWED if (path, finding) not in found)
    assert not stale, "ALLOWED lists exceptions that are gone; delete them:\n  " + "\n  ".join(stale)


def test_the_check_finds_reads_and_lets_writes_pass():
    reads = '''
import os
a = os.environ.get("CD_KIT_MODEL")
b = os.getenv("NBGRADER_EXECUTION", "")
VAR = "CD_KIT_OUT"
c = os.environ[VAR]
d = "CD_KIT_REDUCED" in os.environ
e = {k: v for k, v in os.environ.items() if k.startswith("CD_KIT_")}
'''
    assert [f for _, f in kit_setting_reads(reads)] == [
        "CD_KIT_MODEL", "NBGRADER_EXECUTION", "CD_KIT_OUT", "os.environ[VAR]", "CD_KIT_REDUCED", "CD_KIT_"]
    writes = '''
"""Docstrings may name CD_KIT_MODEL."""
import os
env = {**os.environ, **config.to_environ()}
env["CD_KIT_OUT"] = "/tmp/out"
env.pop("NBGRADER_EXECUTION", None)
os.environ.setdefault("CD_KIT_CHECK_SEED", "1")
child = dict(os.environ, CD_KIT_MODEL="small")
child.update({"NBGRADER_EXECUTION": "autograde"})
raise ValueError("set CD_KIT_DATA=/path/to/folder")
home = os.environ.get("HOME")
'''
    assert kit_setting_reads(writes) == []


def test_configuration_doc_is_the_generated_table():
    assert generated_table(DOCS_FILE.read_text(encoding="utf-8")) == markdown_table(), (
        "docs/configuration.md is out of date: run `python -m helpers.config --update-docs`")
    table = markdown_table()
    for f in setting_fields():
        assert f"| `{f.metadata['env']}` | `{f.name}` |" in table and f.metadata["help"] in table


def test_every_field_is_documented_and_named_once():
    fields = setting_fields()
    envs = [f.metadata["env"] for f in fields]
    assert len(set(envs)) == len(envs) and all(e.startswith("CD_KIT_") or e == "NBGRADER_EXECUTION" for e in envs)
    assert all(f.metadata["help"].strip() and f.metadata["kind"] in ("str", "bool", "int", "count") for f in fields)
    assert KitConfig.env_var("model") == "CD_KIT_MODEL"
    with pytest.raises(KeyError):
        KitConfig.env_var("nope")


# ------------------------------------------------------------------------------------------ from_environ
def test_from_environ_reads_every_variable():
    environ = {"CD_KIT_MODEL": "sd15", "CD_KIT_DEVICE": "cpu", "CD_KIT_TRAIN_PROFILE": "low-memory",
               "CD_KIT_DATA": "/data/coco5k", "CD_KIT_OUT": "/tmp/out", "CD_KIT_REDUCED": "1",
               "NBGRADER_EXECUTION": "validate", "CD_KIT_SOLUTIONS": "/course/source", "CD_KIT_CHECK_SEED": "42",
               "CD_KIT_HUB_REPO": "me/adapter", "CD_KIT_COURSE_DIR": "/kaggle/working/c",
               "CD_KIT_COURSE_URL": "file:///srv/course.git", "CD_KIT_EVAL_IMAGES": "paper",
               "CD_KIT_CLIP_MODEL": "/models/clip", "CD_KIT_INCEPTION": "/models/inception.pt",
               "CD_KIT_EVAL_COMPILE": "vae", "UNRELATED": "x"}
    config = KitConfig.from_environ(environ)
    assert config == KitConfig(model="sd15", device="cpu", train_profile="low-memory", data="/data/coco5k",
                               out="/tmp/out", reduced=True, execution="validate", solutions="/course/source",
                               check_seed=42, hub_repo="me/adapter", course_dir="/kaggle/working/c",
                               course_url="file:///srv/course.git", eval_images=5000, clip_model="/models/clip",
                               inception="/models/inception.pt", eval_compile="vae")
    assert {f.metadata["env"] for f in setting_fields()} <= set(environ)  # the test covers every field
    assert KitConfig.from_environ(config.to_environ()) == config  # round trip through a child's environment
    assert config.out_path == Path("/tmp/out") and config.solutions_path == Path("/course/source")


def test_from_environ_defaults_and_empty_values_are_unset():
    assert KitConfig.from_environ({}) == KitConfig()
    empty = {f.metadata["env"]: "" for f in setting_fields()}
    assert KitConfig.from_environ(empty) == KitConfig() == KitConfig.from_environ({"CD_KIT_REDUCED": "  "})
    default = KitConfig()
    assert (default.model, default.device, default.reduced, default.check_seed, default.execution) == (
        "small", None, False, None, "")
    assert default.to_environ() == {"CD_KIT_MODEL": "small"}
    assert KitConfig.from_environ({"CD_KIT_MODEL": "sd15"}, model="small", reduced=True) == KitConfig(reduced=True)


@pytest.mark.parametrize("raw, value", [("1", True), ("0", False), ("true", True), ("False", False),
                                        ("yes", True), ("off", False)])
def test_from_environ_parses_bools(raw, value):
    assert KitConfig.from_environ({"CD_KIT_REDUCED": raw}).reduced is value


def test_from_environ_parses_ints():
    assert KitConfig.from_environ({"CD_KIT_CHECK_SEED": " 20241125 "}).check_seed == 20241125
    assert KitConfig.from_environ({"CD_KIT_CHECK_SEED": "0"}).check_seed == 0


@pytest.mark.parametrize("variable, raw", [("CD_KIT_REDUCED", "maybe"), ("CD_KIT_CHECK_SEED", "abc"),
                                           ("CD_KIT_CHECK_SEED", "1.5"), ("NBGRADER_EXECUTION", "grade")])
def test_from_environ_rejects_bad_values_naming_the_variable(variable, raw):
    with pytest.raises(ValueError, match=variable):
        KitConfig.from_environ({variable: raw})


def test_from_environ_reads_os_environ_by_default(kit_environ):
    config = kit_environ(KitConfig(model="custom/model", reduced=True, check_seed=7))
    assert KitConfig.from_environ() == config


def test_config_is_frozen():
    config = KitConfig()
    with pytest.raises(AttributeError):
        config.model = "sd15"  # type: ignore[misc]
    assert config.replace(model="sd15").model == "sd15" and config.model == "small"


# --- one direction between the packages ------------------------------------------------------------------

def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a Python file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def test_helpers_never_imports_the_grader():
    """helpers/ is what students install and import; the grader builds on it, never the other way round."""
    bad = [f"{p.relative_to(ROOT)}:{line}: import {mod}" for p in sorted((ROOT / "helpers").rglob("*.py"))
           for line, mod in _imports(p) if mod == "autograder" or mod.startswith("autograder.")]
    assert not bad, "helpers must not import autograder:\n  " + "\n  ".join(bad)


def test_notebooks_never_import_the_command_line_tools():
    """helpers.commands holds the command-line tools (reference run, lab, model training): no notebook needs them."""
    bad = []
    for nb_path in sorted([*(ROOT / "solutions").glob("*/*.ipynb"), *(ROOT / "notebooks").glob("*/*.ipynb")]):
        for i, cell in enumerate(json.loads(nb_path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code" and "helpers.commands" in "".join(cell["source"]):
                bad.append(f"{nb_path.relative_to(ROOT)} cell {i}")
    assert not bad, bad


def test_the_import_check_sees_lazy_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from autograder.reference import reference\n    import os\n")
    assert (2, "autograder.reference") in _imports(sample)
