"""CPU speed of reuse anywhere against exact prefix reuse, in one process.

Workloads (float32, greedy, the same loaded model for every engine):

1. The 8-question RAG workload of bench_cpu_rag.py (system prompt + 3 of 6 shared ~300-token
   documents per question, 32 new tokens each, EOS ignored), all 8 submitted together on a
   cold cache (after a warm-up on unrelated prompts). Reported: seconds and prompt tokens
   computed, best of `--repeats` fresh engines per system, run alternately.
2. The one-question-at-a-time stream of bench/reuse_qa.py (48 questions over 12 documents, 3
   retrieved per question, every document at every position), on a cold cache, prefill only
   (one new token): mean time to first token over all questions and over the questions whose
   documents were all seen before (in other orders), and the prompt tokens computed. Every
   engine answers each question in turn (paired timings, so load drift hits all alike).

Systems: exact prefix reuse (the default engine) and `chunk_reuse="anywhere"` with each
`recompute_tokens` asked. Ratios are against exact reuse. Nothing is asserted.

Run: python bench/bench_reuse_speed.py [--recompute 0 24] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import bench_cpu_rag  # bench/ is on sys.path when run as a script
import reuse_qa
import torch

from cascade_rag.composition import Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.models.loader import load_model
from cascade_rag.sampling import SamplingParams

KV_CACHE_TOKENS = 32768


def systems(recompute: list[int]) -> list[tuple[str, dict]]:
    out = [("exact prefix", {})]
    out += [
        (f"anywhere k={k}", dict(chunk_reuse="anywhere", recompute_tokens=k)) for k in recompute
    ]
    return out


def rag8(loaded, options: dict) -> tuple[float, int]:
    """Cold-cache seconds and prompt tokens computed for the 8-question workload."""
    with CascadeEngine(loaded, kv_cache_tokens=KV_CACHE_TOKENS, **options) as engine:
        engine.generate(bench_cpu_rag.warmup_compositions(), bench_cpu_rag.greedy(4))
        before = engine.stats().computed_prompt_tokens
        start = time.perf_counter()
        engine.generate(bench_cpu_rag.compositions(), bench_cpu_rag.greedy())
        seconds = time.perf_counter() - start
        return seconds, engine.stats().computed_prompt_tokens - before


def stream_composition(q: reuse_qa.Question) -> Composition:
    return Composition(
        query=q.text, chunks=[reuse_qa.DOCS[d] for d in q.docs], system=reuse_qa.SYSTEM
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recompute", type=int, nargs="*", default=[0, 24])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    loaded = load_model(dtype=torch.float32)
    names = systems(args.recompute)
    print("Reuse-anywhere speed benchmark vs exact prefix reuse (float32 CPU)")
    print(
        f"model: {loaded.model_id}  cpu_count={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} "
        f"load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    # 1. the 8-question workload, cold, best of `repeats` per system (alternating)
    times: dict[str, list[float]] = {n: [] for n, _ in names}
    computed: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, options in names:
            seconds, tokens = rag8(loaded, options)
            times[name].append(seconds)
            computed[name] = tokens
    print(
        f"\n1. 8-question RAG workload (bench_cpu_rag.py: 8 x [system + 3 of 6 ~300-token "
        f"documents + question], {bench_cpu_rag.MAX_NEW_TOKENS} new tokens each), cold cache, "
        f"best of {args.repeats}"
    )
    header = f"{'system':16s} {'seconds':>8s} {'vs exact':>8s} {'prompt tok computed':>20s}"
    print(header)
    print("-" * len(header))
    base = min(times["exact prefix"])
    rows = []
    for name, _ in names:
        best = min(times[name])
        rows.append(dict(workload="rag8", system=name, seconds=best, computed=computed[name]))
        print(f"{name:16s} {best:8.2f} {base / best:7.2f}x {computed[name]:20d}")

    # 2. the stream, one question at a time, prefill only; paired per question
    stream = reuse_qa.stream()
    engines = [
        (name, CascadeEngine(loaded, kv_cache_tokens=KV_CACHE_TOKENS, **options))
        for name, options in names
    ]
    one = SamplingParams(max_tokens=1)
    for _, engine in engines:  # warm-up, sharing no chunk with the stream
        engine.generate(bench_cpu_rag.warmup_compositions(), one)
    start_tokens = {name: engine.stats() for name, engine in engines}
    ttft: dict[str, list[float]] = {name: [] for name, _ in engines}
    seen: set[int] = set()
    seen_before: list[bool] = []
    for q in stream:
        seen_before.append(all(d in seen for d in q.docs))
        seen.update(q.docs)
        comp = stream_composition(q)
        for name, engine in engines:
            t0 = time.perf_counter()
            engine.generate(comp, one)
            ttft[name].append(time.perf_counter() - t0)
    n_seen = sum(seen_before)
    print(
        f"\n2. stream: {len(stream)} questions one at a time over {len(reuse_qa.DOCS)} documents "
        f"(3 retrieved each, every document at every position), cold cache, prefill only; "
        f"{n_seen} questions have all their documents seen before"
    )
    header = (
        f"{'system':16s} {'mean TTFT ms':>12s} {'vs exact':>8s} {'seen-before ms':>14s} "
        f"{'vs exact':>8s} {'computed':>8s}"
    )
    print(header)
    print("-" * len(header))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    base_all = mean(ttft["exact prefix"])
    base_seen = mean([t for t, s in zip(ttft["exact prefix"], seen_before) if s])
    for name, engine in engines:
        stats, first = engine.stats(), start_tokens[name]
        frac = (stats.computed_prompt_tokens - first.computed_prompt_tokens) / (
            stats.prompt_tokens - first.prompt_tokens
        )
        all_ms = mean(ttft[name])
        seen_ms = mean([t for t, s in zip(ttft[name], seen_before) if s])
        rows.append(
            dict(
                workload="stream",
                system=name,
                mean_ttft_s=all_ms,
                seen_before_ttft_s=seen_ms,
                computed_fraction=frac,
            )
        )
        print(
            f"{name:16s} {1000 * all_ms:12.0f} {base_all / all_ms:7.2f}x {1000 * seen_ms:14.0f} "
            f"{base_seen / seen_ms:7.2f}x {frac:8.1%}"
        )
        engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=loaded.model_id, rows=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
