"""Start JupyterLab for a student: ``python -m helpers.commands.lab [student] [--port N] [--model M] [--no-browser]``.

What it sets up before JupyterLab starts (nothing here is grading code):

* the notebook kernel ``python3`` (the kernel name every course notebook uses) resolves to *this*
  Python environment, even when the user has another ``python3`` kernel of their own: a kernelspec
  pointing at ``sys.executable`` is put first on ``JUPYTER_PATH`` for the server, its kernels and
  nbgrader's validate;
* ``helpers`` is importable in the kernel (the kit root is put on ``PYTHONPATH``), and the model
  setting (``--model`` or ``CD_KIT_MODEL``) is passed on to the kernel, whose setup cell prints it;
* the released notebooks that have no outputs are trusted (signed), so they open without warnings;
* the server listens on 127.0.0.1 only, with a token; the URL with its token is printed.

nbgrader's student tools (the notebook toolbar's *Validate* button) come with nbgrader's lab extension;
the instructor-only parts of that extension (formgrader, create assignment, course list) are switched
off in the student's JupyterLab. The instructor's command is ``python -m autograder.lab``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.sign import NotebookNotary

from helpers.config import KitConfig
from helpers.device import cpu_threads_env
from helpers.course import KIT_ROOT
from helpers.models import resolve_model

__all__ = ["LabSetup", "KERNEL_NAME", "KERNEL_DISPLAY_NAME", "write_kernelspec", "write_student_config",
           "trust_notebooks", "find_free_port", "make_setup", "lab_environment", "lab_argv", "lab_url", "start_lab",
           "main"]

KERNEL_NAME = "python3"  # the kernelspec name in every course notebook (nbgrader needs this exact name)
KERNEL_DISPLAY_NAME = "Python 3"  # what the course notebooks carry (solutions/ and notebooks/)
HOST = "127.0.0.1"
DEFAULT_PORT = 8888
QUIET_LAB_PLUGINS = ("@jupyterlab/apputils-extension:announcements",)  # news pop-up; fetches from the web
STUDENT_DISABLED_LAB_PLUGINS = QUIET_LAB_PLUGINS + (  # nbgrader's instructor tools, hidden from students
    "@jupyter/nbgrader:formgrader",
    "@jupyter/nbgrader:create-assignment",
    "@jupyter/nbgrader:course-list",
    "@jupyter/nbgrader:assignment-list",
    "@jupyter/nbgrader:menu",  # would be empty: its items are the tools above
)
STUDENT_DISABLED_SERVER_EXTENSIONS = (
    "nbgrader.server_extensions.formgrader",
    "nbgrader.server_extensions.course_list",
    "nbgrader.server_extensions.assignment_list",
)


@dataclass(frozen=True)
class LabSetup:
    """Everything a JupyterLab start needs: what to serve, where, and the generated Jupyter folders."""

    root_dir: Path  # the folder JupyterLab shows
    port: int
    token: str
    runtime: Path  # generated Jupyter data/config folders (kernelspec, page config)
    model: str | None
    cwd: Path = KIT_ROOT  # nbgrader (validate, formgrader) reads nbgrader_config.py from here


def write_kernelspec(data_dir: Path, python: str = sys.executable) -> Path:
    """Write a ``python3`` kernelspec running ``python`` into ``data_dir/kernels``; return its folder.

    Its display name is the one the course notebooks carry: a different name would be
    written into every notebook the student opens (and mark it modified on opening).
    """
    folder = Path(data_dir) / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL_DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return folder


def write_student_config(config_dir: Path) -> None:
    """Jupyter config that hides nbgrader's instructor tools (lab plugins and server extensions)."""
    (Path(config_dir) / "labconfig").mkdir(parents=True, exist_ok=True)
    page = {"disabledExtensions": {name: True for name in STUDENT_DISABLED_LAB_PLUGINS}}
    (Path(config_dir) / "labconfig" / "page_config.json").write_text(json.dumps(page, indent=1))
    server = {"ServerApp": {"jpserver_extensions": {name: False for name in STUDENT_DISABLED_SERVER_EXTENSIONS}}}
    (Path(config_dir) / "jupyter_server_config.json").write_text(json.dumps(server, indent=1))


