"""host.initrd: the same tree gives the same bytes whatever the builder's clock, umask or owners; any change
of content, name or command shows; the archive is one the kernel unpacks (checked with GNU cpio too)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from host.initrd import CharDevice, InitrdError, read_cpio, write_cpio, write_initrd


def make_tree(root: Path, *, mode: int = 0o644, mtime: int = 1_000_000) -> Path:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "usr" / "lib-data").mkdir()
    (root / "usr" / "lib-data" / "x.txt").write_bytes(b"x" * 1001)
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_bytes(b"key: value\n")
    (root / "etc" / "conf").chmod(mode)
    (root / "bin").symlink_to("usr/bin")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (mtime, mtime), follow_symlinks=False)
    return root


def archive(root: Path, **kw) -> bytes:
    out = io.BytesIO()
    write_cpio(root, out, mtime=1_735_689_600, **kw)
    return out.getvalue()


def test_same_tree_same_bytes_whatever_times_and_modes(tmp_path: Path) -> None:
    a = archive(make_tree(tmp_path / "a", mode=0o644, mtime=1))
    b = archive(make_tree(tmp_path / "b", mode=0o664, mtime=2_000_000_000))  # another umask, another clock
    assert a == b
    entries = read_cpio(a)
    assert list(entries) == sorted(entries, key=str.encode)          # sorted: a directory precedes its contents
    assert list(entries).index("usr") < list(entries).index("usr/bin") < list(entries).index("usr/bin/tool")
    assert entries["usr/bin/tool"] == (0o100755, b"#!/bin/sh\necho hi\n")
    assert entries["etc/conf"][0] == 0o100644
    assert entries["bin"] == (0o120777, b"usr/bin")
    assert entries["usr"][0] == 0o040755


def test_every_change_shows(tmp_path: Path) -> None:
    base = archive(make_tree(tmp_path / "base"))
    variants = []
    for i, change in enumerate((
        lambda r: (r / "etc" / "conf").write_bytes(b"key: valuf\n"),         # one byte of a file
        lambda r: (r / "etc" / "conf").rename(r / "etc" / "conf2"),           # a name
        lambda r: (r / "etc" / "conf").chmod(0o755),                          # made executable
        lambda r: (r / "etc" / "new").write_bytes(b""),                       # an added empty file
    )):
        root = make_tree(tmp_path / f"v{i}")
        change(root)
        variants.append(archive(root))
    assert len({base, *variants}) == 1 + len(variants)


def test_devices_are_added_by_number_and_special_files_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    entries = read_cpio(archive(root, devices=[CharDevice("dev/console", 5, 1)]))
    assert entries["dev/console"][0] == 0o020600
    os.mkfifo(root / "etc" / "pipe")
    with pytest.raises(InitrdError, match="etc/pipe: not a directory, regular file or symbolic link"):
        archive(root)


def test_gzip_has_no_name_or_time_and_gnu_cpio_reads_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    first, second = tmp_path / "one.img", tmp_path / "two.img"
    write_initrd(root, first, mtime=1_735_689_600)
    os.utime(root / "etc" / "conf", (5, 5))
    write_initrd(root, second, mtime=1_735_689_600)
    data = first.read_bytes()
    assert data == second.read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\x00\x00\x00\x00"   # FLG 0 (no name), MTIME 0
    assert shutil.which("cpio"), "GNU cpio missing: apt-get install cpio"
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=gzip.decompress(data), capture_output=True,
                             check=True).stdout.decode()
    assert "usr/bin/tool" in listing and "-> usr/bin" in listing
    assert all(" root " in line or " 0 " in line for line in listing.splitlines())
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=gzip.decompress(data), cwd=unpacked, check=True)
    assert (unpacked / "etc" / "conf").read_bytes() == b"key: value\n"
    assert (unpacked / "etc" / "conf").stat().st_mtime == 1_735_689_600
