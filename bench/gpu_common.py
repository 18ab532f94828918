"""Shared pieces of the GPU benchmarks: a random-weight Llama-3.2-1B-shaped model folder, timing.

No weights can be downloaded on the GPU machine, and speed does not depend on weight values, so
the benchmarks build the model from a config with random bf16 weights. The tokenizer is a small
byte-level BPE built in memory; prompts are token ids, identical for every system compared.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cascade_rag.testing import (
    PEAKED_MECHANISM_FILE,
    byte_bpe_tokenizer,
    save_peaked_llama,
    save_random_llama,
)

LLAMA_1B_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def make_model_dir(path: str | Path, vocab_size: int = 128256) -> Path:
    """Random Llama-3.2-1B-shaped model (bf16, Llama 3's vocabulary size) plus tokenizer."""
    path = Path(path)
    if not (path / "config.json").exists():
        tokenizer = byte_bpe_tokenizer(4096, padded_vocab_size=vocab_size)
        save_random_llama(path, tokenizer=tokenizer, device="cuda", **LLAMA_1B_SHAPE)
    return path


def make_peaked_model_dir(path: str | Path, vocab_size: int = 128256) -> Path:
    """Random Llama-3.2-1B-shaped model whose greedy tokens lead by a wide margin at every step
    (`cascade_rag.testing.save_peaked_llama`), so that comparing the tokens of two systems
    tests them rather than bf16 rounding at near ties. Same shape and speed as
    `make_model_dir` except an untied LM head (the mechanism needs its own); measure the lead
    with `cascade_rag.testing.greedy_margins`."""
    path = Path(path)
    if not (path / PEAKED_MECHANISM_FILE).exists():
        tokenizer = byte_bpe_tokenizer(4096, padded_vocab_size=vocab_size)
        shape = dict(LLAMA_1B_SHAPE, tie_word_embeddings=False)
        save_peaked_llama(path, tokenizer=tokenizer, device="cuda", **shape)
    return path


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "bench-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data: dict) -> Path:
    data = dict(data, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=2))
    return path


class Timer:
    """Wall-clock seconds of a block, with the GPU synchronized on both ends."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


class StepTimeline:
    """Start and end (perf_counter) of every `core.step()` of an engine while it is on, to
    split a timed run into: before the first step (submission, admission work of the front
    end), the first step (the prefill), the later steps, and after the last one (outputs)."""

    def __init__(self, engine) -> None:
        self.core = engine._core
        self.spans: list[tuple[float, float]] = []

    def __enter__(self):
        step = self.core.step

        def timed():
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                self.spans.append((t0, time.perf_counter()))

        self.core.step = timed
        return self

    def __exit__(self, *exc):
        del self.core.step

    def split(self, start: float, end: float) -> dict:
        """Seconds of each part of a run timed from `start` to `end`."""
        spans = [s for s in self.spans if start <= s[0] <= end]
        if not spans:
            return {}
        later = spans[1:]
        return dict(
            before_first_step=spans[0][0] - start,
            first_step=spans[0][1] - spans[0][0],
            later_steps=len(later),
            later_steps_s=sum(b - a for a, b in later),
            between_steps_s=sum(b[0] - a[1] for a, b in zip(spans, spans[1:])),
            after_last_step=end - spans[-1][1],
        )


def timed_generate(engine, prompts, params, repeats: int, before_each=None):
    """Time `engine.generate(prompts, params)` `repeats` times (after `before_each()`, if
    given). Returns (seconds per run, the last run's outputs, engine steps of the last run);
    `engine.last_timeline` is then the last run's `StepTimeline.split`."""
    times = []
    with StepTimeline(engine) as timeline:
        for _ in range(repeats):
            if before_each is not None:
                before_each()
            steps_before = engine.stats().num_steps
            with Timer() as t:
                outs = engine.generate(prompts, params)
            times.append(t.seconds)
    engine.last_timeline = timeline.split(t.start, t.start + t.seconds)
    return times, outs, engine.stats().num_steps - steps_before


def kernel_times(core, steps: int) -> list[dict]:
    """GPU time of `steps` calls of `core.step()` per CUDA kernel (and copy), from
    torch.profiler: dicts of kernel name, calls per step and microseconds per step, largest
    first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            entry = totals.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    rows = [dict(kernel=name, calls=n / steps, us=us / steps) for name, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])


def gpu_ms_per_step(core, steps: int) -> float:
    """Milliseconds of CUDA kernel (and copy) time per `core.step()`, from torch.profiler."""
    return sum(r["us"] for r in kernel_times(core, steps)) / 1000


def parse_graph_options(spec: str) -> dict:
    """'shared_pieces=4,shared_backend=fa3,short_last_tokens=1024' -> keyword arguments of
    `DecodeGraphAttention` (ints where they parse, "none" -> None); '' -> {}."""
    options = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if value.lower() == "none":
            options[key] = None
        else:
            options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


@contextmanager
def graph_options(**options):
    """Decode-graph attention objects made inside the block (engines make them on first use,
    so keep the block open while the engine runs) get these keyword arguments, in place of
    what the engine passes (its `cuda_graph_*` options), to compare settings in one process."""
    from cascade_rag.attention.flashinfer_graph import DecodeGraphAttention

    init = DecodeGraphAttention.__init__

    def with_options(self, *args, **kwargs):
        init(self, *args, **{**kwargs, **options})

    DecodeGraphAttention.__init__ = with_options
    try:
        yield
    finally:
        DecodeGraphAttention.__init__ = init
