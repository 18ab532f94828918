"""Where a decode step's time goes on the GPU: cProfile of the engine core's steps, or phases.

Workload: the decode-heavy one (128 requests sharing an 8K-token cached context, Llama-3.2-1B
shape, random bf16 weights); after admission and prefill, 30 decode steps are profiled in the
calling thread, with plain decode and with cascade. Prints the milliseconds per step and the
top functions by own time (CUDA launches show up as the Python calls that make them).

`--phases` instead times the step's parts with perf_counter (no profiler overhead): host
microseconds per step in scheduling, step inputs, the pending-token gather, graph replay
(attention plan, input copies, launch), sampling launch and resolving (the wait for the
sampled ids is timed apart), next to the wall time per step and the GPU kernel time per step
(torch.profiler) with the kernels launched outside the graphs.

    python bench/profile_gpu_step.py [--top 14] [--cumulative 40] [--cascade-only] [--phases]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import Timer, kernel_times, make_model_dir  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.llm_engine import _Flight  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402


def _engine(model_dir: Path, steps: int, warm_steps: int = 3, **options):
    """The engine and its core after admission, prefill and two warm decode steps
    (`warm_steps` = 0: with the requests queued, nothing run)."""
    rng = random.Random(0)
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", kv_cache_tokens=8192 + 128 * 320,
        max_num_seqs=128, max_num_batched_tokens=16384, **options,
    )  # fmt: skip
    vocab = engine.model_config.vocab_size
    context = engine.register_token_chunk(
        [rng.randrange(10, vocab) for _ in range(8192)], ChunkType.SYSTEM_PROMPT
    )
    # the context cached first, on the engine's thread; then the core is driven from this one
    engine.generate([PreparedPrompt((context,), (11, 12))], SamplingParams(max_tokens=2))
    core = engine._core
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for _ in range(128):
        question = tuple(rng.randrange(10, vocab) for _ in range(32))
        core.add_request(PreparedPrompt((context,), question), params, steps + 8, False)
    for _ in range(warm_steps):  # admission + prefill, then warm decode steps
        core.step()
    return engine, core


def prefill(model_dir: Path, top: int = 40, **options) -> None:
    """cProfile of the step that admits the 128 requests and computes their questions (the
    context is cached by an earlier request), and its wall time to its sampled ids."""
    engine, core = _engine(model_dir, 8, warm_steps=0, **options)
    prof = cProfile.Profile()
    with Timer() as t:
        prof.enable()
        core.step()
        prof.disable()
    with Timer() as t2:
        core.step()  # the first decode step: it reads the prefill's ids
    print(f"\n{options}: prefill step {t.seconds * 1e3:.1f} ms (host, launched), "
          f"next step {t2.seconds * 1e3:.1f} ms")  # fmt: skip
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    engine.close()


def profile(
    model_dir: Path, steps: int = 30, top: int = 14, cumulative: int = 0, **options
) -> None:
    engine, core = _engine(model_dir, steps, **options)
    prof = cProfile.Profile()
    with Timer() as t:
        prof.enable()
        for _ in range(steps):
            core.step()
        prof.disable()
    print(f"\n{options}: {t.seconds / steps * 1000:.2f} ms per decode step")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    if cumulative:
        stats.sort_stats("cumulative").print_stats(cumulative)
    engine.close()


def phases(model_dir: Path, steps: int = 30, **options) -> None:
    """Host time per step by phase, wall per step and GPU kernel time per step."""
    engine, core = _engine(model_dir, 3 * steps + 8, **options)
    runner = core.runner
    acc: dict[str, float] = defaultdict(float)
    saved = []

    def wrap(owner, name: str, key: str) -> None:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t0

        setattr(owner, name, timed)

    wrap(core.scheduler, "schedule", "schedule")
    wrap(runner, "prepare", "step inputs")
    wrap(runner, "_gather_pending", "pending gather")
    if runner.graphs is not None:
        wrap(runner.graphs, "can_run", "graph layout")
        wrap(runner.graphs, "run", "graph plan+replay")
    wrap(core, "_launch_sampling", "sampling launch")
    wrap(core, "_resolve", "resolve (incl. wait)")
    wrap(_Flight, "tokens", "wait for ids")
    with Timer() as t:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    wall = t.seconds / steps * 1e6
    print(f"\n{options or 'defaults'}: wall {wall:.0f} us per decode step")
    host = sum(v for k, v in acc.items() if k != "wait for ids") / steps * 1e6
    for key, value in acc.items():
        print(f"  {key:22s} {value / steps * 1e6:7.0f} us")
    print(f"  {'other (step itself)':22s} {wall - host:7.0f} us (wall - phases)")
    for owner, name, fn in saved:
        if name == "tokens":
            setattr(owner, name, fn)
        else:
            delattr(owner, name)
    rows = kernel_times(core, steps)
    gpu = sum(r["us"] for r in rows)
    print(f"  GPU kernels {gpu:.0f} us per step; wall / GPU = {wall / gpu:.2f}")
    for r in rows[:25]:
        print(f"    {r['us']:7.1f} us  {r['calls']:5.1f} x  {r['kernel'][:90]}")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=14, help="functions by own time")
    parser.add_argument("--cumulative", type=int, default=0, help="functions by cumulative time")
    parser.add_argument("--cascade-only", action="store_true")
    parser.add_argument("--phases", action="store_true", help="time phases, no cProfile")
    parser.add_argument("--prefill", action="store_true", help="cProfile of the prefill step")
    args = parser.parse_args()
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    shown = {} if args.phases else dict(top=args.top, cumulative=args.cumulative)
    run = phases if args.phases else profile
    if args.prefill:
        run, shown = prefill, dict(top=args.top)
    if not args.cascade_only:
        run(model_dir, cascade=False, **shown)
    run(model_dir, **shown)


if __name__ == "__main__":
    main()
