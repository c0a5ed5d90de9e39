"""A run's peak memory does not grow with the number of layers: the model grows, the pipeline's buffers do not."""

from __future__ import annotations

import pytest

from tests.support.runs import _layers, _peak_rss_kib


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
