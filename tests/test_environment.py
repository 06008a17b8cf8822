"""environment.yml is a thin wrapper around pyproject.toml and constraints.txt: one list of dependencies, one lock."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_environment_yml_parses_with_conda_forge_and_python_311():
    env = _env()
    assert env["channels"] == ["conda-forge", "nodefaults"]
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_sections = [d for d in deps if isinstance(d, dict)]
    assert len(pip_sections) == 1 and list(pip_sections[0]) == ["pip"]


def test_pip_section_installs_exactly_the_project():
    pip = [d for d in _env()["dependencies"] if isinstance(d, dict)][0]["pip"]
    # Only the project itself, under the lock: its dependencies come from pyproject.toml, so they are declared once,
    # and their exact versions from constraints.txt, as `make venv` installs them.
    assert pip == ["-e .[all]", "-c constraints.txt"], pip


def test_pip_section_resolves_to_pyproject_dependencies(tmp_path):
    """What the pip section installs (the project) requires exactly pyproject's dependency list."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from importlib.metadata import requires

    def norm(reqs):  # name and specifier set: metadata may order a range's clauses differently from pyproject
        return sorted((r.name.lower(), str(r.specifier)) for r in map(Requirement, reqs) if r.marker is None)

    installed = norm(requires("cd-course-kit") or [])  # extras' requirements carry an `extra == ...` marker
    declared = norm(project["dependencies"])
    assert installed == declared, (
        'the installed kit is stale: run `make venv` (pip install -e ".[all]" -c constraints.txt) again')


def test_torch_pinned_exactly_in_the_lock_and_as_a_range_in_pyproject():
    """pyproject.toml gives a range (the GPU host has torch 2.11); the lock pins the exact CPU-tested version,
    which is what keeps pip from pulling a newer multi-GB CUDA build when it installs with the lock."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if re.match(r"torch\b(?![-\w])", d)] == ["torch>=2.11"]
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    assert [line for line in lock if line.startswith("torch==")] == ["torch==2.13.0"]


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
