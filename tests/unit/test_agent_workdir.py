"""Working directories: verified downloads, safe extraction, the on-rig layout."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from rigshift.archive import ArchiveError, safe_extract
from worker_agent.workdir import Workspace, save_verified


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, target: str, *, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


async def chunks(data: bytes, size: int = 7):  # type: ignore[no-untyped-def]
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_save_verified_accepts_the_right_digest(tmp_path: Path) -> None:
    data = b"some archive bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "a" / f"{sha}.tar.gz"
    asyncio.run(save_verified(chunks(data), sha, dest, max_bytes=10_000))
    assert dest.read_bytes() == data
    assert not list(dest.parent.glob("*.part-*"))


@pytest.mark.parametrize(
    ("sha", "limit", "words"),
    [("0" * 64, 10_000, "digest mismatch"), (None, 10, "larger than")],
)
def test_save_verified_refuses(tmp_path: Path, sha: str | None, limit: int, words: str) -> None:
    data = b"x" * 100
    sha = sha or hashlib.sha256(data).hexdigest()
    dest = tmp_path / "out.tar.gz"
    with pytest.raises(ArchiveError, match=words):
        asyncio.run(save_verified(chunks(data), sha, dest, max_bytes=limit))
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_safe_extract(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(
        tar_gz(
            [
                (file("train.py"), b"print('hi')\n"),
                (file("data/x.csv"), b"1,2\n"),
                (link("data/y.csv", "x.csv"), b""),
            ]
        )
    )
    dest = tmp_path / "work"
    safe_extract(archive, dest)
    assert (dest / "train.py").read_text() == "print('hi')\n"
    assert (dest / "data" / "y.csv").read_text() == "1,2\n"


@pytest.mark.parametrize(
    "member",
    [
        file("/etc/evil"),
        file("../evil"),
        file("a/../../evil"),
        link("l", "/etc/passwd"),
        link("l", "../../outside"),
        link("h", "../outside", hard=True),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink-abs", "symlink-out", "hardlink-out"],
)
def test_safe_extract_refuses(tmp_path: Path, member: tarfile.TarInfo) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz([(member, b"x")]))
    dest = tmp_path / "work"
    with pytest.raises(ArchiveError):
        safe_extract(archive, dest)
    assert not any(dest.iterdir())
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_workspace_layout(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    work = ws.attempt_dir("jobs/j1", 2)
    (work / "junk").write_text("x")
    assert ws.attempt_dir("jobs/j1", 2) == work and not (work / "junk").exists()  # fresh
    ckpt = ws.checkpoint_dir("jobs/j1")
    (ckpt / "epoch-3.npz").write_text("w")
    ws.clean_attempt("jobs/j1", 2, succeeded=False)
    assert not work.exists() and (ckpt / "epoch-3.npz").exists()  # kept for the next attempt
    ws.clean_attempt("jobs/j1", 2, succeeded=True)
    assert not ckpt.exists()
    with pytest.raises(ValueError):
        ws.checkpoint_dir("jobs/..")


def test_input_cache_drops_the_least_recently_used_not_in_use(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for age, name in ((300, "a" * 64), (200, "b" * 64), (100, "c" * 64)):
        d = ws.input_cache(name)
        d.mkdir(parents=True)
        (d / "data").write_bytes(b"x" * 1000)
        os.chmod(d / "data", 0o444)
        os.chmod(d, 0o555)  # as the agent leaves them: read-only
        os.utime(d, (time.time() - age, time.time() - age))
    # Room for two: "a" is the oldest but in use, so "b" (the next oldest) goes.
    assert ws.evict_inputs(2000, in_use={"a" * 64}) == ["b" * 64]
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == ["a" * 64, "c" * 64]
    assert ws.evict_inputs(2000, in_use=set()) == []  # fits now
    assert ws.evict_inputs(0, in_use={"c" * 64}) == ["a" * 64]