def _notebooks(folder: Path) -> Iterator[Path]:
    for path in sorted(Path(folder).rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in path.parts:
            yield path


def trust_notebooks(folder: str | Path) -> list[Path]:
    """Sign (trust) every notebook under ``folder`` that has no outputs; return the ones signed.

    A notebook without outputs has nothing that runs on opening, so trusting it is safe; notebooks with
    outputs are left as they are (the server signs a student's own notebooks when they are saved).
    """
    notary = NotebookNotary()
    signed: list[Path] = []
    for path in _notebooks(Path(folder)):
        nb = nbformat.read(path, as_version=4)
        if any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"):
            continue
        if not notary.check_signature(nb):
            notary.sign(nb)
        signed.append(path)
    return signed


def find_free_port(start: int = DEFAULT_PORT, tries: int = 50, host: str = HOST) -> int:
    """The first port from ``start`` on which ``host`` can listen."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"No free port in {start}..{start + tries - 1}: pass --port with a free one.")


def _prepend_path(var: str, folder: Path, env: dict[str, str]) -> None:
    env[var] = os.pathsep.join([str(folder)] + [p for p in env.get(var, "").split(os.pathsep) if p])


def lab_environment(setup: LabSetup, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment JupyterLab runs in (its kernels and nbgrader's validate inherit it)."""
    env = cpu_threads_env(dict(os.environ if base is None else base))  # its kernels: one thread on a loaded machine
    _prepend_path("JUPYTER_PATH", setup.runtime / "data", env)
    _prepend_path("JUPYTER_CONFIG_PATH", setup.runtime / "config", env)
    _prepend_path("PYTHONPATH", KIT_ROOT, env)
    _prepend_path("PATH", Path(sys.executable).parent, env)  # nbgrader runs `alembic` and `jupyter` from PATH
    env["JUPYTER_TOKEN"] = setup.token  # not on the command line, where other users could read it
    env.pop("MPLBACKEND", None)  # e.g. Agg from a headless shell: notebooks show figures inline (ipykernel's default)
    if setup.model:
        env["CD_KIT_MODEL"] = setup.model
    return env


def lab_argv(setup: LabSetup, open_browser: bool) -> list[str]:
    """JupyterLab's command-line options: localhost only, this port exactly, this folder, no extension
    manager (it would query PyPI, and students need none)."""
    argv = [
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={setup.port}",
        "--ServerApp.port_retries=0",  # the printed URL must be the real one
        f"--ServerApp.root_dir={setup.root_dir}",
        f"--ServerApp.open_browser={open_browser}",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI often run as root
        argv.append("--ServerApp.allow_root=True")
    return argv


def lab_url(setup: LabSetup, path: str = "lab", query: str = "") -> str:
    """The URL (with its token) of ``path`` on the server."""
    extra = f"&{query}" if query else ""
    return f"http://{HOST}:{setup.port}/{path}?token={setup.token}{extra}"


def start_lab(setup: LabSetup, open_browser: bool, banner: list[str]) -> int:
    """Print ``banner`` and run JupyterLab in this process until it is stopped (Ctrl+C)."""
    env = lab_environment(setup)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(setup.cwd)
    print("\n".join(banner), flush=True)
    # lazy: only starting the server needs Jupyter's server stack (heavy), and it then loads under the
    # environment set just above
    from jupyterlab.labapp import LabApp

    LabApp.launch_instance(argv=lab_argv(setup, open_browser))
    return 0


def _describe_model(model: str | None) -> str:
    try:
        spec = resolve_model(model)
    except (FileNotFoundError, OSError, ValueError) as err:
        return f"{model or 'small'} (WARNING: {err})"
    return f"{spec.setting} -> {spec.source}"


def make_setup(root_dir: Path, runtime: Path, port: int | None, token: str | None, model: str | None,
               cwd: Path = KIT_ROOT) -> LabSetup:
    """Generate the kernelspec under ``runtime`` and choose port and token (given ones win; the token
    otherwise from ``$JUPYTER_TOKEN``, which is Jupyter's variable, not a kit setting). ``model``: the
    setting passed on to the kernels (None: they inherit the environment's)."""
    write_kernelspec(runtime / "data")
    (runtime / "config").mkdir(parents=True, exist_ok=True)
    token = token or os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    return LabSetup(Path(root_dir).resolve(), port or find_free_port(), token, runtime, model, cwd)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers.commands.lab", description="Start JupyterLab for a student "
                                "on the course notebooks (localhost only; prints the URL with its token).")
    p.add_argument("role", nargs="?", default="student", choices=["student"],
                   help="only 'student' here; instructors use `python -m autograder.lab`")
    p.add_argument("--notebooks", type=Path, default=KIT_ROOT / "notebooks",
                   help="folder of the assignment notebooks (default: the kit's notebooks/)")
    p.add_argument("--port", type=int, default=None, help=f"port (default: first free from {DEFAULT_PORT})")
    p.add_argument("--model", default=None, help="model setting for the notebooks (default: $CD_KIT_MODEL or small)")
    p.add_argument("--token", default=None, help="access token (default: $JUPYTER_TOKEN or a random one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = KitConfig.from_environ()  # the kit's settings, read once here
    notebooks = args.notebooks.resolve()
    if not any(notebooks.glob("*/*.ipynb")):
        print(f"No assignment notebooks under {notebooks}. Generate them with `python -m autograder release`, "
              "or pass --notebooks with the folder that holds your assignment folders.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cd-kit-lab-") as tmp:
        setup = make_setup(notebooks, Path(tmp), args.port, args.token, args.model or config.model)
        write_student_config(setup.runtime / "config")
        return start_lab(setup, not args.no_browser, _student_banner(setup, len(trust_notebooks(notebooks))))


def _student_banner(setup: LabSetup, n_trusted: int) -> list[str]:
    return [
        "Course kit: student JupyterLab",
        f"  notebooks : {setup.root_dir} ({n_trusted} trusted)",
        f"  model     : {_describe_model(setup.model)} (set with --model or CD_KIT_MODEL)",
        f"  kernel    : {KERNEL_NAME} -> {sys.executable}",
        f"  open      : {lab_url(setup)}",
        "  stop      : Ctrl+C",
    ]


if __name__ == "__main__":
    sys.exit(main())
