"""Free space: the check before the run counts the index, the config, the manifest and each file's filesystem
blocks; a disk that fills while the manifest is written keeps the finished shards."""

from __future__ import annotations

from fp8q import QuantizeOptions, quantize
from tests.support.runs import _cli, _refused, _source


def test_free_space_check_counts_index_config_and_manifest(tmp_path, monkeypatch):
    import shutil

    from fp8q import plan_conversion

    src = _source(tmp_path / "src")
    plan = plan_conversion(src, QuantizeOptions())
    side = sum((src / f).stat().st_size for f in plan.checkpoint.side_files)
    just_shards = plan.bytes_out + side + 10  # room for the shards and side files, not for the rest
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, just_shards))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "are free on that disk")


def test_free_space_is_counted_in_filesystem_blocks(tmp_path, monkeypatch):
    import shutil

    from fp8q import plan_conversion

    src = _source(tmp_path / "src")
    for i in range(1000):
        (src / f"vocab-{i}.txt").write_text("x")  # 1 byte each, a 4 KiB block each on disk
    plan = plan_conversion(src, QuantizeOptions())
    side = sum((src / f).stat().st_size for f in plan.checkpoint.side_files)
    # Room for every byte, the index, config and manifest, but not for a thousand files' blocks.
    free = plan.bytes_out + side + 1_000_000
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, free))
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), "are free on that disk")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_disk_full_writing_the_manifest_keeps_finished_shards(tmp_path, monkeypatch):
    import errno

    import fp8q.output.manifest as manifest

    src = _source(tmp_path / "src")
    real = manifest.atomic_write_json

    def full(path, data):
        if path.name == "fp8q.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(manifest, "atomic_write_json", full)
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 1 and len(lines) == 1 and "disk full" in lines[0] and "--resume" in lines[0], lines
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(manifest, "atomic_write_json", real)
    assert quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True)).resumed_shards == 2
