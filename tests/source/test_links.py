"""Links in the source: none is followed out of the checkpoint folder; a Hub cache snapshot's links into its repo
are."""

from __future__ import annotations

import hashlib
import os

import pytest

from fp8q import QuantizeOptions, quantize
from tests.support.runs import _cli, _refused, _source


def test_side_file_linking_out_is_not_copied_and_said_so(tmp_path):
    src = _source(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_abc")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(secret)
    (src / "environ.txt").symlink_to("/proc/self/environ")
    (src / "inside.md").symlink_to(src / "tokenizer.json")  # a link that stays inside is fine
    code, lines = _cli("quantize", src, tmp_path / "out", "--device", "cpu")
    assert code == 0, lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert any("README.md: a symbolic link to" in n and "outside the checkpoint folder: not copied" in n for n in notes)
    assert any("environ.txt: a symbolic link to /proc/" in n for n in notes)
    out = tmp_path / "out"
    assert not (out / "environ.txt").exists()
    assert "original model card" not in (out / "README.md").read_text()  # the card fp8q writes, alone
    assert (out / "inside.md").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not any(b"hf_abc" in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "config.json", "model.safetensors.index.json"])
def test_shard_config_or_index_linking_out_is_refused(tmp_path, name):
    src = _source(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere" / name
    elsewhere.parent.mkdir()
    (src / name).rename(elsewhere)
    (src / name).symlink_to(elsewhere)
    _refused(_cli("quantize", src, tmp_path / "out", "--device", "cpu"), f"{name}: a symbolic link to {elsewhere}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_hub_cache_snapshot_links_into_its_repo_are_followed(tmp_path):
    plain = _source(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in plain.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    quantize(snapshot, tmp_path / "a", QuantizeOptions(device="cpu"))
    quantize(plain, tmp_path / "b", QuantizeOptions(device="cpu"))
    files = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name not in ("fp8q.json", "README.md"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # The card names the repo the snapshot belongs to, at its commit, not the snapshot folder's hash.
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: org/name\n" in card and f"--revision {'a' * 40}" in card
