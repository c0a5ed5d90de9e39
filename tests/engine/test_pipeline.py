"""The threaded, chunked, streaming pipeline writes exactly the files of a plain unpipelined
conversion: whole-tensor quantization and `safetensors.save_file` per shard."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8q import QuantizeOptions, quantize
from fp8q.engine import devices as quantizer_module
from fp8q.engine import stages as stages_module
from fp8q.errors import UnsupportedTensorError
from fp8q.layouts import find
from fp8q.layouts import numerics as numerics_module
from fp8q.layouts.numerics import quantize as quantize_tensor
from fp8q.output import manifest as manifest_module
from fp8q.output import shard_io
from fp8q.output import writer as writer_module
from fp8q.output.manifest import Progress
from fp8q.output.shard_io import start_writeback
from fp8q.source import files as files_module
from fp8q.source.reader import read_ahead
from tests.support.factories import write_shards

LAYOUTS = [
    ("channel", "compressed-tensors"),
    ("block", "compressed-tensors"),
    ("tensor", "compressed-tensors"),
    ("tensor", "fp8"),
    ("block", "fp8"),
]


def _source(tmp_path):
    def w(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape) * 0.05).to(dtype)

    return write_shards(
        tmp_path / "src",
        {
            "model-00001-of-00003.safetensors": {
                "model.embed_tokens.weight": w(50, 40),
                "model.layers.0.self_attn.q_proj.weight": w(40, 40),
                "model.layers.0.self_attn.q_proj.bias": w(40),
                "model.layers.0.mlp.up_proj.weight": w(300, 40),
                "model.layers.0.input_layernorm.weight": torch.ones(40),
            },
            "model-00002-of-00003.safetensors": {
                "model.layers.0.mlp.down_proj.weight": w(40, 300, dtype=torch.float32),
                "model.layers.0.mlp.gate.weight": w(4, 40),
                "model.layers.0.rotary.inv_freq": torch.arange(10, dtype=torch.int64),
                "model.layers.0.mlp.experts.0.up_proj.weight": w(129, 40, dtype=torch.float16),
            },
            "model-00003-of-00003.safetensors": {"lm_head.weight": w(50, 40), "model.norm.weight": torch.ones(40)},
        },
        config={"architectures": ["X"], "tie_word_embeddings": False},
    )


@pytest.mark.parametrize("scheme,fmt", LAYOUTS)
def test_pipeline_equals_unpipelined(tmp_path, monkeypatch, scheme, fmt):
    monkeypatch.setattr(quantizer_module, "CHUNK_BYTES", 512)
    monkeypatch.setattr(stages_module, "READ_AHEAD", 1000)  # read-ahead hints on every tensor
    src = _source(tmp_path)
    quantize(
        src, tmp_path / "out", QuantizeOptions(scheme=scheme, format=fmt, device="cpu", workers=2, load_check=False)
    )
    layout = find(scheme, fmt)
    quantized = {"q_proj", "up_proj", "down_proj"}
    for shard in sorted(src.glob("*.safetensors")):
        expected = {}
        for name, t in load_file(shard).items():
            module = name.rsplit(".", 2)
            if name.endswith(".weight") and module[-2] in quantized:
                q, s = quantize_tensor(t, layout)
                expected[name] = q
                expected[name.removesuffix("weight") + layout.scale_suffix] = s
            else:
                expected[name] = t
        save_file(expected, tmp_path / "expected.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "expected.safetensors").read_bytes()


def test_hints_do_not_change_or_fail_on_any_range(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 40)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, nbytes in [(0, 0), (0, 10), (5000, 1 << 30), (1 << 40, 4096)]:
            read_ahead(fd, offset, nbytes)
            start_writeback(fd, offset, nbytes)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(range(256)) * 40
    if sys.platform.startswith("linux"):  # the write-back hint is real there, not a silent no-op
        assert shard_io._sync_file_range is not None


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 7])
def test_sha256_through_windows_equals_hashlib(tmp_path, monkeypatch, size):
    monkeypatch.setattr(manifest_module, "HASH_WINDOW", 4096)  # many windows, the last one partial
    monkeypatch.setattr(files_module, "_HASH_CHUNK", 4096)  # whole files: many reads into one buffer
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    assert _windowed_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert files_module.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def _windowed_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        manifest_module._hash_range(digest, f.fileno(), 0, path.stat().st_size)
    return digest.hexdigest()


def test_sha256_reads_where_files_cannot_be_mapped(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(manifest_module.mmap, "mmap", refuse)
    monkeypatch.setattr(manifest_module, "HASH_WINDOW", 4096)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * 4096 + 7))
    assert _windowed_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("report", ["in order", "shuffled", "with a gap"])
def test_file_hasher_equals_hashlib_whatever_order_ranges_land(tmp_path, monkeypatch, report):
    monkeypatch.setattr(manifest_module, "HASH_WINDOW", 8192)  # ranges cross windows and pages
    data = os.urandom(50_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    cuts = [0, 8, 5000, 5000, 12_289, 30_000, 49_999, 50_000]  # one empty range, unaligned edges
    ranges = list(zip(cuts, cuts[1:], strict=False))
    if report == "shuffled":
        random.Random(0).shuffle(ranges)
    elif report == "with a gap":
        ranges = ranges[:2] + ranges[3:]  # never reported: finish() hashes it from the file
    hasher = manifest_module.FileHasher(path)
    for start, end in ranges:
        hasher.add(start, end)
    if report == "in order":
        assert hasher.hashed == len(data)  # all hashed as the ranges landed, nothing left for finish()
    assert hasher.finish() == hashlib.sha256(data).hexdigest()


def test_file_hasher_reports_a_read_error_at_finish(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(10_000))
    hasher = manifest_module.FileHasher(path)

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(manifest_module, "_hash_range", failing)
    hasher.add(0, 10_000)
    with pytest.raises(OSError, match="Input/output error"):
        hasher.finish()
    assert hasher.fd == -1


def test_every_byte_of_every_shard_is_hashed_as_it_lands(tmp_path, monkeypatch):
    src = _source(tmp_path)
    left_for_finish = {}
    real_finish = manifest_module.FileHasher.finish

    def finish(self):
        left_for_finish[self.path.name] = self.path.stat().st_size - self.hashed
        return real_finish(self)

    monkeypatch.setattr(manifest_module.FileHasher, "finish", finish)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    assert sorted(left_for_finish) == sorted(p.name for p in src.glob("*.safetensors"))
    assert set(left_for_finish.values()) == {0}  # header, kept, copied, quantized and scales all reported


def test_a_slow_kept_copy_is_in_its_shard_before_the_shard_is_finished(tmp_path, monkeypatch):
    """Kept tensors are copied on a thread of their own: a shard must wait for them before it is hashed,
    flushed and recorded. Here every copy is slow, so the weights written beside it finish first."""
    import time

    src = _source(tmp_path)
    quantize(src, tmp_path / "now", QuantizeOptions(device="cpu"))
    real_copy = writer_module.ShardFile.copy

    def slow_copy(self, src_fd, src_offset, out):
        time.sleep(0.2)
        real_copy(self, src_fd, src_offset, out)

    monkeypatch.setattr(writer_module.ShardFile, "copy", slow_copy)
    quantize(src, tmp_path / "slow", QuantizeOptions(device="cpu"))
    recorded = json.loads((tmp_path / "slow" / "fp8q.json").read_text())["files"]
    for shard in src.glob("*.safetensors"):
        data = (tmp_path / "slow" / shard.name).read_bytes()
        assert data == (tmp_path / "now" / shard.name).read_bytes()
        assert recorded[shard.name] == hashlib.sha256(data).hexdigest()


def test_kept_tensors_of_later_shards_are_copied_while_earlier_ones_are_written(tmp_path, monkeypatch):
    """The copier runs ahead of the writer from the start: a last shard that holds only lm_head is not left
    for the end. Here every weight write is slow, and lm_head (shard 3) must be in before shard 1's weights."""
    import threading
    import time

    src = _source(tmp_path)
    quantize(src, tmp_path / "now", QuantizeOptions(device="cpu"))
    events, lock = [], threading.Lock()
    real_write, real_copy = writer_module.ShardFile.write, writer_module.ShardFile.copy

    def slow_write(self, out, t):
        time.sleep(0.05)
        real_write(self, out, t)
        with lock:
            events.append(("write", out.name))

    def copy(self, src_fd, src_offset, out):
        real_copy(self, src_fd, src_offset, out)
        with lock:
            events.append(("copy", out.name))

    monkeypatch.setattr(writer_module.ShardFile, "write", slow_write)
    monkeypatch.setattr(writer_module.ShardFile, "copy", copy)
    quantize(src, tmp_path / "later", QuantizeOptions(device="cpu"))
    last_of_shard_1 = max(i for i, e in enumerate(events) if e == ("write", "model.layers.0.mlp.up_proj.weight_scale"))
    assert events.index(("copy", "lm_head.weight")) < last_of_shard_1, events
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "later" / shard.name).read_bytes() == (tmp_path / "now" / shard.name).read_bytes()


