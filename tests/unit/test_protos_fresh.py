"""The committed generated code matches protos/: run `make proto` after editing a .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path):
    written = _gen_module().generate(tmp_path)
    assert written, "no .proto files found"
    stale = []
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"stale generated code (run `make proto`): {stale}"
    on_disk = {p.relative_to(ROOT) for p in (ROOT / "rigshift" / "v1").glob("*_pb2*.py*")}
    assert on_disk == {p.relative_to(tmp_path) for p in written}, "generated files without a proto"


def test_every_message_and_field_has_a_comment():
    """STYLE.md 4: a comment on every message, field, enum value, service and RPC."""
    missing = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            declares = s.startswith(("message ", "enum ", "service ", "rpc ", "oneof ")) or (
                s.endswith(";") and "=" in s and not s.startswith(("option", "syntax", "//"))
            )
            if declares and not lines[i - 1].strip().startswith("//"):
                missing.append(f"{proto.name}:{i + 1}: {s}")
    assert not missing, "\n".join(missing)
