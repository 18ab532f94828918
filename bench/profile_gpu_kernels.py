"""Which CUDA kernels a decode step spends its GPU time in (torch.profiler), plain vs cascade.

Workload: 128 requests sharing one 8K-token cached context (`--batch`, `--context`), a 32-token
question each, Llama-3.2-1B shape with random bf16 weights, decode CUDA graphs and overlap as
the engine wires them. After admission, prefill and warm-up, 8 decode steps are profiled per
mode; prints the kernels by total GPU time per step, so the gap between the GPU time and the
memory floor (weights + KV read once) can be put on named kernels.

    python bench/profile_gpu_kernels.py [--batch 128 --context 8192]
        [--variants "" shared_pieces=1,short_last_tokens=none shared_pieces=4,shared_backend=fa3]

Each `--variants` entry builds an engine whose decode graphs use those `DecodeGraphAttention`
settings; a table of GPU time by kernel kind (attention, merges, GEMMs, other) ends the output.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import (  # noqa: E402
    graph_options,
    kernel_times,
    make_model_dir,
    parse_graph_options,
    write_json,
)

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

STEPS, TOP = 8, 18


def _profile(args, options: dict, modes) -> dict:
    """Per-kernel GPU time per decode step for each mode, on an engine made with `options`
    (graph attention objects are made on first use: the options stay on for the whole run)."""
    with graph_options(**options):
        return _profile_engine(args, options, modes)


def _profile_engine(args, options: dict, modes) -> dict:
    model_dir = make_model_dir("/tmp/cascade-rag-llama1b")
    engine = CascadeEngine(
        str(model_dir), dtype="bfloat16", device="cuda", max_num_seqs=args.batch,
        kv_cache_tokens=args.context + args.batch * 16 * 16 + 4096,
        max_num_batched_tokens=max(16384, args.context + 1024), max_cascade_levels=3,
    )  # fmt: skip
    core = engine._core
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    context = engine.register_token_chunk(
        [rng.randrange(10, vocab) for _ in range(args.context)], ChunkType.SYSTEM_PROMPT
    )
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    seqs = [
        core.add_request(
            PreparedPrompt((context,), tuple(rng.randrange(10, vocab) for _ in range(32))),
            params,
            200,
            False,
        )  # fmt: skip
        for _ in range(args.batch)
    ]
    while not all(s.generated_ids for s in seqs):
        core.step()
    result = {}
    for mode in modes:
        core.runner.min_shared_tokens = 1 << 40 if mode == "plain" else 0
        for _ in range(10):
            core.step()
        rows = kernel_times(core, STEPS)
        total = sum(r["us"] for r in rows)
        result[mode] = dict(total_us=total, kernels=rows)
        print(f"{mode} {options}: {args.batch} x {args.context}, GPU {total / 1000:.3f} ms/step")
        for r in rows[: args.top]:
            print(f"  {r['us']:8.1f} us  {r['calls']:5.1f}x  {r['kernel'][:110]}")
    engine.close()
    return result


def _kind(kernel: str) -> str:
    for key, kind in (("MergeState", "merges"), ("Prefill", "attention"), ("Decode", "attention"),
                      ("nvjet", "GEMMs"), ("cublas", "GEMMs"), ("gemm", "GEMMs")):  # fmt: skip
        if key in kernel:
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument(
        "--variants", nargs="+", default=[""], help="decode-graph attention settings to compare, "
        "each a comma list such as shared_pieces=4,shared_backend=fa3,short_last_tokens=1024 "
        "('' = the engine's defaults); plain decode is profiled with the first only",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=TOP)
    args = parser.parse_args()
    result, summary = {}, []
    for i, spec in enumerate(args.variants):
        modes = ("plain", "cascade") if i == 0 else ("cascade",)
        runs = _profile(args, parse_graph_options(spec), modes)
        result[spec or "default"] = runs
        for mode, run in runs.items():
            kinds: dict[str, float] = {}
            for r in run["kernels"]:
                kinds[_kind(r["kernel"])] = kinds.get(_kind(r["kernel"]), 0.0) + r["us"]
            summary.append((mode, spec or "default", run["total_us"], kinds))
    name = f"gpu_kernels_{args.batch}x{args.context}.json"
    write_json(name, dict(batch=args.batch, context=args.context, runs=result))
    print(f"| mode | variant | GPU ms/step | attention | merges | GEMMs | other |  ({name})")
    print("|---|---|---|---|---|---|---|")
    for mode, spec, total, kinds in summary:
        parts = " | ".join(f"{kinds.get(k, 0.0) / 1000:.3f}"
                           for k in ("attention", "merges", "GEMMs", "other"))  # fmt: skip
        print(f"| {mode} | {spec} | {total / 1000:.3f} | {parts} |")


if __name__ == "__main__":
    main()
