"""The progress events a run sends: one plan, then one per tensor, with all the bytes, resumed shards included."""

from __future__ import annotations

from pathlib import Path

from fp8q import PlanReady, QuantizeOptions, TensorDone, quantize
from tests.engine.test_resume import killed_after
from tests.support.runs import _layers


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