def test_the_copier_stays_a_few_shards_ahead_of_the_writer(tmp_path, monkeypatch):
    """Every shard keeps a norm whole: a copier running free would open every output shard (a file, a hash
    and a thread each) at the start; it must stay within COPY_AHEAD shards of the writer."""
    import threading
    import time

    from fp8q.engine import writing

    shards = {
        f"model-{n + 1:05d}-of-00008.safetensors": {
            f"model.layers.{n}.mlp.up_proj.weight": torch.randn(64, 32, dtype=torch.bfloat16),
            f"model.layers.{n}.input_layernorm.weight": torch.ones(32, dtype=torch.bfloat16),
        }
        for n in range(8)
    }
    src = write_shards(tmp_path / "src", shards, config={"architectures": ["X"], "tie_word_embeddings": False})
    open_now, most, lock = set(), [0], threading.Lock()
    real_init, real_close = writer_module.ShardFile.__init__, writer_module.ShardFile.close
    real_write = writer_module.ShardFile.write

    def init(self, path, plan, on_written=None):
        real_init(self, path, plan, on_written)
        with lock:
            open_now.add(path.name)
            most[0] = max(most[0], len(open_now))

    def close(self):
        with lock:
            open_now.discard(self.path.name)
        real_close(self)

    def slow_write(self, out, t):
        time.sleep(0.02)
        real_write(self, out, t)

    monkeypatch.setattr(writer_module.ShardFile, "__init__", init)
    monkeypatch.setattr(writer_module.ShardFile, "close", close)
    monkeypatch.setattr(writer_module.ShardFile, "write", slow_write)
    monkeypatch.setattr(writing, "COPY_AHEAD", 1)
    quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    assert 1 < most[0] <= 3, most  # the writer's, the one ahead, one being flushed


