"""A run's destinations behind one protocol: a third kind (a mirror folder standing in for an object store) is one
class, added to the list the run holds; the run asks it what it asks OUT and the Hub, in the same order."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import torch

import fp8q.engine.run as run_module
from fp8q.engine.api import Options, quantize
from fp8q.events import Event, ShardUploaded, UploadStarted
from fp8q.output.destination import Broadcast, Delivered, Destination, OutFolder, Published, Say
from fp8q.output.manifest import Progress
from tests.support.factories import write_shards


class Mirror:
    """Each finished shard copied into `root` as it is put, the other files at commit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.waits: list[tuple[float, float]] = []
        self.notes: list[str] = []
        self.published: Published | None = None
        self.bytes_sent = 0
        self.asked: list[str] = []

    @property
    def where(self) -> str:
        return str(self.root)

    @property
    def sends(self) -> bool:
        return True

    def check(self, names: set[str]) -> bool:
        self.asked.append("check")
        return False

    def accept(self) -> None:
        self.asked.append("accept")

    def outlook(self, names: set[str]) -> str | None:
        return None

    def settle(self, broadcast: Broadcast) -> None:
        self.asked.append("settle")

    def resume(self, progress: Progress) -> set[str]:
        self.asked.append("resume")
        return set()

    def open(self) -> None:
        self.asked.append("open")
        self.root.mkdir()

    def room(self, stop: threading.Event) -> None:
        self.asked.append("room")

    def lost(self) -> None:
        self.asked.append("lost")

    def put(self, name: str, path: Path, sha256: str, delivered: Delivered) -> None:
        self.asked.append(f"put {name}")
        shutil.copyfile(path, self.root / name)
        self.bytes_sent += path.stat().st_size
        delivered(name, {"sha256": sha256, "size": path.stat().st_size, "sample": ""})

    def drain(self, stop: threading.Event, say: Say) -> None:
        self.asked.append("drain")

    def commit(
        self, folder: Path, names: list[str], progress: Progress, message: str, stop: threading.Event, say: Say
    ) -> None:
        self.asked.append("commit")
        say(f"copying {len(names)} files to {self.where}")
        for name in names:
            if not (self.root / name).exists():
                self.bytes_sent += (folder / name).stat().st_size
                shutil.copyfile(folder / name, self.root / name)

    def close(self) -> None:
        self.asked.append("close")


def _source(folder: Path) -> Path:
    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(torch.bfloat16)

    return write_shards(
        folder,
        {
            "model-00001-of-00002.safetensors": {
                "model.embed_tokens.weight": w(50, 64),
                "model.layers.0.self_attn.q_proj.weight": w(64, 64),
            },
            "model-00002-of-00002.safetensors": {"model.layers.0.mlp.up_proj.weight": w(96, 64)},
        },
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    )


def test_a_third_destination_is_one_class_the_run_asks_as_it_asks_out(tmp_path: Path, monkeypatch: Any) -> None:
    mirror = Mirror(tmp_path / "mirror")
    made = run_module.destinations

    def with_mirror(*args: Any, **kwargs: Any) -> list[Destination]:
        found = made(*args, **kwargs)
        assert [type(d) for d in found] == [OutFolder]  # no --push-to-hub: OUT alone
        return [mirror, *found]  # OUT last: its commit renames the work folder

    monkeypatch.setattr(run_module, "destinations", with_mirror)
    events: list[Event] = []
    src = _source(tmp_path / "src")
    report = quantize(src, tmp_path / "out", Options(device="cpu"), on_event=events.append)

    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in mirror.root.iterdir()) == files  # every file of the output, fp8q.json too
    for name in files:
        assert (mirror.root / name).read_bytes() == (out / name).read_bytes(), name
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert mirror.asked[:3] == ["check", "accept", "open"]
    puts = [a for a in mirror.asked if a.startswith("put ")]
    assert puts == [f"put {name}" for name in shards]  # each shard as soon as it is finished, in order
    assert mirror.asked.count("room") == len(shards) and "lost" not in mirror.asked
    assert mirror.asked[-3:] == ["drain", "commit", "close"]
    assert mirror.asked.index("drain") > mirror.asked.index(puts[-1])
    # The run reports what went out and shows the shards going (its events), as it does for a Hub repo.
    assert report.bytes_uploaded == mirror.bytes_sent == sum((out / name).stat().st_size for name in files)
    started = [e for e in events if isinstance(e, UploadStarted)]
    assert len(started) == 1 and started[0].nbytes == sum((out / name).stat().st_size for name in shards)
    assert [e.shard for e in events if isinstance(e, ShardUploaded)] == shards


def test_an_out_holding_the_output_is_refused_only_when_the_run_makes_it_again(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A Hub repo from the cache fixes its bytes: a run again into the OUT that holds its output has nothing to do;
    one that makes the output all the same (--resume) refuses that OUT as any full one, before anything is
    written, and --dry-run says so too."""
    from huggingface_hub import constants

    from fp8q.engine.api import Mode, preflight
    from fp8q.errors import OutputError
    from tests.source.test_source import add_commit

    built = _source(tmp_path / "built")
    commit = "c" * 40
    add_commit(tmp_path / "hub", "org/tiny", commit, {f.name: f.read_bytes() for f in built.iterdir()}, refs=("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    first = quantize("org/tiny", out, Options(device="cpu"))
    assert not first.up_to_date
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert quantize("org/tiny", out, Options(device="cpu")).up_to_date
    assert preflight("org/tiny", out, Options(device="cpu"), Mode.QUANTIZE).plan.problems == ()
    full = f"{out}: exists and is not empty; pass --overwrite"
    for attempt in (
        lambda: quantize("org/tiny", out, Options(device="cpu", resume=True)),
        lambda: preflight("org/tiny", out, Options(device="cpu", resume=True), Mode.QUANTIZE),
    ):
        try:
            attempt()
        except OutputError as e:
            assert str(e).startswith(full), e
        else:
            raise AssertionError("an OUT holding an output was taken without --overwrite")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not (tmp_path / "out.partial").exists()  # refused before anything was written
