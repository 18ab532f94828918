"""Host cost of admitting a request (validate, chunk, register) before it reaches the engine
core, per request, for prompts that reuse registered chunks (CPU, a tiny random model: the
model is never run).

Cases: 128 `PreparedPrompt`s over one registered 8,192-token chunk plus a 32-token question
each, and 64 `Composition`s over 4 of 8 registered ~600-token text passages. A request that
reuses registered chunk objects should cost its own tokens, not a pass over every chunk token.
Then, in the engine: milliseconds from `generate` on the 128 prepared prompts to the engine's
first step (validation, registration, `add_request` on the engine thread), and the first
step's `schedule()` (admission of all 128: cache lookups, pages, block-table rows); median of 7.

    python bench/bench_admission.py
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time

import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.composition import Composition
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.testing import save_random_llama


def ms_per_request(engine: CascadeEngine, prompts: list, params: SamplingParams) -> float:
    start = time.perf_counter()
    engine._make_requests([(p, params, None) for p in prompts], stream_text=False)
    return (time.perf_counter() - start) * 1000 / len(prompts)


def engine_admission_ms(engine: CascadeEngine, make_prompts, runs: int = 7) -> tuple:
    """Median ms from `generate` to the first core step, and of that step's `schedule()`."""
    core = engine._core
    step, schedule = core.step, core.scheduler.schedule
    starts, schedules = [], []

    def timed_step():
        starts.append(time.perf_counter())
        return step()

    def timed_schedule():
        t = time.perf_counter()
        plan = schedule()
        schedules.append(time.perf_counter() - t)
        return plan

    core.step, core.scheduler.schedule = timed_step, timed_schedule
    to_first, first_schedule = [], []
    try:
        for _ in range(runs):
            prompts = make_prompts()
            starts.clear()
            schedules.clear()
            t0 = time.perf_counter()
            engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
            to_first.append(starts[0] - t0)
            first_schedule.append(schedules[0])
    finally:
        core.step, core.scheduler.schedule = step, schedule
    return statistics.median(to_first) * 1e3, statistics.median(first_schedule) * 1e3


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_llama(
            tmp, dtype=torch.float32, hidden_size=64, intermediate_size=128,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            max_position_embeddings=16384,
        )  # fmt: skip
        engine = CascadeEngine(str(model_dir), dtype="float32", device="cpu",
                               max_num_seqs=128, kv_cache_tokens=8192 + 128 * 320)  # fmt: skip
        rng = random.Random(0)
        vocab = engine.vocab_size
        context = engine.register_token_chunk(
            [rng.randrange(10, vocab) for _ in range(8192)], ChunkType.SYSTEM_PROMPT
        )
        prepared = [
            PreparedPrompt((context,), tuple(rng.randrange(10, vocab) for _ in range(32)))
            for _ in range(128)
        ]
        docs = [
            engine.register_chunk(" ".join(f"word{rng.randrange(1000)}" for _ in range(300)))
            for _ in range(8)
        ]
        comps = [Composition(query=f"question {i}?", chunks=docs[i % 4 : i % 4 + 4])
                 for i in range(64)]  # fmt: skip
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        print("admission, ms per request (validate + chunk + register; nothing is run)")
        print(f"  128 prepared prompts over one 8,192-token chunk: "
              f"{ms_per_request(engine, prepared, params):.3f}")  # fmt: skip
        print(f"  64 compositions over 4 registered passages:      "
              f"{ms_per_request(engine, comps, params):.3f}")  # fmt: skip
        engine.generate(prepared[:1], params)  # the chunk's KV cached

        def questions():
            return [PreparedPrompt((context,), tuple(rng.randrange(10, vocab) for _ in range(32)))
                    for _ in range(128)]  # fmt: skip

        to_first, first_schedule = engine_admission_ms(engine, questions)
        print(f"engine, 128 prepared prompts: generate -> first step {to_first:.1f} ms; "
              f"first schedule() {first_schedule:.1f} ms (median of 7)")  # fmt: skip
        engine.close()


if __name__ == "__main__":
    main()
