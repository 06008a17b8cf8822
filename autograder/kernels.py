"""Pre-warmed grading kernels: fork each notebook's IPython kernel from a process that already imported the
course's heavy modules.

Every submission runs in its own kernel, and the notebooks' setup cells import torch, diffusers and the kit
(several seconds per kernel, most of a small submission's grading time). A worker therefore starts one
*kernel fork server* (``python -m autograder.kernels CONFIG``) that imports IPython/ipykernel and the modules
the source notebooks' setup cells import, without running anything else (no CUDA, no threads), and forks a
fresh kernel for each notebook. The child starts a new session, takes the environment and working directory
nbgrader asked for, re-seeds Python's and NumPy's generators, and runs ``ipykernel`` as
``python -m ipykernel_launcher`` would. Everything else is plain jupyter_client: :class:`ForkingKernelManager`
only swaps the process launch (a provisioner whose process is the forked pid); signals, interrupts, shutdown
and death detection work as for a normal kernel. If the server is unavailable, kernels start normally.
"""
from __future__ import annotations

import ast
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

__all__ = ["setup_imports", "launcher_args", "KernelForkClient", "ForkedProcess", "ForkingKernelManager", "set_fork_client"]

_client: KernelForkClient | None = None


def set_fork_client(client: KernelForkClient | None) -> None:
    """The fork server :class:`ForkingKernelManager` uses in this process (None: start kernels normally)."""
    global _client
    _client = client


def _setup_cell(cells: list[dict]) -> str | None:
    """The source of a notebook's kit setup cell: the first code cell that imports ``helpers`` (the Colab/Kaggle
    cell before it imports only the standard library), else the first code cell."""
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return next((s for s in sources if re.search(r"^\s*(from|import) helpers\b", s, re.M)),
                sources[0] if sources else None)


def setup_imports(source_dir: str | Path) -> list[str]:
    """Modules (and ``module:name`` attributes) imported by the kit setup cell of every source notebook."""
    found: list[str] = []
    for path in sorted(Path(source_dir).glob("*/*.ipynb")):
        source = _setup_cell(json.loads(path.read_text(encoding="utf-8")).get("cells", []))
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found += [f"{node.module}:{a.name}" for a in node.names if a.name != "*"] or [node.module]
                found.append(node.module)
    return list(dict.fromkeys(found))


# --- server ----------------------------------------------------------------------------------------------

def _preload(imports: list[str]) -> None:
    import importlib

    import ipykernel.kernelapp  # noqa: F401
    import ipykernel.ipkernel  # noqa: F401

    for item in imports:
        module, _, name = item.partition(":")
        try:
            mod = importlib.import_module(module)
            if name:
                getattr(mod, name, None)
        except Exception:  # noqa: BLE001 - the notebook will report it when it runs
            pass


def _reap(*_: Any) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(request: dict) -> None:
    """In the forked child: become a fresh kernel process; never returns."""
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]
        import random

        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = ["ipykernel_launcher", *request["args"]]
        from ipykernel.kernelapp import IPKernelApp

        IPKernelApp.launch_instance(argv=request["args"])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 0
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def serve(config: dict) -> None:
    """Preload, announce readiness, fork one kernel per request line until stdin closes."""
    _preload(config.get("imports", []))
    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


# --- client ------------------------------------------------------------------------------------------------

class KernelForkClient:
    """Grader-side handle of a kernel fork server."""

    def __init__(self, source_dir: str | Path, startup_timeout_s: float = 300.0, max_restarts: int = 3):
        self.config = {"imports": setup_imports(source_dir)}
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.starts_left = 1 + max_restarts  # a kernel may kill the server (it is the kernel's parent)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the server (it preloads in the background); :meth:`spawn` starts it if needed."""
        if self.proc is None and self.starts_left > 0:
            self.starts_left -= 1
            from autograder.forkserver import NO_FORK_POISON

            self.proc = subprocess.Popen([sys.executable, "-m", "autograder.kernels", json.dumps(self.config)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                         env={**os.environ, **NO_FORK_POISON})

    def _readline(self, timeout_s: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        return json.loads(line) if line else None

    def spawn(self, args: list[str], cwd: str, env: dict[str, str]) -> int | None:
        """Fork a kernel running ``ipykernel_launcher args`` in ``cwd`` with ``env``; None if unavailable (the
        server is restarted if it died, at most ``max_restarts`` times: a kernel can kill its parent)."""
        for _attempt in range(2):
            if self.proc is not None and self.proc.poll() is not None:
                self.close()
            self.start()
            if self.proc is None:
                return None
            try:
                return self._spawn(args, cwd, env)
            except (OSError, ValueError):
                self.close()
        return None

    def _spawn(self, args: list[str], cwd: str, env: dict[str, str]) -> int:
        assert self.proc is not None and self.proc.stdin is not None
        if not self.ready:
            hello = self._readline(self.startup_timeout_s)
            if not hello or not hello.get("ready"):
                raise OSError("the kernel fork server did not start")
            self.ready = True
        self.proc.stdin.write((json.dumps({"args": args, "cwd": cwd, "env": env}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._readline(30.0)
        if not reply:
            raise OSError("the kernel fork server did not answer")
        return int(reply["pid"])

    def kernels(self) -> list[int]:
        """The kernels the server forked that are still running."""
        from autograder.procs import children

        return children(self.proc.pid) if self.proc else []

    def close(self) -> None:
        if self.proc is None:
            return
        from autograder.procs import kill_tree

        kill_tree(self.proc.pid)
        self.proc, self.ready = None, False


class ForkedProcess:
    """The subset of ``subprocess.Popen`` that jupyter_client's provisioner uses, for a forked kernel pid
    (a child of the fork server, which reaps it)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    self.returncode = -signal.SIGKILL
            except (OSError, IndexError):
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def launcher_args(cmd: list[str]) -> list[str] | None:
    """The kernel's own arguments when ``cmd`` is ``python [-X...] -m ipykernel_launcher ARGS`` (the forms of
    ipykernel's kernelspecs: ``ipykernel install`` writes ``-Xfrozen_modules=off`` on Python >= 3.11), else
    None (such a kernel is started normally)."""
    if "-m" not in cmd[1:]:
        return None
    m = cmd.index("-m", 1)
    if cmd[m + 1:m + 2] != ["ipykernel_launcher"] or not all(a.startswith("-X") for a in cmd[1:m]):
        return None
    return cmd[m + 2:]


class ForkedProvisioner(LocalProvisioner):
    """LocalProvisioner whose kernel process is forked by the worker's kernel fork server."""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        args = launcher_args(cmd)
        pid = None
        if args is not None and _client is not None:
            env = dict(kwargs.get("env") or os.environ)
            pid = _client.spawn(args, str(kwargs.get("cwd") or os.getcwd()), env)
        if pid is None:
            return await super().launch_kernel(cmd, **kwargs)
        self.process = ForkedProcess(pid)  # type: ignore[assignment]
        self.pid = self.pgid = pid
        self.cwd = kwargs.get("cwd", os.getcwd())
        return self.connection_info


class ForkingKernelManager(AsyncKernelManager):
    """AsyncKernelManager that launches its kernel through :class:`ForkedProvisioner`."""

    async def _async_pre_start_kernel(self, **kw: Any):
        if self.provisioner is None:
            import uuid

            self.kernel_id = self.kernel_id or kw.pop("kernel_id", str(uuid.uuid4()))
            self.provisioner = ForkedProvisioner(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
        return await super()._async_pre_start_kernel(**kw)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
