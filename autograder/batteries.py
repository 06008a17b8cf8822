"""The hidden batteries of a course, merged from their modules: ``CHECKS``, ``DEPENDS``, ``FORBIDDEN_NAMES`` and
``KERNEL_HAS_REFERENCE`` (the one reader of those module attributes; ``autograder/checks/__init__.py`` and the
re-check both use it)."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType

__all__ = ["Batteries", "collect", "load_batteries"]


@dataclass
class Batteries:
    """Hidden batteries of one or more check modules: ``checks[fn](student_fn, ref)`` raises AssertionError."""

    checks: dict[str, Callable] = field(default_factory=dict)
    depends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forbidden: dict[str, tuple[str, ...]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    #: functions whose tests cell, in the student's kernel, never compares with the reference (the kit's
    #: batteries under autograde): a wrong value first shows in the re-check, and is a plain ``failed`` there
    kernel_blind: set[str] = field(default_factory=set)


def collect(modules: Iterable[ModuleType]) -> Batteries:
    """Merge the batteries that ``modules`` define (later modules win on a repeated function name)."""
    out = Batteries()
    for mod in modules:
        out.modules.append(mod.__name__)
        out.checks.update(getattr(mod, "CHECKS", {}))
        out.depends.update({k: tuple(v) for k, v in getattr(mod, "DEPENDS", {}).items()})
        out.forbidden.update({k: tuple(v) for k, v in getattr(mod, "FORBIDDEN_NAMES", {}).items()})
        if not getattr(mod, "KERNEL_HAS_REFERENCE", True):
            out.kernel_blind.update(getattr(mod, "CHECKS", {}))
    return out


def load_batteries(names: Iterable[str]) -> Batteries:
    """Import the check modules (``autograder.checks`` by default) and merge their batteries."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as err:
            raise ImportError(f"Cannot import the check module {name!r} ({err}); pass an importable module "
                              "(on PYTHONPATH) that defines CHECKS = {function: check}.") from err
    return collect(modules)
