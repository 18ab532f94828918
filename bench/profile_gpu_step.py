"""Where a decode step's time goes on the GPU: cProfile of the engine core's steps.

Workload: the decode-heavy one (128 requests sharing an 8K-token cached context, Llama-3.2-1B
shape, random bf16 weights); after admission and prefill, 30 decode steps are profiled in the
calling thread, with plain decode and with cascade. Prints the milliseconds per step and the
top functions by own time (CUDA launches show up as the Python calls that make them).

    python bench/profile_gpu_step.py [--top 14] [--cumulative 40] [--cascade-only]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import Timer, make_model_dir  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402


def profile(
    model_dir: Path, steps: int = 30, top: int = 14, cumulative: int = 0, **options
) -> None:
    rng = random.Random(0)
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", kv_cache_tokens=8192 + 128 * 320,
        max_num_seqs=128, max_num_batched_tokens=16384, **options,
    )  # fmt: skip
    vocab = engine.model_config.vocab_size
    context = engine.register_token_chunk(
        [rng.randrange(10, vocab) for _ in range(8192)], ChunkType.SYSTEM_PROMPT
    )
    core = engine._core  # driven from this thread so that cProfile sees the step
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for _ in range(128):
        question = tuple(rng.randrange(10, vocab) for _ in range(32))
        core.add_request(PreparedPrompt((context,), question), params, steps + 8, False)
    for _ in range(3):  # admission + prefill, then warm decode steps
        core.step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=14, help="functions by own time")
    parser.add_argument("--cumulative", type=int, default=0, help="functions by cumulative time")
    parser.add_argument("--cascade-only", action="store_true")
    args = parser.parse_args()
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    shown = dict(top=args.top, cumulative=args.cumulative)
    if not args.cascade_only:
        profile(model_dir, cascade=False, **shown)
    profile(model_dir, **shown)


if __name__ == "__main__":
    main()
