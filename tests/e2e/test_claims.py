"""What the README and the API promise, each checked so that breaking it fails a test: progress events,
memory that does not grow with the model, Hub repo ids through the command, the block size in the config,
a tensor in two shards, and the debug traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fp8q import PlanReady, QuantizeOptions, TensorDone, quantize
from fp8q.cli import app
from tests.engine.test_resume import killed_after
from tests.source.test_source import add_commit
from tests.support.factories import add_side_files, write_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}


def _layers(folder: Path, layers: int, width: int = 512) -> Path:
    """`layers` shards of one layer each, every layer the same size: the model grows, its tensors do not."""
    shards = {}
    for i in range(layers):
        shards[f"model-{i + 1:05d}-of-{layers:05d}.safetensors"] = {
            f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(2 * width, width) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(width, 2 * width) * 0.05).to(torch.bfloat16),
            f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(width, dtype=torch.bfloat16),
        }
    src = write_shards(folder, shards, config=CONFIG)
    add_side_files(src)
    return src


# ── progress events ──


def _events(src: Path, out: Path, **options: object) -> tuple[list[object], object]:
    events: list[object] = []
    report = quantize(src, out, QuantizeOptions(device="cpu", **options), on_event=events.append)
    return events, report


def test_events_one_plan_then_one_per_tensor_with_all_the_bytes(tmp_path):
    src = _layers(tmp_path / "src", 3)
    events, _ = _events(src, tmp_path / "out")
    plans = [e for e in events if isinstance(e, PlanReady)]
    done = [e for e in events if isinstance(e, TensorDone)]
    assert len(plans) == 1 and events[0] is plans[0] and len(done) == len(events) - 1
    tensors = plans[0].plan.checkpoint.tensors
    assert sorted(e.name for e in done) == sorted(tensors)  # one each, none twice
    assert sum(e.nbytes for e in done) == sum(meta.nbytes for meta in tensors.values())
    assert {e.shard for e in done} == {p.name for p in src.glob("*.safetensors")}
    assert all(e.shard == tensors[e.name].shard for e in done)


def test_events_on_resume_count_reused_shards_too(tmp_path):
    src = _layers(tmp_path / "src", 3)
    killed_after(src, tmp_path / "out", 1)
    events, report = _events(src, tmp_path / "out", resume=True)
    done = [e for e in events if isinstance(e, TensorDone)]
    checkpoint = events[0].plan.checkpoint
    assert report.resumed_shards == 1
    assert sorted(e.name for e in done) == sorted(checkpoint.tensors)
    assert sum(e.nbytes for e in done) == sum(meta.nbytes for meta in checkpoint.tensors.values())


# ── memory does not grow with the model ──


_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_rss_kib(src: Path, out: Path, command: str = "quantize") -> int:
    cmd = [sys.executable, "-m", "fp8q", command, str(src), str(out), "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, env=env, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    small, large = _layers(tmp_path / "small", 4, width=1024), _layers(tmp_path / "large", 12, width=1024)
    extra_mib = (
        sum(p.stat().st_size for p in large.glob("*.safetensors"))
        - sum(p.stat().st_size for p in small.glob("*.safetensors"))
    ) / 2**20
    rss_small = _peak_rss_kib(small, tmp_path / "out-small") / 1024
    rss_large = _peak_rss_kib(large, tmp_path / "out-large") / 1024
    # 8 more layers are 64 MiB more model; a pipeline that held them would grow by about that much.
    assert extra_mib == pytest.approx(64, rel=0.01)
    assert rss_large - rss_small < extra_mib / 4, (rss_small, rss_large)


# ── Hub repo ids through the command ──


def test_repo_id_and_revision_through_the_command(tmp_path):
    def files(value: float) -> dict[str, bytes]:
        folder = tmp_path / f"build-{value}"
        tensors = {
            "model.layers.0.mlp.up_proj.weight": torch.full((64, 32), value, dtype=torch.bfloat16),
            "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
        }
        write_shards(folder, {"model.safetensors": tensors}, index=False, config=CONFIG)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    cache = tmp_path / "hub"
    a = add_commit(cache, "org/tiny", "a" * 40, files(1.0), refs=("main",))
    b = add_commit(cache, "org/tiny", "b" * 40, files(2.0), refs=("v2",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    made = {}
    for revision, snapshot in (("v2", b), (None, a)):
        out = tmp_path / f"out-{revision}"
        pinned = ["--revision", revision] if revision else []
        args = ["quantize", "org/tiny", str(out), "--device", "cpu", "-q", *pinned]
        run = subprocess.run([sys.executable, "-m", "fp8q", *args], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        direct = tmp_path / f"direct-{revision}"
        quantize(snapshot, direct, QuantizeOptions(device="cpu"))
        made[revision] = (out / "model.safetensors").read_bytes()
        assert made[revision] == (direct / "model.safetensors").read_bytes()
    assert made["v2"] != made[None]
    run = subprocess.run(
        [sys.executable, "-m", "fp8q", "quantize", "org/tiny", str(tmp_path / "x"), "--revision", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Hub repo org/tiny at revision nope" in run.stderr


# ── the block size is written where the engines read it ──


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_block_size_is_carried_into_config_and_scales(tmp_path, fmt):
    src = _layers(tmp_path / "src", 1, width=256)
    options = QuantizeOptions(device="cpu", scheme="block", format=fmt, block_size=(64, 32))
    quantize(src, tmp_path / "out", options)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if fmt == "fp8":
        assert qc["weight_block_size"] == [64, 32]
        suffix = "weight_scale_inv"
    else:
        group = qc["config_groups"]["group_0"]
        assert group["weights"]["block_structure"] == [64, 32] and group["input_activations"]["group_size"] == 32
        suffix = "weight_scale"
    with safe_open(tmp_path / "out" / "model-00001-of-00001.safetensors", "pt") as f:
        assert tuple(f.get_slice(f"model.layers.0.mlp.up_proj.{suffix}").get_shape()) == (512 // 64, 256 // 32)


# ── bad input not covered elsewhere ──


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    w = torch.randn(32, 16, dtype=torch.bfloat16)
    src = write_shards(
        tmp_path / "src",
        {"a.safetensors": {"x.up_proj.weight": w}, "b.safetensors": {"x.up_proj.weight": w}},
        index=False,
        config=CONFIG,
    )
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.up_proj.weight": "a.safetensors", "y": "b.safetensors"}})
    )
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, lines
    assert "b.safetensors: tensor x.up_proj.weight is also in a.safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


def test_debug_prints_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "fp8q", "quantize", str(tmp_path / "nope"), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "FP8Q_DEBUG": "1"})
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    assert "CheckpointError: " in loud.stderr and "no such file or folder" in loud.stderr


# ── README promises a mutation run left without a test (second hostile probe, class 12) ──


def test_a_shard_changed_during_the_run_with_its_mtime_set_back_is_still_caught(tmp_path):
    """The status-change time catches a write that sets the modification time back (`touch -d`, `cp -p`)."""
    from fp8q.errors import CheckpointError
    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src", shards=2)
    shard = src / "model-00001-of-00002.safetensors"
    before = shard.stat()
    changed = []

    def change_in_place(event):
        if getattr(event, "shard", None) == shard.name and not changed:
            with open(shard, "r+b") as f:
                f.seek(-2, 2)
                f.write(b"\x00\x3c")
            os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # as it was: only ctime tells
            changed.append(event)

    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: changed while fp8q was converting"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", workers=1), on_event=change_in_place)
    assert changed and shard.stat().st_mtime_ns == before.st_mtime_ns


def test_resume_refuses_another_fp8q_version(tmp_path):
    from fp8q.errors import OutputError
    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 1)
    record = tmp_path / "out.partial" / ".fp8q-run.json"
    run = json.loads(record.read_text())
    run["fingerprint"]["version"] = "0.0.1"
    record.write_text(json.dumps(run))
    with pytest.raises(OutputError, match="cannot resume: the fp8q version changed since the interrupted run"):
        quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()


def test_a_chmod_of_a_source_shard_makes_it_be_redone(tmp_path):
    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src", shards=3)
    killed_after(src, tmp_path / "out", 2)
    (src / "model-00001-of-00003.safetensors").chmod(0o600)  # data unchanged, status-change time new
    report = quantize(src, tmp_path / "out", QuantizeOptions(device="cpu", resume=True))
    assert report.resumed_shards == 1
    quantize(src, tmp_path / "fresh", QuantizeOptions(device="cpu"))
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "fresh" / shard.name).read_bytes()


def test_quiet_prints_nothing_on_success(tmp_path):
    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src")
    result = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""


def test_other_weight_files_are_neither_copied_nor_opened(tmp_path):
    import pickle

    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling it would create the marker

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (src / "consolidated.safetensors").write_bytes((src / "model-00001-of-00002.safetensors").read_bytes())
    code = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--device", "cpu", "-q"]).exit_code
    assert code == 0 and not marker.exists()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert not (tmp_path / "out" / "consolidated.safetensors").exists()


def test_an_unknown_architecture_gets_a_note(tmp_path):
    from fp8q import plan_conversion
    from tests.e2e.test_safety import _source

    src = _source(tmp_path / "src")
    (src / "config.json").write_text(json.dumps({**CONFIG, "model_type": "brand_new"}))
    notes = plan_conversion(src, QuantizeOptions()).notes
    assert any("model_type 'brand_new' is not in fp8q's architecture table: generic rules apply" in n for n in notes)


def test_block_moe_experts_that_are_not_whole_tiles_are_refused_at_tp_1(tmp_path):
    from fp8q import plan_conversion
    from tests.support.factories import tiny_qwen3_moe

    src = tiny_qwen3_moe(tmp_path / "src", intermediate=96)
    problems = plan_conversion(src, QuantizeOptions(scheme="block")).problems
    assert any("mlp.experts" in p and "at --tp 1" in p for p in problems), problems
