"""Decode attention on the GPU: cascade vs plain paged decode, and what the engine picks.

Workload: one decode step of one attention layer (FlashInfer, bf16, 32 query heads, 8 KV heads,
head_dim 64 as in Llama-3.2-1B, page size 16): `batch` requests share a `shared`-token prefix
and each has 256 tokens of its own; batch in {16, 64, 256} x shared in {2K, 8K, 32K}.
Systems, in one process: plain paged decode (one level, every request reads the whole prefix),
two-level cascade (the shared prefix read once), and the engine's choice (the cascade planner
with the backend's calibrated `min_shared_tokens`). Times are medians over CUDA-event timed
launches of plan-once / run-many, like a decode step reuses its plan in every layer.

    python bench/bench_gpu_decode_attention.py   # writes $OUT/decode_attention.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import write_json  # noqa: E402

from cascade_rag.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from cascade_rag.attention.metadata import AttentionMetadata  # noqa: E402
from cascade_rag.engine.cascade_plan import SeqView, plan_levels  # noqa: E402

NUM_QO, NUM_KV, HEAD_DIM, PAGE = 32, 8, 64, 16
UNIQUE = 256
DEV = torch.device("cuda")


def build(batch: int, shared: int):
    shared_pages = list(range(shared // PAGE))
    nxt = len(shared_pages)
    views = []
    for _ in range(batch):
        own = list(range(nxt, nxt + UNIQUE // PAGE))
        nxt += len(own)
        views.append(SeqView(shared_pages + own, shared + UNIQUE, 1))
    slots = [v.page_table[-1] * PAGE + PAGE - 1 for v in views]
    return views, slots, nxt


def time_backend(backend, meta, q, k, v, kc, vc, iters: int = 50) -> float:
    backend.plan(meta)
    for _ in range(5):
        backend.forward(q, k, v, kc, vc)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backend.forward(q, k, v, kc, vc)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    backend = FlashInferAttention(NUM_QO, NUM_KV, HEAD_DIM, PAGE, torch.bfloat16, DEV, 3)
    auto = FlashInferAttention(
        NUM_QO, NUM_KV, HEAD_DIM, PAGE, torch.bfloat16, DEV, 3, shared_backend="auto"
    )
    threshold = backend.min_shared_tokens
    rows = []
    for batch in (16, 64, 256):
        for shared in (2048, 8192, 32768):
            views, slots, num_pages = build(batch, shared)
            kc = torch.randn(num_pages, PAGE, NUM_KV, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            q = torch.randn(batch, NUM_QO, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(batch, NUM_KV, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            empty = torch.zeros(0, dtype=torch.int64, device=DEV)
            slot_mapping = torch.tensor(slots, device=DEV)

            def meta(levels, min_shared=0, views=views, slot_mapping=slot_mapping, empty=empty):
                lv = plan_levels(views, PAGE, levels, min_shared_tokens=min_shared)
                return AttentionMetadata(PAGE, slot_mapping, empty, empty, lv), len(lv)

            plain_meta, _ = meta(1)
            cascade_meta, _ = meta(2)
            chosen_meta, chosen_levels = meta(2, threshold)
            plain = time_backend(backend, plain_meta, q, k, v, kc, vc)
            cascade = time_backend(backend, cascade_meta, q, k, v, kc, vc)
            chosen = time_backend(backend, chosen_meta, q, k, v, kc, vc)
            cascade_auto = time_backend(auto, cascade_meta, q, k, v, kc, vc)
            rows.append(
                dict(
                    batch=batch,
                    shared=shared,
                    plain_ms=plain,
                    cascade_ms=cascade,
                    cascade_auto_backend_ms=cascade_auto,
                    chosen_ms=chosen,
                    chosen="cascade" if chosen_levels > 1 else "plain",
                    cascade_speedup=plain / cascade,
                    chosen_vs_plain=plain / chosen,
                )
            )
            del kc, vc
    write_json("decode_attention.json", dict(min_shared_tokens=threshold, rows=rows))
    print(
        f"decode attention, one layer, bf16, {NUM_QO}/{NUM_KV} heads x {HEAD_DIM}, page {PAGE}, "
        f"{UNIQUE} own tokens per request; engine threshold {threshold} shared tokens"
    )
    print(
        "| batch | shared | plain ms | cascade ms | cascade x| engine picks | engine ms | x plain|"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['shared']} | {r['plain_ms']:.3f} | {r['cascade_ms']:.3f} | "
            f"{r['cascade_speedup']:.2f}x | {r['chosen']} | {r['chosen_ms']:.3f} | "
            f"{r['chosen_vs_plain']:.2f}x |"
        )
    print("cascade with FlashInfer's auto prefill backend for the shared level (ms):")
    print(
        ", ".join(f"{r['batch']}x{r['shared']}: {r['cascade_auto_backend_ms']:.3f}" for r in rows)
    )


if __name__ == "__main__":
    main()
