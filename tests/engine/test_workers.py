"""--workers is capped at the cores the process may run on."""

from __future__ import annotations

import os

from tests.support.runs import _cli, _source


def test_workers_are_capped_at_the_cores(tmp_path, monkeypatch):
    import fp8q.engine.stages as stages

    cores = len(os.sched_getaffinity(0))
    asked = []
    real = stages.make_quantizer

    def spy(layout, device, workers):
        asked.append(workers)
        return real(layout, device, workers)

    monkeypatch.setattr(stages, "make_quantizer", spy)
    src = _source(tmp_path / "src")
    assert _cli("quantize", src, tmp_path / "out", "--device", "cpu", "--workers", "10000", "-q")[0] == 0
    assert asked == [cores]
