"""Confine a process's file access with Linux Landlock (kernel 5.13+), by construction rather than by filter.

The isolated re-check child calls :func:`confine` before it runs a student's answer cell: from then on the
kernel itself refuses to open anything outside an allow-list of folders (Python, the libraries, the kit's
packages and model files, the system folders, the child's own temporary folder), and every *protected* folder
(the solutions, the graded source copy, the submissions, the grader's output and temporary folders) is left
out of it even when it lies inside an allowed one. Unlike the audit hook, no Python-level trick can undo it:
the rules hold for the process and everything it could start, and cannot be loosened once applied.

Where Landlock is missing (an old kernel, some containers), :func:`confine` returns ``False`` and the re-check
relies on its other layers; ``autograder/README.md`` says so.
"""
from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["abi_version", "allowed_roots", "confine", "SYSTEM_ROOTS"]

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # x86-64 and aarch64 alike
_PR_SET_NO_NEW_PRIVS = 38
_RULE_PATH_BENEATH = 1
_VERSION = 1  # LANDLOCK_CREATE_RULESET_VERSION

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 16, 32, 64, 128, 256
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM, REFER, TRUNCATE = 512, 1024, 2048, 4096, 8192, 16384

READ = EXECUTE | READ_FILE | READ_DIR
_WRITE_V1 = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO | \
    MAKE_BLOCK | MAKE_SYM

#: Folders every Python process may need to read (shared libraries, locale, devices, CPU/GPU information).
SYSTEM_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/dev", "/proc", "/sys",
                "/run/nvidia-persistenced", "/var/lib/nvidia")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi_version() -> int:
    """The kernel's Landlock ABI version (0 when Landlock is unavailable)."""
    try:
        version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION))
    except (AttributeError, OSError):
        return 0
    return max(0, int(version))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def allowed_roots(roots: Iterable[str | os.PathLike], protected: Iterable[str | os.PathLike]) -> list[str]:
    """The real folders and files of ``roots`` with every ``protected`` path cut out: a root inside a protected
    path is dropped, and a root that *contains* one is replaced by its entries other than the protected path's
    ancestors, recursively, so that nothing under a protected path stays reachable."""
    guarded = sorted({os.path.realpath(p) for p in protected})
    out: list[str] = []

    def add(path: str) -> None:
        if any(_inside(path, p) for p in guarded):
            return
        if not any(_inside(p, path) for p in guarded):
            out.append(path)
            return
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            return
        for name in entries:  # a folder holding a protected path: allow its other entries one by one
            add(os.path.join(path, name))

    for root in dict.fromkeys(os.path.realpath(r) for r in roots):
        if os.path.exists(root):
            add(root)
    return sorted(set(out))


def default_read_roots() -> list[str]:
    """What a re-check child reads: Python's prefixes, ``sys.path``, the folders of the loaded packages and the
    system folders."""
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, *SYSTEM_ROOTS]
    roots += [p for p in sys.path if p and os.path.isabs(p)]
    for module in list(sys.modules.values()):
        try:
            folders = list(getattr(module, "__path__", None) or ())
        except TypeError:  # e.g. torch's _ClassNamespace: not a package path
            continue
        roots += [f for f in folders if isinstance(f, str) and os.path.isabs(f)]
    return roots


def _add_rule(ruleset: int, path: str, access: int) -> None:
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        if not os.path.isdir(path):  # files take file rights only
            access &= EXECUTE | READ_FILE | WRITE_FILE | TRUNCATE
        attr = struct.pack("=Qi", access, fd)
        buf = ctypes.create_string_buffer(attr, len(attr))
        if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), buf,
                         ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def confine(read: Iterable[str | os.PathLike], write: Iterable[str | os.PathLike],
            protected: Iterable[str | os.PathLike]) -> bool:
    """Allow this process (and its future children) to read only under ``read`` and to write only under
    ``write``, never under ``protected``; return False (changing nothing) where Landlock is unavailable."""
    abi = abi_version()
    if abi < 1:
        return False
    write_rights = _WRITE_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    handled = READ | write_rights
    attr = struct.pack("=Q", handled)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _libc.syscall(_SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    protected = list(protected)
    try:
        writable = allowed_roots(write, protected)
        for path in allowed_roots(read, protected):
            _add_rule(ruleset, path, READ)
        for path in writable:
            _add_rule(ruleset, path, READ | write_rights)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if _libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return True


def probe(path: str | os.PathLike) -> bool:
    """True when ``path`` can be opened for reading now (used by the tests and the re-check's self-test)."""
    try:
        with open(Path(path), "rb"):
            return True
    except OSError:
        return False
