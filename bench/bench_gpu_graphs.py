"""Decode steps on the GPU: wall time vs GPU kernel time, eager vs CUDA graphs, plain vs cascade.

Workloads: 32 requests x 8K, 128 x 8K and 128 x 32K shared cached context tokens (one context
chunk, cached once), a 32-token question each, greedy, end of sequence ignored; Llama-3.2-1B
shape with random bf16 weights (bench/gpu_common.py). One engine (cascade on, max 3 levels);
"plain" plans every step without shared levels (`min_shared_tokens` above any saving),
"cascade" shares wherever it saves any read (`min_shared_tokens=0`). "graphs" replays decode
steps from CUDA graphs (engine/cuda_graph.py, wired into the runner here as the model runner will
be). Per workload and mode, after warm-up steps (graph captures included):

- wall: milliseconds per `LLMEngine.step()` over 20 steps (the step ends with the sampled
  tokens on the host, so host and GPU are in step),
- GPU: the sum of CUDA kernel (and copy) times from torch.profiler over 8 steps, per step,
- the ratio wall / GPU, the issue's target being <= 1.3 at batch >= 32.

At 128 x 8K it also prints, for graph-replayed steps, where the host time of a step goes (host
clocks around the step's parts; "sample" includes waiting for the GPU) and the GPU kernels by
time per step.

    python bench/bench_gpu_graphs.py   # writes $OUT/gpu_graphs.json
"""

from __future__ import annotations

import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from gpu_common import Timer, gpu_ms_per_step, make_model_dir, write_json  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

WORKLOADS = [(32, 8192), (128, 8192), (128, 32768)]
MODES = [("plain", False), ("plain", True), ("cascade", False), ("cascade", True)]
WARM, TIMED, PROFILED = 3, 20, 8
QUESTION = 32
BREAKDOWN = 10
MAX_TOKENS = len(MODES) * (WARM + TIMED + PROFILED) + 2 * (BREAKDOWN + PROFILED + 2) + 8


def _wrap(owner, attr: str, label: str, acc: dict):
    """Time every call of owner.attr into acc[label]; returns the undo."""
    is_class = isinstance(owner, type)
    original = owner.__dict__.get(attr) if is_class else getattr(owner, attr)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - start

    had_own = attr in vars(owner)
    setattr(owner, attr, timed)
    if is_class:
        return lambda: setattr(owner, attr, original)
    return (lambda: setattr(owner, attr, original)) if had_own else (lambda: delattr(owner, attr))


def host_breakdown(core, graphs, steps: int) -> None:
    import flashinfer

    from cascade_rag.attention.flashinfer_graph import DecodeGraphAttention
    from cascade_rag.engine.cuda_graph import CudaGraph

    acc = defaultdict(float)
    parts = [
        (core.scheduler, "schedule", "schedule"),
        (core.runner, "prepare", "runner.prepare (step inputs, metadata)"),
        (graphs, "can_run", "graphs.can_run (padded layout)"),
        (DecodeGraphAttention, "plan", "DecodeGraphAttention.plan"),
        (flashinfer.BatchDecodeWithPagedKVCacheWrapper, "plan", "  of which FlashInfer decode"),
        (flashinfer.BatchPrefillWithPagedKVCacheWrapper, "plan", "  of which FlashInfer shared"),
        (DecodeGraphAttention, "set_slots", "DecodeGraphAttention.set_slots"),
        (graphs, "_set_inputs", "graphs._set_inputs"),
        (CudaGraph, "replay", "graph launch"),
        (core, "_sample", "engine._sample (waits for the GPU)"),
        (core.scheduler, "finish_step", "scheduler.finish_step"),
    ]
    undo = [_wrap(owner, attr, label, acc) for owner, attr, label in parts]
    shared_plans = sum(a.num_shared_plans for a in graphs._attention.values())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    total = time.perf_counter() - start
    for u in reversed(undo):
        u()
    shared_plans = sum(a.num_shared_plans for a in graphs._attention.values()) - shared_plans
    top = sum(v for k, v in acc.items() if not k.startswith(" "))
    print(f"host breakdown, ms per step ({steps} steps; shared-level plans made: {shared_plans})")
    for _, _, label in parts:
        print(f"  {label:45s} {acc[label] * 1000 / steps:7.3f}")
    print(f"  {'rest of LLMEngine.step':45s} {(total - top) * 1000 / steps:7.3f}")
    print(f"  {'step':45s} {total * 1000 / steps:7.3f}")


