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
    """Import everything a child needs and build every reference namespace, before any fork."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import helpers.answer_env  # noqa: F401
    from autograder.reference import graded_namespace, reference_in, source_functions
    from autograder.sandbox import load_batteries

    batteries = load_batteries(config["check_modules"])
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
    functions = source_functions(config["source_dir"])
    for fn in batteries.checks:
        if fn in functions:
            graded_namespace(fn, batteries.depends.get(fn, ()), config["source_dir"])
            reference_in(fn, config["source_dir"])
    _warm_kit_reference(batteries)
    return batteries, [fn for fn in batteries.checks if fn in functions]


def _warm_kit_reference(batteries) -> None:
    """Fill autograder.reference's caches (a battery may call it) while files may still be read."""
    try:
        from autograder.checks import reference_globals
        from autograder.reference import reference
    except ImportError:
        return
    for fn in batteries.checks:
        try:
            reference(fn)
            reference_globals(fn)
        except Exception:  # noqa: BLE001 - a course variant's functions are not in the kit's table
            pass


def _writable_roots(workdir: str) -> list[str]:
    roots = [workdir]
    try:
        from huggingface_hub import constants

        roots.append(str(constants.HF_HUB_CACHE))  # lock files when a battery loads a cached model
    except ImportError:
        pass
    return roots


def _run_child(request: dict, batteries, config: dict, workdir: str, write_fd: int) -> None:
    """In the forked child: run the re-check and write its JSON result to ``write_fd``; never returns."""
    code = 0
    try:
        os.setpgrp()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        from autograder.sandbox import Limits, recheck_in_child

        limits = Limits(**config["limits"])
        result = recheck_in_child(request, batteries, config["source_dir"], config["protected"], limits, workdir,
                                  _writable_roots(workdir)[1:])
    except BaseException as err:  # noqa: BLE001
        result = {"status": "recheck_error", "message": f"the re-check itself failed: {type(err).__name__}: {err}"}
        code = 1
    try:
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(code)


def _wait_child(pid: int, read_fd: int, deadline: float) -> tuple[bytes, int | None, bool]:
    """Read the child's result until EOF or ``deadline``; kill its process group on timeout."""
    data, timed_out = b"", False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    if timed_out:
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    _, status = os.waitpid(pid, 0)
    return data, status, timed_out


def _interpret(data: bytes, status: int, timed_out: bool, timeout_s: float) -> dict:
    if timed_out:
        return {"status": "timeout", "message": f"the isolated re-check took longer than {timeout_s:g} s"}
    if data:
        try:
            return json.loads(data)
        except ValueError:
            pass
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return {"status": "timeout", "message": "the isolated re-check used up its CPU time"}
        if sig == signal.SIGKILL:
            return {"status": "out_of_memory", "message": "the isolated re-check was killed (out of memory?)"}
        return {"status": "recheck_error", "message": f"the isolated re-check crashed ({signal.Signals(sig).name})"}
    return {"status": "recheck_error", "message": f"the isolated re-check exited with code "
                                                  f"{os.WEXITSTATUS(status)} without a result"}


def handle(request: dict, batteries, config: dict) -> dict:
    """Fork a child for one request and return its result (never raises for student behaviour)."""
    if request.get("function") not in batteries.checks:
        return {"status": "recheck_error", "message": f"no hidden battery for {request.get('function')!r}"}
    timeout_s = float(config["limits"]["timeout_s"])
    workdir = tempfile.mkdtemp(prefix="cd-recheck-")
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_child(request, batteries, config, workdir, write_fd)
    os.close(write_fd)
    try:
        data, status, timed_out = _wait_child(pid, read_fd, started + timeout_s + 5.0)
    finally:
        os.close(read_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    result = _interpret(data, status, timed_out, timeout_s)
    result.setdefault("seconds", round(time.monotonic() - started, 3))
    return result


def serve(config: dict) -> None:
    """The server loop: preload, announce readiness, answer requests until stdin closes."""
    batteries, functions = _preload(config)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "functions": functions}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = handle(json.loads(line), batteries, config)
        except Exception as err:  # noqa: BLE001
            result = {"status": "recheck_error", "message": f"fork server error: {type(err).__name__}: {err}"}
        out.write(json.dumps(result) + "\n")
        out.flush()


# --- grader side -----------------------------------------------------------------------------------------

class RecheckClient:
    """Starts the fork server lazily (or eagerly with :meth:`start`) and sends it answer cells to re-check."""

    def __init__(self, source_dir: str | Path, check_modules: list[str], protected: list[str],
                 timeout_s: float, memory_bytes: int | None, threads: int, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 600.0):
        self.config = {"source_dir": str(Path(source_dir).resolve()), "check_modules": list(check_modules),
                       "protected": [str(Path(p).resolve()) for p in protected],
                       "limits": {"timeout_s": timeout_s, "memory_bytes": memory_bytes, "threads": threads}}
        self.env = sanitized_env(env)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.functions: list[str] | None = None
        self.ready = False
        self.startup_error: str | None = None
        self._cwd = tempfile.mkdtemp(prefix="cd-forkserver-")
        self._cache: dict[tuple[str, str], dict] = {}  # batteries are seeded: same cell, same result

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
        return self._ensure_ready() and function in (self.functions or [])

    def check(self, function: str, source: str) -> dict:
        """Re-check ``source`` as the answer cell of ``function`` (a result is remembered for identical cells;
        errors of the re-check itself are not); one restart of the server if it died."""
        key = (function, hashlib.sha256(source.encode()).hexdigest())
        if key not in self._cache:
            result = self._check(function, source)
            if result.get("status") in ("recheck_error",):
                return result
            self._cache[key] = result
        return dict(self._cache[key])

    def _check(self, function: str, source: str) -> dict:
        for attempt in range(2):
            if not self._ensure_ready():
                return {"status": "recheck_error", "message": self.startup_error or "re-check server unavailable"}
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps({"function": function, "source": source}) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                continue
            result = self._readline(float(self.config["limits"]["timeout_s"]) + 60.0)
            if result is not None:
                return result
            self.close()
        return {"status": "recheck_error", "message": "the re-check server stopped responding"}

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
