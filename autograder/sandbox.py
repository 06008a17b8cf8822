"""Run one student answer cell on its own against the hidden battery, inside a process that is about to exit.

:func:`recheck_in_child` is what a child of the fork server (``autograder/forkserver.py``) runs: it limits
its own resources, leaves the grader's files unreadable, executes *only* the answer cell in a fresh
namespace (answer-cell names + reference functions of everything else) with restricted built-ins, and runs
the battery on the function the cell defines. Every layer is explained in ``autograder/README.md``.
"""
from __future__ import annotations

import builtins
import importlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from autograder.policy import FORBIDDEN_CALLS, check_cell, import_allowed

__all__ = ["Batteries", "Limits", "Snapshot", "load_batteries", "recheck_in_child", "classify_exception",
           "STUDENT_FILENAME"]

#: Filename given to the compiled answer cell: frames with it on the stack are student code.
STUDENT_FILENAME = "<answer cell>"
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one isolated re-check."""

    timeout_s: float = 120.0
    memory_bytes: int | None = None  # RLIMIT_DATA (heap and anonymous mappings); None = no limit
    threads: int = 1
    file_bytes: int = 64 * 2**20  # largest file the child may write


@dataclass
class Batteries:
    """Hidden batteries of one or more check modules: ``checks[fn](student_fn, ref)`` raises AssertionError."""

    checks: dict[str, Callable] = field(default_factory=dict)
    depends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forbidden: dict[str, tuple[str, ...]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)


def load_batteries(modules: Iterable[str]) -> Batteries:
    """Import the check modules (``autograder.checks`` by default) and merge their CHECKS, DEPENDS and
    FORBIDDEN_NAMES."""
    out = Batteries()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"Cannot import the check module {name!r} ({err}); pass an importable module "
                              "(on PYTHONPATH) that defines CHECKS = {{function: check}}.") from err
        out.modules.append(name)
        out.checks.update(getattr(mod, "CHECKS", {}))
        out.depends.update({k: tuple(v) for k, v in getattr(mod, "DEPENDS", {}).items()})
        out.forbidden.update({k: tuple(v) for k, v in getattr(mod, "FORBIDDEN_NAMES", {}).items()})
    return out


def classify_exception(err: BaseException) -> str:
    """Status for an exception raised while checking: failed, out_of_memory, unanswered or error."""
    text = f"{type(err).__name__}: {err}".lower()
    if isinstance(err, MemoryError) or "outofmemory" in type(err).__name__.lower() or any(
            m in text for m in _OOM_MARKERS):
        return "out_of_memory"
    if isinstance(err, AssertionError):
        return "failed"
    if isinstance(err, NotImplementedError):
        return "unanswered"
    return "error"


# --- process limits ---------------------------------------------------------------------------------------

def apply_limits(limits: Limits) -> None:
    """Hard resource limits for this process (inherited by nothing: the child never starts processes)."""
    if limits.memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
    cpu = int(limits.timeout_s * max(1, limits.threads) + 30)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _student_on_stack() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == STUDENT_FILENAME:
            return True
        frame = frame.f_back
    return False


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALWAYS_BLOCKED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.getaddrinfo",
                   "pty.spawn", "sys.addaudithook")
_PATH_EVENTS = ("os.remove", "os.rename", "os.replace", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                "os.link", "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile")
_BLOCKED_FOR_STUDENT = ("ctypes.", "gc.get_referrers", "gc.get_referents", "gc.get_objects")


def install_audit_hook(protected: Iterable[str | Path], writable: Iterable[str | Path]) -> None:
    """Block reading the grader's files (``protected``), writing outside ``writable``, starting processes and
    signalling, and - while student code is on the stack - ctypes, frame and object-graph introspection."""
    protected_roots = tuple(os.path.realpath(p) for p in protected)
    writable_roots = tuple(os.path.realpath(p) for p in writable)

    def under(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if isinstance(path, int):
                return
            real = os.path.realpath(os.fsdecode(path))
            if under(real, protected_roots):
                raise PermissionError(f"the isolated re-check may not open {real}")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not under(real, writable_roots):
                raise PermissionError(f"the isolated re-check may not write {real}")
        elif event in _PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    real = os.path.realpath(os.fsdecode(path))
                    if not under(real, writable_roots):
                        raise PermissionError(f"the isolated re-check may not change {real}")
        elif event.startswith(_ALWAYS_BLOCKED):
            raise PermissionError(f"the isolated re-check may not use {event}")
        elif event.startswith(_BLOCKED_FOR_STUDENT) and _student_on_stack():
            raise PermissionError(f"answer cells may not use {event}")

    sys.addaudithook(hook)


# --- namespace of the answer cell ---------------------------------------------------------------------

def restricted_builtins() -> dict:
    """The built-ins an answer cell sees: no file access or dynamic code, and ``import`` limited to the
    allowed packages."""
    names = {k: v for k, v in vars(builtins).items() if k not in FORBIDDEN_CALLS}
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or not import_allowed(name):
            raise ImportError(f"answer cells may not import {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    names["__import__"] = guarded_import
    return names


class Snapshot:
    """Identity of every attribute of the modules and classes the battery relies on, to detect patching."""

    def __init__(self, targets: dict[str, object]):
        self.targets = targets
        self.before = self._take()

    def _take(self) -> dict[tuple[str, str], int]:
        return {(label, key): id(value) for label, obj in self.targets.items() for key, value in list(vars(obj).items())}

    def changes(self) -> list[str]:
        """``name.attribute`` of every attribute replaced or removed since the snapshot, and of every attribute
        added to a class that hides an inherited one (new module attributes are allowed: importing a submodule
        adds one)."""
        now = self._take()
        changed = {k for k, v in self.before.items() if now.get(k) != v}
        changed |= {k for k in now.keys() - self.before.keys() if self._shadows(*k)}
        return sorted(f"{label}.{key}" for label, key in changed)

    def _shadows(self, label: str, key: str) -> bool:
        """An attribute added to a class matters when it hides an inherited one (``Tensor.allclose``); new
        names (a library adding a helper method when it is imported) do not."""
        target = self.targets[label]
        return isinstance(target, type) and any(key in vars(base) for base in target.__mro__[1:])


def watched_objects(battery_modules: Iterable[str]) -> dict[str, object]:
    """Modules and classes whose attributes the battery uses (comparison functions, tensor methods, ...)."""
    import math

    import functools

    import torch
    import torch.nn.functional as F

    targets: dict[str, object] = {"builtins": builtins, "math": math, "functools": functools, "torch": torch,
                                  "torch.nn": torch.nn, "torch.nn.functional": F, "torch.testing": torch.testing,
                                  "torch.linalg": torch.linalg, "torch.Tensor": torch.Tensor,
                                  "torch.nn.Module": torch.nn.Module, "torch.autograd": torch.autograd}
    for name in ("numpy", "numpy.testing", "helpers.schedule", "helpers.answer_env", "autograder.checks",
                 "autograder.reference", *battery_modules):
        mod = sys.modules.get(name)
        if mod is not None:
            targets[name] = mod
    for name, mod in list(sys.modules.items()):
        if name.startswith("autograder.checks.") and mod is not None:
            targets[name] = mod
    return targets


# --- the re-check ------------------------------------------------------------------------------------------

class _Tampered(BaseException):
    """Raised through the battery when the student's function changed a watched module (not an Exception, so
    that a battery's ``except Exception`` cannot swallow it)."""


