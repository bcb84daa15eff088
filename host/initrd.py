"""A reproducible initramfs: a sorted newc cpio archive of a directory tree, gzip-compressed without a timestamp.

Byte-identical output from identical trees is what lets an operator rebuild the image and get the measurement
a policy pins. Everything that would differ between two builds of the same inputs is fixed here: entries are
sorted by path (so a directory always precedes what it holds), owners are root, modification times are the
build's ``SOURCE_DATE_EPOCH``, inode numbers count up from 1 in that order, permissions are normalised (0755
for directories and for files with any execute bit, 0644 for other files; the set-id bits are dropped), hard
links are stored as separate files, and gzip carries no name and mtime 0.

Only directories, regular files and symbolic links are taken from the tree; anything else (a device node, a
socket) is refused, so a build never copies the builder machine's devices. The archive may add character
devices by number (``/dev/console``, which the kernel opens for init's output before init has mounted devtmpfs).
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_FILE_MODE = stat.S_IFREG | 0o644
_EXEC_MODE = stat.S_IFREG | 0o755
_DIR_MODE = stat.S_IFDIR | 0o755
_LINK_MODE = stat.S_IFLNK | 0o777


class InitrdError(ValueError):
    """The tree cannot be archived reproducibly (an unsupported file type, a name that does not fit)."""


@dataclass(frozen=True)
class CharDevice:
    """A character device node to add to the archive (path relative to the root, e.g. ``dev/console``)."""

    path: str
    major: int
    minor: int
    mode: int = 0o600


def _header(*, ino: int, mode: int, mtime: int, size: int, name: bytes, rdev: tuple[int, int] = (0, 0),
            nlink: int = 1) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    if any(not 0 <= f <= 0xFFFFFFFF for f in fields):
        raise InitrdError(f"{name.decode(errors='replace')}: a header field does not fit newc's 32 bits")
    head = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\x00"
    return head + b"\x00" * (-len(head) % 4)


def _entries(root: Path) -> list[str]:
    """Every path under ``root`` (relative, '/'-separated), sorted bytewise: parents sort before children."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            found.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found, key=lambda p: p.encode("utf-8", "surrogateescape"))


def write_cpio(root: Path, out: BinaryIO, *, mtime: int, devices: Iterable[CharDevice] = ()) -> None:
    """Write ``root``'s tree (plus ``devices``) as a newc archive to ``out``."""
    extra = {d.path: d for d in devices}
    names = sorted(set(_entries(root)) | set(extra), key=lambda p: p.encode("utf-8", "surrogateescape"))
    for ino, rel in enumerate(names, start=1):
        name = rel.encode("utf-8", "surrogateescape")
        if rel in extra:
            dev = extra[rel]
            out.write(_header(ino=ino, mode=stat.S_IFCHR | (dev.mode & 0o777), mtime=mtime, size=0, name=name,
                              rdev=(dev.major, dev.minor)))
            continue
        path = root / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path).encode("utf-8", "surrogateescape")
            out.write(_header(ino=ino, mode=_LINK_MODE, mtime=mtime, size=len(target), name=name))
            out.write(target + b"\x00" * (-len(target) % 4))
        elif stat.S_ISDIR(st.st_mode):
            out.write(_header(ino=ino, mode=_DIR_MODE, mtime=mtime, size=0, name=name, nlink=2))
        elif stat.S_ISREG(st.st_mode):
            mode = _EXEC_MODE if st.st_mode & 0o111 else _FILE_MODE
            out.write(_header(ino=ino, mode=mode, mtime=mtime, size=st.st_size, name=name))
            with path.open("rb") as f:
                written = 0
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                    written += len(chunk)
            if written != st.st_size:
                raise InitrdError(f"{rel}: changed size while being archived")
            out.write(b"\x00" * (-written % 4))
        else:
            raise InitrdError(f"{rel}: not a directory, regular file or symbolic link; refusing to archive it")
    out.write(_header(ino=0, mode=0, mtime=0, size=0, name=TRAILER.encode(), nlink=1))


def write_initrd(root: Path, dest: Path, *, mtime: int, devices: Iterable[CharDevice] = (),
                 compresslevel: int = 6) -> None:
    """``root`` as a gzip-compressed newc archive at ``dest`` (no file name, mtime 0 in the gzip header)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with tmp.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                   compresslevel=compresslevel) as gz:
            write_cpio(root, gz, mtime=mtime, devices=devices)  # type: ignore[arg-type]
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into {path: (mode, content)} (content is the link target for symbolic links).

    For tests and for inspecting a built image; refuses anything but newc.
    """
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise InitrdError(f"offset {pos}: not a newc header")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode("utf-8", "surrogateescape")
        pos = name_start + namesize
        pos += -pos % 4
        if name == TRAILER:
            return entries
        entries[name] = (mode, data[pos:pos + size])
        pos += size
        pos += -pos % 4
