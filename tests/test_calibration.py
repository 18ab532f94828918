"""cascade_rag.attention.calibration on the CPU: the fit, the store, the lookup, the CLI.

The GPU measurement itself needs CUDA and FlashInfer; here the fit is checked on timings from a
synthetic cost model with a known break-even (and against a brute-force search), the store on
temporary files, and `cascade-rag calibrate` on its error paths and with `measure` faked.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_rag.attention import calibration
from cascade_rag.attention.calibration import (
    DEFAULT_LEVEL_OVERHEAD_BYTES,
    CalibrationError,
    CalibrationResult,
    Timing,
    fit_level_overhead,
    level_overhead_bytes,
    load_calibrations,
    save_calibration,
    store_key,
)
from cascade_rag.cli import main

KV_BYTES = 2048  # per token: Llama-3.2-1B attention in bf16
UNIQUE = 256


def _synthetic(overhead_bytes: float, bandwidth: float = 3e9, noise=None) -> list[Timing]:
    """Timings of a cost model: reading KV at `bandwidth` bytes/ms, plus a fixed cost per
    level of `overhead_bytes / bandwidth` ms, so cascade pays above `overhead_bytes` saved."""
    out = []
    for batch in (4, 16, 64, 256):
        for shared in (512, 2048, 8192, 32768):
            plain = batch * (shared + UNIQUE) * KV_BYTES / bandwidth + 0.01
            cascade = (shared + batch * UNIQUE) * KV_BYTES / bandwidth + 0.01
            cascade += overhead_bytes / bandwidth
            if noise is not None:
                plain, cascade = plain * noise(), cascade * noise()
            saved = float((batch - 1) * shared * KV_BYTES)
            out.append(Timing(batch, shared, saved, plain, cascade))
    return out


def _loss(timings, threshold: float) -> float:
    return sum(
        max(0.0, -t.gain_ms) if t.saved_bytes > threshold else max(0.0, t.gain_ms) for t in timings
    )


@pytest.mark.parametrize("overhead", [5e7, 6e8, 3e9])
def test_fit_finds_the_break_even_of_a_cost_model(overhead):
    timings = _synthetic(overhead)
    threshold, bracketed = fit_level_overhead(timings)
    losing = max(t.saved_bytes for t in timings if t.gain_ms < 0)
    winning = min(t.saved_bytes for t in timings if t.gain_ms > 0)
    assert bracketed and losing < overhead < winning
    assert losing < threshold < winning  # separates the grid exactly like the true value
    assert threshold == pytest.approx((losing * winning) ** 0.5)
    assert _loss(timings, threshold) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    overhead=st.floats(1e7, 1e10),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 0.3),
)
def test_fit_loses_no_more_time_than_any_threshold(overhead, seed, spread):
    import random

    rng = random.Random(seed)
    timings = _synthetic(overhead, noise=lambda: 1.0 + rng.uniform(-spread, spread))
    threshold, bracketed = fit_level_overhead(timings)
    best = _loss(timings, threshold)
    values = sorted(t.saved_bytes for t in timings)
    probes = [v * f for v in values for f in (0.5, 0.999, 1.0, 1.001, 2.0)]
    assert all(best <= _loss(timings, p) + 1e-9 for p in probes)
    wins = [t.gain_ms > 0 for t in timings]
    assert bracketed == (any(wins) and not all(wins))


def test_fit_outside_the_grid_is_flagged():
    always = _synthetic(1.0)  # cascade wins everywhere
    threshold, bracketed = fit_level_overhead(always)
    assert not bracketed and threshold < min(t.saved_bytes for t in always)
    never = _synthetic(1e13)
    threshold, bracketed = fit_level_overhead(never)
    assert not bracketed and threshold > max(t.saved_bytes for t in never)
    with pytest.raises(ValueError, match="at least one"):
        fit_level_overhead([])
    with pytest.raises(ValueError, match="saved_bytes"):
        fit_level_overhead([Timing(1, 512, 0.0, 1.0, 1.0)])


# ---- the store ---------------------------------------------------------------------------------


def _result(device="NVIDIA L40S", version="0.7.2", overhead=2.5e8) -> CalibrationResult:
    timings = tuple(_synthetic(overhead))
    threshold, bracketed = fit_level_overhead(timings)
    return CalibrationResult(device, version, threshold, bracketed, timings, {"page_size": 16})


def test_store_round_trip_and_atomic_replace(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    a, b = _result("NVIDIA L40S"), _result("NVIDIA A100-SXM4-80GB", overhead=4e8)
    assert save_calibration(a, path) == path
    save_calibration(b, path)
    stored = load_calibrations(path)
    assert stored == {store_key(a.device_name, "0.7.2"): a, store_key(b.device_name, "0.7.2"): b}
    newer = _result("NVIDIA L40S", overhead=9e8)
    save_calibration(newer, path)
    assert load_calibrations(path)[store_key("NVIDIA L40S", "0.7.2")] == newer
    assert len(load_calibrations(path)) == 2
    leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert leftovers in ([], ["calibration.json.lock"]), leftovers  # no temp file left
    assert json.loads(path.read_text())["version"] == 1


def test_unreadable_store_is_ignored_then_replaced(tmp_path, caplog):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert load_calibrations(path) == {}
    assert "unreadable calibration file" in caplog.text
    save_calibration(_result(), path)
    assert list(load_calibrations(path)) == [store_key("NVIDIA L40S", "0.7.2")]
    assert load_calibrations(tmp_path / "missing.json") == {}


def test_store_path_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CALIBRATION_ENV, str(tmp_path / "mine.json"))
    assert calibration.calibration_path() == tmp_path / "mine.json"
    monkeypatch.delenv(calibration.CALIBRATION_ENV)
    monkeypatch.setenv("CASCADE_RAG_CACHE", str(tmp_path / "cache"))
    assert calibration.calibration_path() == tmp_path / "cache" / "calibration.json"


# ---- the lookup --------------------------------------------------------------------------------


def test_level_overhead_lookup(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(calibration, "_NOTED", set())
    path = tmp_path / "calibration.json"
    measured = _result("NVIDIA L40S", "0.7.2", overhead=2.5e8)
    save_calibration(measured, path)
    assert level_overhead_bytes("NVIDIA L40S", "0.7.2", path) == measured.level_overhead_bytes
    assert measured.level_overhead_bytes != DEFAULT_LEVEL_OVERHEAD_BYTES
    with caplog.at_level(logging.INFO, logger=calibration.__name__):
        # the H100 / H200 default, silently
        for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
            assert level_overhead_bytes(name, "0.7.2", path) == DEFAULT_LEVEL_OVERHEAD_BYTES
        assert caplog.text == ""
        # another FlashInfer release is not this calibration: the default, with a note
        assert level_overhead_bytes("NVIDIA L40S", "0.8.0", path) == DEFAULT_LEVEL_OVERHEAD_BYTES
        assert "cascade-rag calibrate" in caplog.text and "NVIDIA L40S" in caplog.text
        caplog.clear()  # once per process and GPU
        assert level_overhead_bytes("NVIDIA L40S", "0.8.0", path) == DEFAULT_LEVEL_OVERHEAD_BYTES
        assert caplog.text == ""


def test_lookup_without_flashinfer_installed_uses_the_default(tmp_path, monkeypatch):
    save_calibration(_result("NVIDIA H200", "0.7.2", overhead=1e9), tmp_path / "c.json")
    monkeypatch.setattr(calibration, "installed_flashinfer_version", lambda: None)
    got = level_overhead_bytes("NVIDIA H200", path=tmp_path / "c.json")
    assert got == DEFAULT_LEVEL_OVERHEAD_BYTES


# ---- measure's guards and the CLI --------------------------------------------------------------


def test_measure_refuses_bad_grids_and_machines_without_a_gpu(monkeypatch):
    with pytest.raises(ValueError, match="batches"):
        calibration.measure(batches=(1, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        calibration.measure(shared_tokens=(1000,))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CalibrationError, match="CUDA GPU"):
        calibration.measure()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import fails
    with pytest.raises(CalibrationError, match="FlashInfer"):
        calibration.measure()


def test_cli_calibrate_errors_without_cuda(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv(calibration.CALIBRATION_ENV, str(tmp_path / "c.json"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["calibrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cascade-rag: error:") and "CUDA GPU" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    assert main(["calibrate", "--json"]) == 1
    assert "FlashInfer" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_cli_calibrate_stores_and_prints(capsys, monkeypatch, tmp_path):
    path = tmp_path / "c.json"
    monkeypatch.setenv(calibration.CALIBRATION_ENV, str(path))
    fake = _result("NVIDIA L40S", "0.7.2", overhead=2.5e8)

    def measure(device, progress=None):
        assert device == "cuda:1"
        for t in fake.timings if progress else ():
            progress(t)
        return fake

    monkeypatch.setattr(calibration, "measure", measure)
    assert main(["calibrate", "--json", "--device", "cuda:1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["level_overhead_bytes"] == fake.level_overhead_bytes
    assert printed["store"] == str(path) and printed["key"] == store_key("NVIDIA L40S", "0.7.2")
    assert level_overhead_bytes("NVIDIA L40S", "0.7.2") == fake.level_overhead_bytes
    assert main(["calibrate", "--device", "cuda:1"]) == 0
    out = capsys.readouterr().out
    assert out.count("batch ") == len(fake.timings) and "a shared level pays above" in out


@pytest.mark.parametrize("batch, shared, unique", [(2, 32, 5), (5, 64, 16), (7, 16, 33)])
def test_measured_step_plans_as_asked_and_both_plans_attend_alike(batch, shared, unique):
    """The workload `measure` times, on the PyTorch backend: the cascade plan reads the prefix
    once in a shared level, and gives the same attention as the plain plan."""
    import torch

    from cascade_rag.attention.torch_backend import TorchAttention

    page = 16
    plain, cascade = calibration.decode_step_metadata(batch, shared, unique, page, "cpu")
    assert len(plain.levels) == 1 and len(cascade.levels) == 2
    shared_level, last = cascade.levels
    assert shared_level.num_entries == 1 and not shared_level.causal and last.causal
    assert shared_level.kv_lens(page).tolist() == [shared]
    assert last.kv_lens(page).tolist() == [unique] * batch
    assert plain.levels[0].kv_lens(page).tolist() == [shared + unique] * batch
    g = torch.Generator().manual_seed(0)
    num_pages = shared // page + batch * -(-unique // page)
    k_cache = torch.randn(num_pages, page, 2, 8, generator=g)
    v_cache = torch.randn(num_pages, page, 2, 8, generator=g)
    q, k, v = (torch.randn(batch, h, 8, generator=g) for h in (4, 2, 2))
    outs = []
    for metadata in (plain, cascade):
        attn = TorchAttention(4, 2, 8)
        attn.plan(metadata)
        outs.append(attn.forward(q, k, v, k_cache.clone(), v_cache.clone()))
    err = (outs[0] - outs[1]).abs()
    assert err.max() < 1e-5, f"max {err.max():.2e} mean {err.mean():.2e}"