def _guarded(fn: Callable, snapshot: Snapshot, found: list[str]) -> Callable:
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            changed = snapshot.changes()
            if changed:
                found.extend(changed)
                raise _Tampered(", ".join(changed))

    return call


def recheck(function: str, source: str, batteries: Batteries, source_dir: str | Path) -> dict:
    """Check ``source`` (the answer cell of ``function``) against its battery in this process; return
    ``{"status", "message"}``. Call only in a disposable process: student code runs here."""
    from autograder.reference import graded_namespace, reference_in

    violations = check_cell(source, function, batteries.forbidden.get(function, ()))
    if violations:
        return {"status": "policy_violation", "message": "; ".join(violations)}
    depends = batteries.depends.get(function, ())
    ns = graded_namespace(function, depends, source_dir)
    ref = dict(ns)
    ref[function] = reference_in(function, source_dir)
    ns["__builtins__"] = restricted_builtins()
    snapshot = Snapshot(watched_objects(batteries.modules))
    try:
        exec(compile(source, STUDENT_FILENAME, "exec"), ns)
    except BaseException as err:  # noqa: BLE001 - student code may raise anything
        return {"status": classify_exception(err),
                "message": f"the answer cell raised {type(err).__name__}: {err} when run on its own"}
    changed = snapshot.changes()
    if changed:
        return {"status": "policy_violation", "message": f"the answer cell changed {', '.join(changed)}"}
    student = ns.get(function)
    if not callable(student):
        return {"status": "missing", "message": f"the answer cell does not define {function}"}
    for name, value in ref.items():  # names the function looks up globally: the reference versions
        if name != function and callable(value) and not name.startswith("__"):
            ns[name] = value
    found: list[str] = []
    try:
        batteries.checks[function](_guarded(student, snapshot, found), ref)
    except _Tampered as err:
        return {"status": "policy_violation", "message": f"the function changed {err} while being checked"}
    except BaseException as err:  # noqa: BLE001
        if found:
            return {"status": "policy_violation", "message": f"the function changed {', '.join(found)}"}
        return {"status": classify_exception(err), "message": f"{type(err).__name__}: {err}"}
    changed = found or snapshot.changes()
    if changed:
        return {"status": "policy_violation", "message": f"the function changed {', '.join(changed)}"}
    return {"status": "passed", "message": ""}


def recheck_in_child(request: dict, batteries: Batteries, source_dir: str, protected: list[str],
                     limits: Limits, workdir: str, writable: Iterable[str] = ()) -> dict:
    """Everything the fork server's child does before :func:`recheck`: limits, seeds, audit hook."""
    apply_limits(limits)
    os.chdir(workdir)
    os.environ["TMPDIR"] = workdir
    sys.dont_write_bytecode = True
    import random

    import torch

    torch.set_num_threads(max(1, limits.threads))
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy

        numpy.random.seed(0)
    except ImportError:
        pass
    install_audit_hook(protected, [workdir, *writable])
    started = time.monotonic()
    result = recheck(request["function"], request["source"], batteries, source_dir)
    result["seconds"] = round(time.monotonic() - started, 3)
    result["message"] = result.get("message", "")[:2000]
    return result
