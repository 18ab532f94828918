"""Decode steps on the GPU with and without overlap: wall time per step vs GPU kernel time.

Workloads (the issue's table): 32, 128 and 256 requests over 8K shared cached context tokens
and 128 over 32K (one context chunk), a 32-token question each, greedy, end of sequence
ignored; Llama-3.2-1B shape with random bf16 weights (bench/gpu_common.py); decode CUDA graphs
as the engine wires them; plain paged decode (`min_shared_tokens` set out of reach) and cascade
(`min_shared_tokens=0`). One engine; `runner.min_shared_tokens` and `LLMEngine.overlap` are
switched between phases (a step with overlap off first reads the step in flight, so switching
is safe). Per workload, attention mode and overlap setting, after warm-up steps:

- wall: milliseconds per `LLMEngine.step()` over 30 steps, ended by a device sync (with overlap
  a step returns before its tokens are read, so the mean over many steps is the throughput),
- GPU: the sum of CUDA kernel (and copy) times from torch.profiler over 8 steps, per step,
- the ratio wall / GPU; the issue's target is <= 1.3.

It also checks that both modes give the same tokens from a fresh batch of 37 requests.

    python bench/bench_gpu_overlap.py                  # writes $OUT/gpu_overlap.json
    python bench/bench_gpu_overlap.py --workloads 32x8192 128x8192
"""

from __future__ import annotations

import argparse
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

WORKLOADS = ["32x8192", "128x8192", "256x8192", "128x32768"]
WARM, TIMED, PROFILED = 5, 30, 8
QUESTION = 32
PLAIN = 1 << 40  # min_shared_tokens no shared level reaches
PHASES = [(mode, overlap) for mode in ("plain", "cascade") for overlap in (False, True)]
MAX_TOKENS = len(PHASES) * (WARM + TIMED + PROFILED) + 16


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, help="BATCHxCONTEXT")
    args = parser.parse_args()
    workloads = [tuple(int(v) for v in w.lower().split("x")) for w in args.workloads]
    max_batch = max(b for b, _ in workloads)
    contexts = sorted({c for _, c in workloads})
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    pages_per_request = -(-(QUESTION + MAX_TOKENS) // 16) + 1
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", max_num_seqs=max_batch,
        kv_cache_tokens=sum(contexts) + max_batch * 16 * pages_per_request + 4096,
        max_num_batched_tokens=max(40000, max(contexts) + 1024), max_cascade_levels=3,
        overlap=False,
    )  # fmt: skip
    core = engine._core
    assert core.runner.graphs is not None, "no decode graphs on this machine"
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    context = {
        c: engine.register_token_chunk(
            [rng.randrange(10, vocab) for _ in range(c)], ChunkType.SYSTEM_PROMPT
        )
        for c in contexts
    }

    def prompts(n: int, ctx: int) -> list[PreparedPrompt]:
        return [
            PreparedPrompt(
                (context[ctx],), tuple(rng.randrange(10, vocab) for _ in range(QUESTION))
            )
            for _ in range(n)
        ]

    results = []
    for batch, ctx in workloads:
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        seqs = [core.add_request(p, params, MAX_TOKENS, False) for p in prompts(batch, ctx)]
        while not all(s.generated_ids for s in seqs):
            core.step()  # admission and prefill
        for _ in range(3):
            core.step()
        for mode, overlap in PHASES:
            core.runner.min_shared_tokens = PLAIN if mode == "plain" else 0
            core.overlap = overlap
            for _ in range(WARM):
                core.step()
            wall = wall_ms_per_step(core, TIMED)
            gpu = gpu_ms_per_step(core, PROFILED)
            row = dict(batch=batch, context=ctx, mode=mode, overlap=overlap,
                       wall_ms=round(wall, 3), gpu_ms=round(gpu, 3),
                       ratio=round(wall / gpu, 3))  # fmt: skip
            results.append(row)
            print(
                f"{batch:4d} x {ctx:5d}  {mode:7s}  overlap={overlap!s:5s}  wall {wall:7.3f} "
                f"ms/step  GPU {gpu:7.3f} ms/step  wall/GPU {wall / gpu:5.2f}",
                flush=True,
            )
        core.overlap = False
        core.runner.min_shared_tokens = 0
        for seq in list(core.scheduler.running) + list(core.scheduler.waiting):
            core.abort(seq)
        while core.has_work():
            core.step()

    check = prompts(37, contexts[0])
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
