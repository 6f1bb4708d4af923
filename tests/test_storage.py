"""Output writes are atomic: an interrupted write leaves no complete-looking file."""

import pyarrow as pa
import pytest

from gradmm_ray.io.storage import OutputDir


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """If the final move never happens (a crash mid-write), the target does not exist and the
    hidden temporary is not listed as a result."""
    out = OutputDir(str(tmp_path / "out"))

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and move")

    monkeypatch.setattr(out, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        out.write_parquet("solves/part-1.parquet", pa.table({"x": [1, 2]}))
    assert not out.exists("solves/part-1.parquet")
    assert out.list("solves", ".parquet") == []
    leftovers = list((tmp_path / "out" / "solves").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)


def test_write_then_read_back(tmp_path):
    """Parquet, JSON and bytes round-trip; list sees only finished files, sorted."""
    out = OutputDir(str(tmp_path / "out"))
    out.write_parquet("solves/b.parquet", pa.table({"x": [1]}))
    out.write_parquet("solves/a.parquet", pa.table({"x": [2]}))
    out.write_json("run.json", {"k": [1, 2]})
    assert out.list("solves", ".parquet") == ["solves/a.parquet", "solves/b.parquet"]
    assert out.read_parquet("solves/b.parquet").column("x").to_pylist() == [1]
    assert out.read_json("run.json") == {"k": [1, 2]}
    assert not out.is_empty()
