"""Shared fixtures: kit settings for tests (:class:`helpers.config.KitConfig`).

Functions of the kit take their settings as a ``KitConfig`` argument, so most tests build one with
``make_config(**fields)``. Tests of an edge that reads the environment itself (``KitConfig.from_environ``, a
spawned kernel, the answer cells' ``tqdm``, the hidden batteries' seed) set the variables with
``kit_environ(config)`` instead of hand-written ``monkeypatch.setenv("CD_KIT_...")`` calls.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from helpers.config import KitConfig, setting_fields


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-mutants", action="store_true",
                     help="tests/test_autograder_mutants.py: grade every mutant end to end, not one per kind and function")


@pytest.fixture
def make_config(tmp_path) -> Callable[..., KitConfig]:
    """``make_config(**fields)``: a :class:`KitConfig` with the defaults and ``fields``; its output folder is
    ``tmp_path / "out"`` unless ``out`` is given, so that no test writes into the kit's ``out/``."""
    def make(**fields: Any) -> KitConfig:
        fields.setdefault("out", str(tmp_path / "out"))
        return KitConfig(**fields)

    return make


@pytest.fixture
def kit_config(make_config) -> KitConfig:
    """The default settings (interactive run), writing under ``tmp_path / "out"``."""
    return make_config()


@pytest.fixture
def kit_environ(monkeypatch) -> Callable[[KitConfig], KitConfig]:
    """``kit_environ(config)``: make ``os.environ`` carry exactly ``config``'s settings (every other kit
    variable removed) for the rest of the test; returns the config. For code that reads the environment at an
    edge, and for child processes that inherit it."""
    def apply(config: KitConfig) -> KitConfig:
        for f in setting_fields():
            monkeypatch.delenv(f.metadata["env"], raising=False)
        for name, value in config.to_environ().items():
            monkeypatch.setenv(name, value)
        return config

    return apply
