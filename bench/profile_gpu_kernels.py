"""Which CUDA kernels a decode step spends its GPU time in (torch.profiler), plain vs cascade.

Workload: 128 requests sharing one 8K-token cached context (`--batch`, `--context`), a 32-token
question each, Llama-3.2-1B shape with random bf16 weights, decode CUDA graphs and overlap as
the engine wires them. After admission, prefill and warm-up, 8 decode steps are profiled per
mode; prints the kernels by total GPU time per step, so the gap between the GPU time and the
memory floor (weights + KV read once) can be put on named kernels.

    python bench/profile_gpu_kernels.py [--batch 128 --context 8192 --shared-backend fa3]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import kernel_times, make_model_dir, write_json  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

STEPS, TOP = 8, 18


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument(
        "--shared-backend", default=None, help="FlashInfer prefill backend of the graphs' shared "
        "levels, e.g. fa3 (default: the engine's)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=TOP)
    args = parser.parse_args()
    if args.shared_backend is not None:
        from cascade_rag.attention.flashinfer_graph import DecodeGraphAttention

        init = DecodeGraphAttention.__init__

        def with_backend(self, *a, **kw):
            kw.setdefault("shared_backend", args.shared_backend)
            init(self, *a, **kw)

        DecodeGraphAttention.__init__ = with_backend
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
    for mode, min_shared in (("plain", 1 << 40), ("cascade", 0)):
        core.runner.min_shared_tokens = min_shared
        for _ in range(10):
            core.step()
        rows = kernel_times(core, STEPS)
        total = sum(r["us"] for r in rows)
        result[mode] = dict(total_us=total, kernels=rows)
        print(f"{mode}: {args.batch} x {args.context}, GPU {total / 1000:.3f} ms per step")
        for r in rows[: args.top]:
            print(f"  {r['us']:8.1f} us  {r['calls']:5.1f}x  {r['kernel'][:110]}")
    write_json(f"gpu_kernels_{args.batch}x{args.context}_{args.shared_backend}.json", result)
    engine.close()


if __name__ == "__main__":
    main()