def top_kernels(core, steps: int, k: int = 14) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    by_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_name[e.name][0] += e.time_range.elapsed_us()
            by_name[e.name][1] += 1
    total = sum(v[0] for v in by_name.values()) / steps
    print(f"GPU kernels, us per step (total {total:.0f} us):")
    for name, (us, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:k]:
        print(f"  {us / steps:8.1f} us  {calls / steps:5.1f}x  {name[:100]}")


def main() -> None:
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    pages_per_request = -(-(QUESTION + MAX_TOKENS) // 16) + 1
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", max_num_seqs=128,
        kv_cache_tokens=8192 + 32768 + 128 * 16 * pages_per_request + 4096,
        max_num_batched_tokens=40000, max_cascade_levels=3,
    )  # fmt: skip
    core = engine._core
    runner = core.runner
    graphs = runner.graphs  # the engine's own; set to None for the eager rows
    assert graphs is not None, "no decode graphs on this machine"
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    contexts = {}
    results = []
    for batch, ctx in WORKLOADS:
        if ctx not in contexts:
            ids = [rng.randrange(10, vocab) for _ in range(ctx)]
            contexts[ctx] = engine.register_token_chunk(ids, ChunkType.SYSTEM_PROMPT)
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        seqs = []
        for _ in range(batch):
            question = tuple(rng.randrange(10, vocab) for _ in range(QUESTION))
            prompt = PreparedPrompt((contexts[ctx],), question)
            seqs.append(core.add_request(prompt, params, MAX_TOKENS, False))
        runner.graphs = None
        for _ in range(3):  # admission and prefill
            core.step()
        for name, use_graphs in MODES:
            runner.min_shared_tokens = 0 if name == "cascade" else 1 << 50
            runner.graphs = graphs if use_graphs else None
            for _ in range(WARM):
                core.step()
            replays = graphs.num_replays
            with Timer() as t:
                for _ in range(TIMED):
                    core.step()
            wall = t.seconds * 1000 / TIMED
            replayed = graphs.num_replays - replays
            gpu = gpu_ms_per_step(core, PROFILED)
            row = dict(batch=batch, context=ctx, mode=name, graphs=use_graphs, wall_ms=wall,
                       gpu_ms=gpu, ratio=wall / gpu, replayed_steps=replayed)  # fmt: skip
            results.append(row)
            print(
                f"{batch} x {ctx} {name} graphs={use_graphs}: wall {wall:.2f} ms, "
                f"GPU {gpu:.2f} ms, ratio {wall / gpu:.2f}, replayed {replayed}/{TIMED}"
            )
        if batch == 128 and ctx == 8192:  # where a graph step's time goes
            runner.graphs = graphs
            for name in ("plain", "cascade"):
                runner.min_shared_tokens = 0 if name == "cascade" else 1 << 50
                for _ in range(2):
                    core.step()
                print(f"\n{name} + graphs, {batch} x {ctx}:")
                host_breakdown(core, graphs, BREAKDOWN)
                top_kernels(core, PROFILED)
        for seq in seqs:
            core.abort(seq)
        runner.graphs = None
    write_json("gpu_graphs.json", dict(results=results, captures=graphs.num_captures))
    engine.close()
    print("\nLlama-3.2-1B shape, bf16, shared cached context, 32-token questions; per decode step")
    print("| batch x context | mode | eager wall / GPU ms | graphs wall / GPU ms | graphs ratio |")
    print("|---|---|---|---|---|")
    by = {(r["batch"], r["context"], r["mode"], r["graphs"]): r for r in results}
    for batch, ctx in WORKLOADS:
        for name in ("plain", "cascade"):
            e, g = by[(batch, ctx, name, False)], by[(batch, ctx, name, True)]
            print(f"| {batch} x {ctx // 1024}K | {name} | {e['wall_ms']:.2f} / {e['gpu_ms']:.2f} "
                  f"| {g['wall_ms']:.2f} / {g['gpu_ms']:.2f} | {g['ratio']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"bench: {time.perf_counter() - start:.0f} s")
