"""Process housekeeping on Linux: find and end every process a graded submission left behind.

A student's kernel can start processes that outlive it (a double fork, a daemon). The grader makes itself
a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): orphans then become its children instead of
init's, so after each submission it can list its children and end the ones it did not start itself.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

__all__ = ["become_subreaper", "children", "descendants", "kill_tree", "kill_new_children"]

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop(0)
        if child not in out:
            out.append(child)
            todo += children(child)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, timeout_s: float = 2.0) -> None:
    """Collect ``pid`` if it is our child (after SIGKILL it dies promptly; wait up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def kill_tree(pid: int, grace_s: float = 0.0) -> None:
    """End ``pid`` and all its descendants (SIGTERM then, after ``grace_s``, SIGKILL); reap our children."""
    tree = [pid] + descendants(pid)
    if grace_s > 0:
        for p in tree:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
            time.sleep(0.05)
        tree += [d for p in list(tree) for d in descendants(p) if d not in tree]
    for p in tree:
        _signal(p, signal.SIGKILL)
    for p in tree:
        _reap(p)


def kill_new_children(keep: set[int]) -> list[int]:
    """End every child of this process (and its descendants) whose pid is not in ``keep``; return them."""
    ended = [c for c in children(os.getpid()) if c not in keep]
    for c in ended:
        kill_tree(c)
    return ended
