"""Run one student answer cell on its own against the hidden battery, inside a process that is about to exit.

:func:`recheck_in_child` is what a child of the fork server (``autograder/forkserver.py``) runs: it limits
its own resources, leaves the grader's files unreadable, executes *only* the answer cell in a fresh
namespace (answer-cell names + reference functions of everything else) with restricted built-ins, and runs
the battery on the function the cell defines. Every layer is explained in ``autograder/README.md``.
"""
from __future__ import annotations

import builtins
import functools
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from autograder import landlock
from autograder.batteries import Batteries, load_batteries
from autograder.policy import FORBIDDEN_CALLS, check_cell, import_allowed
from autograder.tape import Replay, TapeDiverged, TapeRefused, encode, seed_like_recheck
from helpers.notebook_functions import build_namespace

__all__ = ["Batteries", "Limits", "Snapshot", "TapeChannel", "load_batteries", "recheck", "recheck_in_child",
           "classify_exception", "STUDENT_FILENAME"]

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
    targets: dict[str, object] = {"builtins": builtins, "math": math, "functools": functools, "torch": torch,
                                  "torch.nn": torch.nn, "torch.nn.functional": F, "torch.testing": torch.testing,
                                  "torch.linalg": torch.linalg, "torch.Tensor": torch.Tensor,
                                  "torch.nn.Module": torch.nn.Module, "torch.autograd": torch.autograd}
    for name in ("numpy", "numpy.testing", "helpers.schedule", "helpers.answer_env", "autograder.checks",
                 "autograder.tape", *battery_modules):
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


def _guarded(fn: Callable, snapshot: Snapshot, found: list[str], on_return: Callable[[Any], None] | None = None
             ) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        finally:
            changed = snapshot.changes()
            if changed:
                found.extend(changed)
                raise _Tampered(", ".join(changed))
        if on_return is not None:
            on_return(result)  # commits the answer to the fork server before the battery sees it
        return result

    return call


class _Mirror:
    """``ref[name]`` of the first stage: the student's own function, counting how often the battery asks."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class TapeChannel:
    """The child's end of the tape protocol with the fork server (one JSON object per line each way)."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd = write_fd, read_fd
        self._buffer = b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data):]

    def _receive(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise TapeRefused("the fork server closed the tape")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self) -> None:
        self.send({"tape": "start"})

    def returned(self, value: Any) -> None:
        """Commit what the student's function just returned: the grader pairs it with the next recorded value
        it hands out and checks the pairs itself (``RecheckClient``)."""
        try:
            committed = encode(_on_cpu(value))
        except Exception:  # noqa: BLE001 - not a tensor, number or container of them: nothing to compare
            committed = None
        self.send({"returned": committed})

    def fetch(self, index: int, key: str) -> str:
        self.send({"need": index, "digest": key})
        reply = self._receive()
        if "diverged" in reply:
            raise TapeDiverged(reply["diverged"])
        if "value" not in reply:
            raise TapeRefused(reply.get("refused", "no value"), reply.get("kind", "order"))
        return reply["value"]


def _outcome(run: Callable[[], None], found: list[str], against_reference: bool = False) -> dict | None:
    """Run one stage of the battery; None when it passed, else the verdict."""
    try:
        run()
    except _Tampered as err:
        return {"status": "policy_violation", "message": f"the function changed {err} while being checked"}
    except TapeDiverged as err:
        return {"status": "failed", "message": f"the battery's inputs to the reference differ from the recorded run "
                                               f"({err}): the function changed its inputs or the battery's state"}
    except TapeRefused as err:
        if err.args[1:] == ("unavailable",):
            return {"status": "recheck_error", "message": f"no recorded reference values: {err.args[0]}"}
        return {"status": "failed", "message": f"the reference's recorded values were asked for out of turn "
                                               f"({err.args[0]}): the function reached into the grader's battery"}
    except BaseException as err:  # noqa: BLE001
        if found:
            return {"status": "policy_violation", "message": f"the function changed {', '.join(found)}"}
        result = {"status": classify_exception(err), "message": f"{type(err).__name__}: {err}"}
        if against_reference and result["status"] == "failed":
            result["against_reference"] = True
        return result
    if found:
        return {"status": "policy_violation", "message": f"the function changed {', '.join(found)}"}
    return None


