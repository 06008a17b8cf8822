"""Fork server for the isolated re-check: import torch, the batteries and the reference functions once, then
fork one short-lived child per answer cell.

The server (``python -m autograder.forkserver CONFIG_JSON``) reads one JSON request per line on stdin,
``{"function": ..., "source": ...}``, and writes one JSON result per line on stdout,
``{"status": ..., "message": ..., "seconds": ...}``. Each request runs in a fresh ``os.fork()`` child
(:func:`autograder.sandbox.recheck_in_child`) in its own process group, with a wall-clock deadline after
which the group is killed. The server itself never runs student code and never computes with torch (forking
after OpenMP or CUDA started is unsafe).

:class:`RecheckClient` is the grader-side handle: it starts the server with a sanitised environment, sends
requests, and restarts the server if it dies.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autograder.batteries import Batteries, load_batteries
from autograder.tape import DEFAULT_CHECK_SEED, TapeStore, close_enough, decode
from helpers.config import KitConfig
from autograder.types import Status, Verdict
from helpers.notebook_functions import answer_imports, graded_sources, source_functions

__all__ = ["RecheckClient", "serve", "sanitized_env", "NO_FORK_POISON"]

_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "USER", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
             "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "OMP_WAIT_POLICY",
             "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME")


# torch.cuda.is_available() (called by diffusers and accelerate at import) marks a process whose children
# cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess") unless torch asks NVML instead: the fork
# servers, which import torch and then fork, set this. Found grading on an H100, 2026-11-26.
NO_FORK_POISON = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


def sanitized_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the re-check: a short allow-list (no tokens, no grader settings) plus the kit's
    ``CD_KIT_*`` model and device settings, offline Hugging Face, and ``NBGRADER_EXECUTION=autograde``."""
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CD_KIT_")})
    env.update({"NBGRADER_EXECUTION": "autograde", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1", **NO_FORK_POISON})
    env.update(extra or {})
    return env


# --- server side ------------------------------------------------------------------------------------------

def _preload(config: dict):
    """Import everything a child needs, before any fork. No reference function and no solution source is ever
    loaded here: each request brings the sources of the *other* functions the student's may call, and the
    expected values of the function under test reach the child one at a time, after the fork."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import helpers.answer_env  # noqa: F401
    import helpers.notebook_functions  # noqa: F401
    batteries = load_batteries(config["check_modules"])
    for statement in config.get("imports", ()):  # the answer cells' own import lines (never their code)
        try:
            exec(statement, {})
        except Exception:  # noqa: BLE001 - the re-check of that cell will report it
            pass
    if "diffusers" in sys.modules:  # the batteries use diffusers: import the pipeline classes too
        import diffusers

        for name in ("DDIMScheduler", "UNet2DConditionModel", "AutoencoderKL", "StableDiffusionPipeline"):
            try:
                getattr(diffusers, name)
            except (AttributeError, ImportError):
                pass
        try:  # the pipeline's text encoder; importing transformers also patches torch.nn.Module
            import transformers

            transformers.CLIPTextModel  # noqa: B018
        except (ImportError, AttributeError):
            pass
    return batteries, sorted(batteries.checks)


def _writable_roots(workdir: str) -> list[str]:
    roots = [workdir]
    try:
        from huggingface_hub import constants

        roots.append(str(constants.HF_HUB_CACHE))  # lock files when a battery loads a cached model
    except ImportError:
        pass
    return roots


def _run_child(request: dict, batteries, config: dict, workdir: str, write_fd: int, read_fd: int) -> None:
    """In the forked child: run the re-check, write its JSON result to ``write_fd``; never returns."""
    code = 0
    channel = None
    try:
        os.setpgrp()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        from autograder.sandbox import Limits, TapeChannel, recheck_in_child

        limits = Limits(**config["limits"])
        channel = TapeChannel(write_fd, read_fd)
        result = recheck_in_child(request, batteries, config["protected"], limits, workdir,
                                  _writable_roots(workdir)[1:], channel)
    except BaseException as err:  # noqa: BLE001
        result = {"status": "recheck_error", "message": f"the re-check itself failed: {type(err).__name__}: {err}"}
        code = 1
    try:
        data = (json.dumps({"result": result}) + "\n").encode()
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(code)


class _TapeGate:
    """The server's side of the tape protocol: hands the child the recorded values of the reference one at a
    time, in order, and only after the student's function returned since the last one (the child never holds a
    value it could return before its own answer is computed). The tape is asked for lazily (``get_tape``), after
    the fork, so that the child's memory never held it."""

    def __init__(self, get_tape):
        self.get_tape = get_tape
        self.entries: list | None = None
        self.error: str | None = None
        self.next = 0
        self.committed: str | None = None
        self.pairs: list[list] = []  # [index of the recorded value, the student's answer committed before it]
        self.returned = False
        self.waited_s = 0.0

    def answer(self, message: dict) -> dict | None:
        if "returned" in message:
            self.returned, self.committed = True, message["returned"]
            return None
        if "tape" in message:  # the child starts the stage that compares with the recorded values
            self.returned, self.next, self.pairs = False, 0, []
            return None
        if "need" in message:
            if self.entries is None:
                started = time.monotonic()
                self.entries, self.error = self.get_tape()
                self.waited_s += time.monotonic() - started
            index = message.get("need")
            if self.error:
                return {"refused": self.error, "kind": "unavailable"}
            if index != self.next or index >= len(self.entries):
                return {"refused": f"value {index!r} asked for, the next recorded one is {self.next} of "
                                   f"{len(self.entries)}"}
            if not self.returned:
                return {"refused": "the reference's value was asked for before the student's function returned"}
            key, value = self.entries[index]
            if message.get("digest") != key:
                return {"diverged": f"call {index + 1} of the reference"}
            self.pairs.append([index, self.committed])
            self.next += 1
            self.returned = False
            return {"value": value}
        return {"refused": "unknown message"}


def _wait_child(pid: int, read_fd: int, write_fd: int, gate: _TapeGate, deadline: float
                ) -> tuple[dict | None, int | None, bool]:
    """Serve the child's tape requests and read its result until EOF or ``deadline`` (extended by the time spent
    recording a tape); kill its process group on timeout."""
    buffer, result, timed_out = b"", None, False
    while True:
        left = deadline + gate.waited_s - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "result" in message:
                result = message["result"]
                continue
            reply = gate.answer(message)
            if reply is not None:
                try:
                    os.write(write_fd, (json.dumps(reply) + "\n").encode())  # values are small; pipes hold 1 MiB
                except OSError:
                    pass
    if timed_out:
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    _, status = os.waitpid(pid, 0)
    return result, status, timed_out


def _interpret(result: dict | None, status: int, timed_out: bool, timeout_s: float) -> dict:
    if timed_out:
        return {"status": "timeout", "message": f"the isolated re-check took longer than {timeout_s:g} s"}
    if isinstance(result, dict):
        return result
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return {"status": "timeout", "message": "the isolated re-check used up its CPU time"}
        if sig == signal.SIGKILL:
            return {"status": "out_of_memory", "message": "the isolated re-check was killed (out of memory?)"}
        return {"status": "recheck_error", "message": f"the isolated re-check crashed ({signal.Signals(sig).name})"}
    return {"status": "recheck_error", "message": f"the isolated re-check exited with code "
                                                  f"{os.WEXITSTATUS(status)} without a result"}


def handle(request: dict, batteries, config: dict, get_tape=None) -> dict:
    """Fork a child for one request and return its result (never raises for student behaviour).
    ``get_tape()`` returns the recorded ``[(digest, value)]`` of the function's reference, asked for only if the
    child's battery compares with the reference."""
    if request.get("function") not in batteries.checks:
        return {"status": "recheck_error", "message": f"no hidden battery for {request.get('function')!r}"}
    timeout_s = float(config["limits"]["timeout_s"])
    workdir = tempfile.mkdtemp(prefix="cd-recheck-")
    to_server, from_child = os.pipe()
    to_child_read, to_child = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(to_server)
        os.close(to_child)
        _run_child(request, batteries, config, workdir, from_child, to_child_read)
    os.close(from_child)
    os.close(to_child_read)
    gate = _TapeGate(get_tape or (lambda: ([], "no recorded values")))
    try:
        result, status, timed_out = _wait_child(pid, to_server, to_child, gate, started + timeout_s + 5.0)
    finally:
        os.close(to_server)
        os.close(to_child)
        shutil.rmtree(workdir, ignore_errors=True)
    result = _interpret(result, status, timed_out, timeout_s)
    result.setdefault("seconds", round(time.monotonic() - started, 3))
    if gate.entries is not None:  # the grader checks the committed answers against the values it recorded
        result.update(pairs=gate.pairs, recorded=len(gate.entries))
    return result


def serve(config: dict) -> None:
    """The server loop: preload, announce readiness, answer requests until stdin closes. A request line is
    ``{"function", "source", "dependencies"}``; while its child runs, the server may write ``{"need_tape": fn}``
    and then reads one line ``{"entries": [[digest, value], ...]}``; the request ends with the result line."""
    batteries, functions = _preload(config)
    out = sys.stdout
    stdin = sys.stdin.buffer
    out.write(json.dumps({"ready": True, "functions": functions}) + "\n")
    out.flush()

    def get_tape(function: str):
        out.write(json.dumps({"need_tape": function}) + "\n")
        out.flush()
        line = stdin.readline()
        answer = json.loads(line) if line else {"error": "the grader closed the connection"}
        return [tuple(e) for e in answer.get("entries", [])], answer.get("error")

    while True:
        line = stdin.readline()  # a binary buffered read: only this request is in memory when the child forks
        if not line:
            break
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            result = handle(request, batteries, config, lambda: get_tape(request.get("function")))
        except Exception as err:  # noqa: BLE001
            result = {"status": "recheck_error", "message": f"fork server error: {type(err).__name__}: {err}"}
        out.write(json.dumps(result) + "\n")
        out.flush()


# --- grader side -----------------------------------------------------------------------------------------

class RecheckClient:
    """Starts the fork server lazily (or eagerly with :meth:`start`) and sends it answer cells to re-check."""

    def __init__(self, source_dir: str | Path, check_modules: list[str], protected: list[str],
                 timeout_s: float, memory_bytes: int | None, threads: int, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 600.0,
                 tape_dir: str | Path | None = None, filters: bool = True):
        self.config = {"source_dir": str(Path(source_dir).resolve()), "check_modules": list(check_modules),
                       "imports": answer_imports(source_dir),
                       "protected": [str(Path(p).resolve()) for p in protected],
                       "limits": {"timeout_s": timeout_s, "memory_bytes": memory_bytes, "threads": threads}}
        config = KitConfig.from_environ()
        self.seed = DEFAULT_CHECK_SEED if config.check_seed is None else config.check_seed
        # the child draws the battery's inputs from the same seed as the grader's recorded run
        self.env = sanitized_env({**(env or {}), KitConfig.env_var("check_seed"): str(self.seed)})
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.functions: list[str] | None = None
        self.ready = False
        self.startup_error: str | None = None
        self._cwd = tempfile.mkdtemp(prefix="cd-forkserver-")
        self._cache: dict[tuple[str, str], Verdict] = {}  # batteries are seeded: same cell, same result
        self.tape_dir = tape_dir
        #: the static policy, restricted built-ins, audit hook and snapshot; False only in the tests that show the
        #: reference stays out of reach without them (Landlock, the tape protocol and the grader's own comparison
        #: of the committed answers stay on)
        self.filters = filters
        self._tapes: TapeStore | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the server process (it preloads in the background; :meth:`check` waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.forkserver", json.dumps(self.config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env,
                                     cwd=self._cwd, start_new_session=True)
        self.ready = False

    def _readline(self, timeout_s: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return None
                return json.loads(line)
            if self.proc.poll() is not None:
                return None
        return None

    def _ensure_ready(self) -> bool:
        self.start()
        if self.ready:
            return True
        hello = self._readline(self.startup_timeout_s)
        if not hello or not hello.get("ready"):
            self.startup_error = (f"the re-check server did not start (see {self.log_path})" if self.log_path
                                  else "the re-check server did not start")
            self.close()
            return False
        self.functions, self.ready = hello["functions"], True
        return True

    def has_battery(self, function: str) -> bool:
        """True when ``function`` has a hidden battery and a reference answer cell."""
        return (self._ensure_ready() and function in (self.functions or [])
                and function in source_functions(self.config["source_dir"]))

    def check(self, function: str, source: str) -> Verdict:
        """Re-check ``source`` as the answer cell of ``function`` (a result is remembered for identical cells;
        errors of the re-check itself are not); one restart of the server if it died."""
        key = (function, hashlib.sha256(source.encode()).hexdigest())
        if key not in self._cache:
            result = self._check(function, source)
            if result.status == Status.RECHECK_ERROR:
                return result
            self._cache[key] = result
        return self._cache[key]

    @functools.cached_property
    def batteries(self) -> Batteries:
        """The hidden batteries (loaded once, in the grader: the checks the tapes record and the dependencies a
        request carries)."""
        return load_batteries(self.config["check_modules"])

    def _store(self) -> TapeStore:
        if self._tapes is None:
            self._tapes = TapeStore(self.config["source_dir"], self.batteries.checks, self.batteries.depends,
                                    self.tape_dir, self.seed)
        return self._tapes

    def prepare(self) -> dict[str, float]:
        """Record (or load from ``tape_dir``) every function's tape now, before any kernel runs."""
        return self._store().record_all()

    def _tape(self, function: str) -> list[list[str]]:
        """The recorded values of ``function``'s reference on its battery (recorded here, in the grader)."""
        return [[e.digest, e.value] for e in self._store().get(function)]

    def _verified(self, function: str, reply: dict) -> Verdict:
        """The child's verdict, unless the answers it committed differ from the reference's recorded values: that
        comparison runs here, in the trusted grader, whatever happened in the child."""
        verdict = Verdict.from_json(reply)
        if verdict.status != Status.PASSED or "pairs" not in reply:
            return verdict
        tape = self._tape(function)
        pairs = reply["pairs"]
        if len(pairs) != len(tape) or [i for i, _ in pairs] != list(range(len(tape))):
            return Verdict(Status.FAILED, f"the battery compared {len(pairs)} of the {len(tape)} recorded values of the "
                                          "reference: the function interfered with the battery", verdict.seconds)
        for index, committed in pairs:
            if committed is None or not close_enough(decode(committed), decode(tape[index][1])):
                return Verdict(Status.FAILED, f"the value the function returned before recorded value {index + 1} "
                                              "differs from the reference's (checked by the grader)", verdict.seconds,
                               against_reference=function in self.batteries.kernel_blind)
        return verdict

    def _request(self, function: str, source: str) -> dict:
        depends = self._depends(function)
        return {"function": function, "source": source, "filters": self.filters,
                "dependencies": graded_sources(function, depends, self.config["source_dir"])}

    def _depends(self, function: str) -> tuple[str, ...]:
        return self.batteries.depends.get(function, ())

    def _check(self, function: str, source: str) -> Verdict:
        request = self._request(function, source)
        for attempt in range(2):
            if not self._ensure_ready():
                return Verdict(Status.RECHECK_ERROR, self.startup_error or "re-check server unavailable")
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                while True:
                    reply = self._readline(float(self.config["limits"]["timeout_s"]) + 60.0)
                    if reply is None or "need_tape" not in reply:
                        break
                    try:
                        answer = {"entries": self._tape(function)}
                    except Exception as err:  # noqa: BLE001 - the reference fails its own battery: a broken course
                        answer = {"entries": [], "error": f"recording the reference failed: {type(err).__name__}: "
                                                          f"{str(err)[:500]}"}
                    self.proc.stdin.write((json.dumps(answer) + "\n").encode())
                    self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                continue
            if reply is not None:
                return self._verified(function, reply)
            self.close()
        return Verdict(Status.RECHECK_ERROR, "the re-check server stopped responding")

    def close(self) -> None:
        """Stop the server (and anything it started)."""
        if self.proc is None:
            return
        from autograder.procs import kill_tree

        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        kill_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc, self.ready = None, False


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
