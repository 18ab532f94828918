"""Where the time of a reuse-anywhere question goes on the CPU: cProfile of its prefill step.

The stream of bench_reuse_speed.py (48 questions over 12 documents, 3 retrieved each), default
model, float32: the first 16 questions warm the chunk cache, then the other 32 (whose
documents have all been seen, in other orders) are run one at a time through the engine core
in this thread, prefill and first token only. Prints the mean milliseconds per question and
the functions by own time.

    python bench/profile_reuse_ttft.py [--recompute 24] [--top 18]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reuse_qa  # noqa: E402
import torch  # noqa: E402
from bench_reuse_speed import KV_CACHE_TOKENS, stream_composition  # noqa: E402

from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.models.loader import load_model  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

WARM = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recompute", type=int, default=24)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    engine = CascadeEngine(
        load_model(dtype=torch.float32), kv_cache_tokens=KV_CACHE_TOKENS,
        chunk_reuse="anywhere", recompute_tokens=args.recompute,
    )  # fmt: skip
    one = SamplingParams(max_tokens=1)
    stream = reuse_qa.stream()
    for q in stream[:WARM]:
        engine.generate(stream_composition(q), one)
    core = engine._worker.core
    questions = stream[WARM:]

    def run() -> float:
        total = 0.0
        with engine._worker.core_lock:  # the worker thread stays out of the core
            for q in questions:
                prepared = engine.prepare(stream_composition(q))
                start = time.perf_counter()
                core.add_request(prepared, one, 1, False)
                while core.has_work():
                    core.step()
                total += time.perf_counter() - start
        return total * 1000 / len(questions)

    print(f"recompute_tokens={args.recompute}: {run():.1f} ms per question (no profiler)")
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    engine.close()


if __name__ == "__main__":
    main()
