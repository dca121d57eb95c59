"""The committed stubs in tidegate/v1 must be exactly what the .proto files generate."""

import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from gen_protos import generate  # noqa: E402


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh, "protoc produced nothing"
    committed = ROOT / "tidegate" / "v1"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale stubs, run `make protos`: {stale}"
    generated_names = {p.name for p in fresh}
    orphans = {p.name for p in committed.glob("*_pb2*.py*")} - generated_names
    assert not orphans, f"stubs without a .proto: {orphans}"
