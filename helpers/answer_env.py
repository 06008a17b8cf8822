"""The names every answer cell may use without importing them.

Each notebook's setup cell runs ``from helpers.answer_env import *``; the autograder gives a student's
answer cell exactly these names when it re-runs the cell on its own. Keep the list short and stable.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm as _auto_tqdm

from helpers.config import KitConfig
from helpers.schedule import alpha_sigma, gather, timesteps_like


class tqdm(_auto_tqdm):  # noqa: N801 - tqdm's own name
    """``tqdm.auto.tqdm``; while nbgrader runs the notebook a text progress bar goes to stdout, since nbgrader
    fails a test cell that writes to stderr (on a host without ipywidgets tqdm.auto falls back to text).

    An edge of the settings (as the hidden batteries): answer cells call it with no config, in a kernel or the
    grader's re-check whose only input is the environment, so it reads ``NBGRADER_EXECUTION`` through
    :meth:`KitConfig.from_environ` when a bar is made (never at import: the grader's fork server imports this
    module before a kernel's environment is set)."""

    def __init__(self, *args, **kwargs):
        if KitConfig.from_environ().grading:
            kwargs.setdefault("file", sys.stdout)
        super().__init__(*args, **kwargs)

__all__ = ["math", "functools", "torch", "F", "tqdm", "gather", "alpha_sigma", "timesteps_like", "namespace"]


def namespace() -> dict:
    """A fresh globals dict holding the answer-cell names (what ``from helpers.answer_env import *`` gives)."""
    ns: dict = {"__name__": "__answers__", "__builtins__": __builtins__}
    ns.update({name: globals()[name] for name in __all__ if name != "namespace"})
    return ns
