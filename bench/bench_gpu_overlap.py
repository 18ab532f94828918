"""Decode steps on the GPU with and without overlap: wall time per step vs GPU kernel time.

Workloads: 32 and 128 requests over 8K shared cached context tokens (one context chunk), a
32-token question each, greedy, end of sequence ignored; Llama-3.2-1B shape with random bf16
weights (bench/gpu_common.py); cascade (`min_shared_tokens=0`) and decode CUDA graphs as the
engine wires them. One engine; `LLMEngine.overlap` is switched between phases (a step with
overlap off first reads the step in flight, so switching is safe). Per workload and mode, after
warm-up steps:

- wall: milliseconds per `LLMEngine.step()` over 30 steps, ended by a device sync (with overlap
  a step returns before its tokens are read, so the mean over many steps is the throughput),
- GPU: the sum of CUDA kernel (and copy) times from torch.profiler over 8 steps, per step,
- the ratio wall / GPU; the issue's target is <= 1.3.

It also checks that both modes give the same tokens from a fresh batch of 37 requests.

    python bench/bench_gpu_overlap.py   # writes $OUT/gpu_overlap.json
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from gpu_common import gpu_ms_per_step, make_model_dir, write_json  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

WORKLOADS = [(32, 8192), (128, 8192)]
WARM, TIMED, PROFILED = 5, 30, 8
QUESTION = 32
MAX_TOKENS = 2 * (WARM + TIMED + PROFILED) + 16


def wall_ms_per_step(core, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / steps


def run_all(core, prompts, params) -> list[list[int]]:
    seqs = [core.add_request(p, params, params.max_tokens, False) for p in prompts]
    while core.has_work():
        core.step()
    return [s.generated_ids for s in seqs]


def main() -> None:
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    pages_per_request = -(-(QUESTION + MAX_TOKENS) // 16) + 1
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", max_num_seqs=128,
        kv_cache_tokens=8192 + 128 * 16 * pages_per_request + 4096,
        max_num_batched_tokens=40000, max_cascade_levels=3, overlap=False,
    )  # fmt: skip
    core = engine._core
    core.runner.min_shared_tokens = 0
    assert core.runner.graphs is not None, "no decode graphs on this machine"
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    context = engine.register_token_chunk(
        [rng.randrange(10, vocab) for _ in range(8192)], ChunkType.SYSTEM_PROMPT
    )

    def prompts(n: int) -> list[PreparedPrompt]:
        return [
            PreparedPrompt((context,), tuple(rng.randrange(10, vocab) for _ in range(QUESTION)))
            for _ in range(n)
        ]

    results = []
    for batch, ctx in WORKLOADS:
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        for p in prompts(batch):
            core.add_request(p, params, MAX_TOKENS, False)
        for _ in range(3):  # admission and prefill
            core.step()
        for overlap in (False, True):
            core.overlap = overlap
            for _ in range(WARM):
                core.step()
            wall = wall_ms_per_step(core, TIMED)
            gpu = gpu_ms_per_step(core, PROFILED)
            row = dict(batch=batch, context=ctx, overlap=overlap, wall_ms=round(wall, 3),
                       gpu_ms=round(gpu, 3), ratio=round(wall / gpu, 3))  # fmt: skip
            results.append(row)
            print(
                f"{batch:4d} x {ctx:5d}  overlap={overlap!s:5s}  wall {wall:7.3f} ms/step  "
                f"GPU {gpu:7.3f} ms/step  wall/GPU {wall / gpu:5.2f}",
                flush=True,
            )
        core.overlap = False
        for seq in list(core.scheduler.running) + list(core.scheduler.waiting):
            core.abort(seq)
        while core.has_work():
            core.step()

    check = prompts(37)
    greedy = SamplingParams(max_tokens=64, ignore_eos=True)
    tokens = {}
    for overlap in (False, True):
        core.overlap = overlap
        tokens[overlap] = run_all(core, check, greedy)
    same = sum(a == b for a, b in zip(tokens[False], tokens[True]))
    print(f"same tokens with overlap on and off: {same} of {len(check)} requests")
    write_json("gpu_overlap.json", dict(results=results, same_tokens=same, requests=len(check)))
    engine.close()


if __name__ == "__main__":
    main()
