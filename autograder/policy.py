"""Static policy for answer cells: what a graded function's cell may contain.

The autograder re-runs each answer cell on its own (``autograder/sandbox.py``); before that it parses the cell
and rejects constructs that only serve to cheat: reading files, reaching other modules' internals, patching
modules, dynamic code. Students see the reasons in their feedback, so each violation is one plain sentence.

The check is static (the cell is never executed here) and conservative: a cell that needs none of these
constructs never trips it. It is one layer of several (see ``autograder/README.md``, "Threat model").
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterable

__all__ = ["ALLOWED_IMPORTS", "ALLOWED_MODULES", "FORBIDDEN_CALLS", "FORBIDDEN_ATTRIBUTES", "ANSWER_ENV_NAMES",
           "check_cell", "import_allowed"]

#: Top-level packages an answer cell may import (any submodule of them).
ALLOWED_IMPORTS = frozenset({"torch", "math", "functools", "typing", "numpy", "diffusers", "tqdm"})
#: Modules of the kit an answer cell may import (exactly these).
ALLOWED_MODULES = frozenset({"helpers.schedule", "helpers.answer_env"})
#: Names the setup cell gives every answer cell (``from helpers.answer_env import *``).
ANSWER_ENV_NAMES = frozenset({"math", "functools", "torch", "F", "tqdm", "gather", "alpha_sigma", "timesteps_like"})
_MODULE_ENV_NAMES = frozenset({"math", "functools", "torch", "F"})

#: Built-in functions that run or reach code and data outside the cell.
FORBIDDEN_CALLS = frozenset({
    "open", "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "setattr", "delattr",
    "breakpoint", "__build_class__",
})

#: Attribute names that load or save files, reach interpreter internals, or rewire libraries.
FORBIDDEN_ATTRIBUTES = frozenset({
    # files
    "load", "loads", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt", "fromfile", "tofile",
    "from_file", "memmap", "open_memmap", "DataSource", "load_inline", "load_image", "hub", "cpp_extension",
    "ctypeslib", "package", "serialization",
    # rewiring libraries and dispatch
    "library", "ops", "classes", "overrides", "update_wrapper", "wraps", "get_type_hints", "ForwardRef",
    # modules re-exported as attributes of allowed packages (torch.os, numpy.sys, ...)
    "os", "sys", "subprocess", "builtins", "importlib", "inspect", "io", "pathlib", "json", "pickle", "ctypes",
    "gc", "shutil", "socket", "signal", "threading", "multiprocessing", "tempfile", "glob", "runpy", "marshal",
    "types", "traceback", "resource", "nbformat", "autograder", "sysconfig", "site", "pty", "zipfile", "tarfile",
    "urllib", "http", "requests", "linecache", "codecs", "warnings", "weakref", "atexit", "platform",
    # frames and code objects (reach the grader's variables)
    "f_back", "f_locals", "f_globals", "f_builtins", "f_code", "gi_frame", "gi_code", "cr_frame", "cr_code",
    "ag_frame", "ag_code", "tb_frame", "tb_next", "co_code", "co_consts", "gi_yieldframe",
})


#: Built-ins that look attributes up by name: only ever called directly, with a literal public name.
_ATTRIBUTE_LOOKUPS = frozenset({"getattr", "hasattr"})

_DUNDER = re.compile(r"(\w+\.)*__\w+__")


def import_allowed(module: str) -> bool:
    """True when an answer cell may import ``module`` (``torch.nn.functional`` yes, ``os`` no)."""
    return module in ALLOWED_MODULES or module.split(".")[0] in ALLOWED_IMPORTS


def _root_name(node: ast.AST) -> str | None:
    """The name at the root of ``a.b[c].d`` (``a``), or None when the root is not a plain name."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_chain(node: ast.AST) -> bool:
    """True for ``a`` and ``a.b.c`` (names and attribute chains, no calls or subscripts)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


class _Visitor(ast.NodeVisitor):
    """Collects violations of the policy; ``modules`` holds the names that refer to modules or imported objects."""

    def __init__(self, forbidden_names: Iterable[str], bound: set[str]):
        self.violations: list[str] = []
        self.forbidden_names = set(forbidden_names)
        self.imported: set[str] = set(ANSWER_ENV_NAMES)  # modules and objects the cell did not create
        self.modules: set[str] = set(_MODULE_ENV_NAMES)  # names known to be modules
        self.bound = bound  # names the cell binds itself (parameters, assignments, definitions)

    def add(self, node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", None)
        entry = f"line {line}: {message}" if line else message
        if entry not in self.violations:
            self.violations.append(entry)

    # imports -------------------------------------------------------------------------------------------
    def _check_module_path(self, node: ast.AST, module: str) -> None:
        if not import_allowed(module):
            self.add(node, f"imports {module!r}; answer cells may import only "
                           f"{', '.join(sorted(ALLOWED_IMPORTS | ALLOWED_MODULES))}")
        for part in module.split(".")[1:]:
            self._check_attr(node, part)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module_path(node, alias.name)
            name = alias.asname or alias.name.split(".")[0]
            self.imported.add(name)
            self.modules.add(name)
            self._check_name(node, name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            self.add(node, "uses a relative import; answer cells may import only "
                           f"{', '.join(sorted(ALLOWED_IMPORTS | ALLOWED_MODULES))}")
        else:
            self._check_module_path(node, module)
        for alias in node.names:
            if alias.name == "*":
                self.add(node, "uses `import *`; import the names you need explicitly")
                continue
            self._check_attr(node, alias.name)
            self.imported.add(alias.asname or alias.name)
            self._check_name(node, alias.asname or alias.name)

    # names and attributes -----------------------------------------------------------------------------
    def _check_name(self, node: ast.AST, name: str) -> None:
        if name.startswith("__") and name.endswith("__"):
            self.add(node, f"uses the special name {name!r}")
        if name in self.forbidden_names:
            self.add(node, f"uses {name!r}, which this task asks you to implement yourself")

    def _check_attr(self, node: ast.AST, attr: str) -> None:
        if attr.startswith("__"):
            self.add(node, f"accesses the special attribute {attr!r}")
        elif attr in FORBIDDEN_ATTRIBUTES:
            self.add(node, f"uses `.{attr}`, which answer cells may not use (files, interpreter internals or "
                           "rewiring of libraries)")
        if attr in self.forbidden_names:
            self.add(node, f"uses {attr!r}, which this task asks you to implement yourself")

    def visit_Name(self, node: ast.Name) -> None:
        self._check_name(node, node.id)
        if isinstance(node.ctx, ast.Load) and node.id in FORBIDDEN_CALLS and node.id not in self.bound:
            self.add(node, f"uses the built-in {node.id!r}, which answer cells may not use")
        parent = getattr(node, "parent", None)
        if (isinstance(node.ctx, ast.Load) and node.id in _ATTRIBUTE_LOOKUPS and node.id not in self.bound
                and not (isinstance(parent, ast.Call) and parent.func is node)):
            self.add(node, f"passes {node.id!r} around as a value (e.g. to functools.reduce or map): call it "
                           "directly with a literal attribute name")
        if (isinstance(node.ctx, ast.Load) and node.id in self.modules
                and not (isinstance(parent, ast.Attribute) and parent.value is node)):
            self.add(node, f"uses the module {node.id!r} itself as a value; use its functions (`{node.id}.name`)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check_attr(node, node.attr)
        root = _root_name(node)
        if node.attr.startswith("_") and root in self.imported and _is_chain(node):
            self.add(node, f"accesses the private attribute {node.attr!r} of {root!r}")
        if isinstance(node.ctx, (ast.Store, ast.Del)) and root in self.imported:
            self.add(node, f"assigns to or deletes an attribute of {root!r} (monkeypatching a module or an "
                           "imported object); change your own variables instead")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        root = _root_name(node)
        if isinstance(node.ctx, (ast.Store, ast.Del)) and root in self.imported:
            self.add(node, f"assigns into {root!r}, which you did not create")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        root = _root_name(node.target)
        if isinstance(node.target, (ast.Attribute, ast.Subscript)) and root in self.imported:
            self.add(node, f"modifies {root!r}, which you did not create")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        # ``m = torch.nn``: m now refers to a module, so ``m.functional.x = ...`` is monkeypatching too
        if _is_chain(node.value) and _root_name(node.value) in self.imported:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.imported.add(target.id)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _DUNDER.fullmatch(node.value.strip()):
            self.add(node, f"contains the string {node.value.strip()!r}, the name of a special attribute")

    # calls --------------------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _ATTRIBUTE_LOOKUPS and func.id not in self.bound:
            target = node.args[0] if node.args else None
            name = node.args[1] if len(node.args) > 1 else None
            if target is not None and _root_name(target) in self.imported:
                self.add(node, f"uses {func.id} on a module or imported object")
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str) and not name.value.startswith("_")):
                self.add(node, f"uses {func.id} with a computed or private attribute name")
            elif name.value in FORBIDDEN_ATTRIBUTES:
                self._check_attr(node, name.value)
        if isinstance(func, ast.Name) and func.id == "type" and len(node.args) == 3:
            self.add(node, "creates a class with type(name, bases, dict); answer cells may not define classes")
        self.generic_visit(node)

    # statements that are never needed --------------------------------------------------------------
    def visit_Global(self, node: ast.Global) -> None:
        self.add(node, "uses `global`; return values instead of changing global state")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.add(node, f"defines a class ({node.name}); answer cells define functions only")
        self.generic_visit(node)


def _bound_names(tree: ast.AST) -> set[str]:
    """Names the cell binds itself: parameters, assignment and loop targets, function definitions."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
    return bound


def check_cell(source: str, function: str | None = None, forbidden_names: Iterable[str] = ()) -> list[str]:
    """Violations of the answer-cell policy in ``source`` (an empty list when the cell is acceptable).

    ``function``: the graded function the cell must define (checked when given); ``forbidden_names``: names
    the task forbids (its ``FORBIDDEN_NAMES`` entry, e.g. ``scheduler.add_noise`` for ``q_sample``).
    """
    try:
        tree = ast.parse(source, filename="<answer cell>")
    except SyntaxError as err:
        return [f"line {err.lineno}: syntax error: {err.msg}"]
    except (ValueError, RecursionError, MemoryError) as err:
        return [f"the cell cannot be parsed: {type(err).__name__}"]
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent  # type: ignore[attr-defined]
    visitor = _Visitor(forbidden_names, _bound_names(tree))
    try:
        visitor.visit(tree)
    except RecursionError:
        return ["the cell is nested too deeply to be checked"]
    if function is not None and not any(
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function for n in tree.body):
        visitor.violations.append(f"the cell does not define `def {function}(...)` at its top level")
    return visitor.violations