class _Deferred(quantizer_module.CpuQuantizer):
    """The GPU's way, on the CPU: `start` only promises, and the work happens in `wait()`, on the writer's
    thread, after later weights have been read. A pipeline that handed an input buffer back before the
    promise was kept would quantize the next weight's bytes in its place."""

    in_flight = 3

    def start(self, handle, q=None, part=None, whole=False):
        def run():
            done = quantizer_module.CpuQuantizer.start(self, handle, q, part, whole)
            promise.q.copy_(done.q)
            promise.s.copy_(done.s)
            promise.sums = done.sums

        w = handle.host if part is None else part.take(handle.host)
        q_out, s_out = numerics_module.empty_outputs(w, self.layout, q=torch.empty_like(q) if q is not None else None)
        promise = quantizer_module.Quantized(q_out, s_out, torch.zeros(6, dtype=torch.float64), pending=run)
        return promise


@pytest.mark.parametrize("scheme,fmt", LAYOUTS)
def test_deferred_quantizer_writes_the_same_files(tmp_path, monkeypatch, scheme, fmt):
    src = _source(tmp_path)
    options = {"scheme": scheme, "format": fmt, "device": "cpu", "load_check": False}
    quantize(src, tmp_path / "now", QuantizeOptions(**options))
    monkeypatch.setattr(stages_module, "make_quantizer", lambda layout, device, workers: _Deferred(layout, 1))
    quantize(src, tmp_path / "later", QuantizeOptions(**options))
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "later" / shard.name).read_bytes() == (tmp_path / "now" / shard.name).read_bytes()


def test_deferred_quantizer_names_a_nan_weight(tmp_path, monkeypatch):
    src = _source(tmp_path)
    shard = src / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.down_proj.weight"][3, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    monkeypatch.setattr(stages_module, "make_quantizer", lambda layout, device, workers: _Deferred(layout, 1))
    with pytest.raises(UnsupportedTensorError, match="model.layers.0.mlp.down_proj.weight in .* holds NaN or inf"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()
    # OUT.partial stays exactly when a shard was finished before the failure (only the first can be), for --resume.
    partial = tmp_path / "out.partial"
    done = set(Progress(partial, {}).done()) if partial.exists() else set()
    assert partial.exists() == bool(done) and done <= {"model-00001-of-00003.safetensors"}


def test_waiting_on_the_network_counts_the_loop_s_stalls_only_while_the_network_is_waited_on():
    """engine.stalls: a stall of the quantization loop is time waiting on the Hub only where a download or an upload
    was being waited for at the same moment; each moment once, however many threads wait."""
    from fp8q.engine.stalls import Stalls, overlap, union

    assert union([(3.0, 4.0), (0.0, 2.0), (1.0, 3.0), (6.0, 7.0)]) == [(0.0, 4.0), (6.0, 7.0)]
    network = [(0.0, 10.0), (2.0, 4.0)]  # the reader and the writer waiting at once count once
    assert overlap(network, [(2.0, 3.0), (5.0, 7.0), (9.0, math.inf)]) == 4.0
    assert overlap([(0.0, 1.0), (2.0, 3.0)], [(0.5, 2.5)]) == 1.0
    assert overlap([(0.0, 5.0)], [(6.0, math.inf)]) == 0.0  # the disk, not the network, held the loop
    stalls = Stalls()
    with stalls.waiting():
        pass  # under a millisecond: not a stall
    with stalls.waiting():
        time.sleep(0.01)
    assert len(stalls.intervals) == 1 and stalls.intervals[0][1] - stalls.intervals[0][0] >= 0.01
