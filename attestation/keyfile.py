"""Secret key files: refused unless only this process's user can read them.

A key file that group or others may read (or write: they could swap the key) may already have leaked, so it is
refused at start rather than quietly tightened. The check runs on the opened file (fstat), not on the path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KeyFileError(PermissionError):
    """A secret key file whose owner or mode lets someone else read or replace it; the message says the fix."""


def _problems(st: os.stat_result) -> list[str]:
    problems = []
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        problems.append(f"its mode {mode:03o} lets group or others read or write it")
    if st.st_uid != os.geteuid():
        problems.append(f"it is owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()})")
    return problems


def check_private_file(path: Path, what: str) -> None:
    """Raise KeyFileError unless ``path`` is owned by this process's user with no group/other permissions."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _raise_if_loose(path, what, os.fstat(fd))
    finally:
        os.close(fd)


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret key file, after ``check_private_file``'s checks on the very file read."""
    with open(path, "rb") as fh:
        _raise_if_loose(path, what, os.fstat(fh.fileno()))
        return fh.read()


def _raise_if_loose(path: Path, what: str, st: os.stat_result) -> None:
    problems = _problems(st)
    if problems:
        raise KeyFileError(f"refusing {what} {path}: {' and '.join(problems)}; "
                           f"fix: chown $(id -u) {path} && chmod 600 {path}")
