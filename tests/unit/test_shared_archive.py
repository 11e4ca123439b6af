"""rigshift.archive: the one archive format the client uploads and the agent packs and unpacks.

(The refusals of unsafe members are in test_agent_workdir.py, where the agent extracts.)
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from rigshift.archive import ArchiveError, pack_directory, safe_extract


def _tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text("print('hi')\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 64)
    (root / "empty").mkdir()
    (root / "link").symlink_to("src/train.py")


def test_the_same_tree_packs_to_the_same_bytes(tmp_path: Path) -> None:
    """Whoever packs it, whenever: the broker stores an unchanged directory once (by sha256)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a)
    _tree(b)
    os.utime(b / "data.bin", (1, 1))  # other mtimes, other creation order
    first = pack_directory(a, max_bytes=1 << 20)
    assert pack_directory(b, max_bytes=1 << 20) == first
    assert (
        hashlib.sha256(first).hexdigest()
        == hashlib.sha256(pack_directory(a, max_bytes=1 << 20)).hexdigest()
    )
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "data.bin",
        "empty",
        "link",
        "src",
        "src/train.py",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_a_packed_tree_extracts_to_itself(tmp_path: Path) -> None:
    src, dest = tmp_path / "src-tree", tmp_path / "out"
    _tree(src)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(pack_directory(src, max_bytes=1 << 20))
    safe_extract(archive, dest)
    assert (dest / "src" / "train.py").read_text() == "print('hi')\n"
    assert (dest / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    assert (dest / "empty").is_dir()
    assert os.readlink(dest / "link") == "src/train.py"


def test_past_the_limit_is_an_archive_error(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    with pytest.raises(ArchiveError, match="packs to more than 100 bytes"):
        pack_directory(tmp_path / "t", max_bytes=100)


def test_fifos_are_left_out_as_extraction_would_refuse_them(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f.txt").write_text("x")
    os.mkfifo(root / "pipe")
    with tarfile.open(fileobj=io.BytesIO(pack_directory(root, max_bytes=1 << 20))) as tar:
        assert tar.getnames() == ["f.txt"]
