"""`cascade_rag.attention.calibration.measure` on a real GPU, on a small grid.

Skipped without a GPU and FlashInfer.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.attention import calibration  # noqa: E402


def test_measure_times_the_grid_and_stores_a_usable_threshold(tmp_path):
    result = calibration.measure(batches=(2, 64), shared_tokens=(512, 8192), iters=5)
    assert result.device_name == torch.cuda.get_device_name()
    assert [(t.batch, t.shared_tokens) for t in result.timings] == [
        (2, 512), (2, 8192), (64, 512), (64, 8192)
    ]  # fmt: skip
    assert all(t.plain_ms > 0 and t.cascade_ms > 0 for t in result.timings)
    by = {(t.batch, t.shared_tokens): t for t in result.timings}
    # plain decode reads every request's copy of the prefix: 16x the bytes, clearly more time
    # (not 16x: at 512 tokens the launch and the small reads dominate; the H200 gave 1.87x)
    assert by[64, 8192].plain_ms > 1.5 * by[64, 512].plain_ms
    assert by[64, 8192].saved_bytes == 63 * 8192 * 2 * 8 * 64 * 2
    threshold, bracketed = calibration.fit_level_overhead(result.timings)
    assert (result.level_overhead_bytes, result.bracketed) == (threshold, bracketed)
    path = calibration.save_calibration(result, tmp_path / "c.json")
    got = calibration.level_overhead_bytes(result.device_name, result.flashinfer_version, path=path)
    assert got == result.level_overhead_bytes
    # what the backend asks: the installed FlashInfer finds this entry
    assert calibration.level_overhead_bytes(result.device_name, path=path) == got
