"""rigshift.checkpoint: the marker format job code writes and the agent reads.

(The agent's uploads against real writer processes are in test_agent_checkpoints.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import client.checkpoint
from rigshift.checkpoint import MARKER, checkpoint_complete, directory_state, read_marker


def test_job_code_imports_the_shared_signal() -> None:
    assert client.checkpoint.checkpoint_complete is checkpoint_complete


def test_each_signal_names_the_files_and_counts_up(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"m" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "optim.pt").write_bytes(b"o" * 3)
    assert read_marker(tmp_path) is None
    assert checkpoint_complete(tmp_path) == 1
    counter, files = read_marker(tmp_path) or (0, ())
    assert counter == 1
    assert files == directory_state(tmp_path)
    assert [(path, size) for path, size, _, _ in files] == [("model.pt", 10), ("sub/optim.pt", 3)]
    assert checkpoint_complete(tmp_path) == 2
    body = json.loads((tmp_path / MARKER).read_text())
    assert body["counter"] == 2 and [f[0] for f in body["files"]] == ["model.pt", "sub/optim.pt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(f"{MARKER}.tmp")]


def test_a_file_replaced_by_rename_changes_the_state(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    before = directory_state(tmp_path)
    (tmp_path / "a.tmp").write_text("2")
    os.replace(tmp_path / "a.tmp", tmp_path / "a")
    assert directory_state(tmp_path) != before  # another inode


def test_an_unreadable_marker_is_no_marker(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text("{not json")
    assert read_marker(tmp_path) is None
    assert checkpoint_complete(tmp_path) == 1  # starts over