def recheck(request: dict, batteries: Batteries, channel: TapeChannel | None = None) -> dict:
    """Check ``request["source"]`` (the answer cell of ``request["function"]``) against its battery in this
    process; return ``{"status", "message"}``. Call only in a disposable process: student code runs here.

    The namespace is built from ``request["dependencies"]`` (the reference cells of the *other* functions, sent
    by the grader): this process never holds the reference of the function under test. The battery runs twice:
    first with the student's function in the reference's place too (what the student's kernel ran: behaviour,
    types, in-place edits, recordings), then, if the battery compares with the reference at all, against the
    reference's recorded values, which ``channel`` fetches one at a time from the fork server."""
    function, source = request["function"], request["source"]
    filters = request.get("filters", True)
    violations = check_cell(source, function, batteries.forbidden.get(function, ())) if filters else []
    if violations:
        return {"status": "policy_violation", "message": "; ".join(violations)}
    ref = build_namespace([tuple(d) for d in request.get("dependencies", ())])
    ns = dict(ref)
    if filters:
        ns["__builtins__"] = restricted_builtins()
    snapshot = Snapshot(watched_objects(batteries.modules) if filters else {})
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
    check = batteries.checks[function]
    found: list[str] = []
    mirror = _Mirror(_guarded(student, snapshot, found))
    outcome = _outcome(lambda: check(_guarded(student, snapshot, found), {**ref, function: mirror}), found)
    if outcome is not None or mirror.calls == 0:
        return outcome or {"status": "passed", "message": ""}
    if channel is None:
        return {"status": "recheck_error", "message": "the battery compares with the reference, but no recorded "
                                                      "values were available"}
    seed_like_recheck()
    channel.start()
    replay = Replay(channel.fetch)
    outcome = _outcome(lambda: check(_guarded(student, snapshot, found, channel.returned), {**ref, function: replay}),
                       found, against_reference=function in batteries.kernel_blind)
    if outcome is not None:
        return outcome
    if replay.calls != mirror.calls:
        return {"status": "recheck_error", "message": f"the battery asked the reference {replay.calls} times against "
                                                      f"the recorded values and {mirror.calls} times before"}
    return {"status": "passed", "message": ""}


def recheck_in_child(request: dict, batteries: Batteries, protected: list[str], limits: Limits, workdir: str,
                     writable: Iterable[str] = (), channel: TapeChannel | None = None) -> dict:
    """Everything the fork server's child does before :func:`recheck`: limits, seeds, the Landlock confinement
    (nothing under ``protected`` can be opened, by the kernel's word) and the audit hook."""
    apply_limits(limits)
    os.chdir(workdir)
    os.environ["TMPDIR"] = workdir
    tempfile.tempdir = workdir
    sys.dont_write_bytecode = True
    torch.set_num_threads(max(1, limits.threads))
    seed_like_recheck()
    writable = [workdir, *writable]
    try:
        # /dev and /proc writable: CUDA's driver opens its devices read-write and writes under /proc when it
        # starts (without /proc, cudaGetDeviceCount fails with error 304 in the child; seen on an H200 host)
        confined = landlock.confine([*landlock.default_read_roots(), *writable], [*writable, "/dev", "/proc"],
                                    protected)
    except OSError as err:
        return {"status": "recheck_error", "message": f"could not confine the re-check (Landlock): {err}"}
    if request.get("filters", True):  # off only in the tests that show the reference is out of reach anyway
        install_audit_hook(protected, writable)
    started = time.monotonic()
    result = recheck(request, batteries, channel)
    result["seconds"] = round(time.monotonic() - started, 3)
    result["message"] = result.get("message", "")[:2000]
    result["confined"] = confined
    return result
