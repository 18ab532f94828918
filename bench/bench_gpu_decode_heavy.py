"""Decode-heavy serving on the GPU: cascade vs plain decode with the shared context cached.

Workload: 128 requests sharing one 8,192-token context (a system prompt and documents, cached
once as chunks), each with its own 32-token question, 256 new tokens each (greedy, end of
sequence ignored). Model: Llama-3.2-1B shape with random bf16 weights built so that every
greedy token leads by a wide margin (`gpu_common.make_peaked_model_dir`: token comparisons
between systems then test the systems, not bf16 rounding at near ties). Systems, in one process:
the engine with chunk caching and plain paged decode, and the same with cascade decode (the
shared context read once per step for the whole batch). Reports output tokens/s (median of
three runs each) and the ratio.

    python bench/bench_gpu_decode_heavy.py   # writes $OUT/decode_heavy.json
    python bench/bench_gpu_decode_heavy.py --variants "" shared_pieces=1,short_last_tokens=none
    python bench/bench_gpu_decode_heavy.py --page-size 64   # both systems' KV page size

`--variants`: decode-graph attention settings (`DecodeGraphAttention` keyword arguments, as in
profile_gpu_kernels.py) for the cascade rows; plain decode runs with the first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import (  # noqa: E402
    graph_options,
    make_peaked_model_dir,
    parse_graph_options,
    timed_generate,
    write_json,
)

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

NUM_REQUESTS, CONTEXT_TOKENS, QUESTION_TOKENS, NEW_TOKENS = 128, 8192, 32, 256


def run(model_dir, vocab: int, graph: str = "", **options) -> dict:
    # graph attention objects are made on first use: the settings stay on for the whole run
    with graph_options(**parse_graph_options(graph)):
        return _run(model_dir, vocab, **options)


def _run(model_dir, vocab: int, **options) -> dict:
    rng = random.Random(0)
    engine = CascadeEngine(
        str(model_dir),
        dtype="bfloat16",
        device="cuda",
        kv_cache_tokens=CONTEXT_TOKENS + NUM_REQUESTS * 320,
        max_num_seqs=NUM_REQUESTS,
        max_num_batched_tokens=16384,
        **options,
    )
    context = engine.register_token_chunk(
        [rng.randrange(10, vocab) for _ in range(CONTEXT_TOKENS)], ChunkType.SYSTEM_PROMPT
    )
    prompts = [
        PreparedPrompt((context,), tuple(rng.randrange(10, vocab) for _ in range(QUESTION_TOKENS)))
        for _ in range(NUM_REQUESTS)
    ]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up; caches the context
    # the context stays cached; each run decodes the whole batch again
    times, outs, steps = timed_generate(engine, prompts, params, repeats=3)
    timeline = engine.last_timeline
    engine.close()
    tokens = sum(len(o.token_ids) for o in outs)
    seconds = statistics.median(times)
    return dict(seconds=seconds, runs=times, output_tokens_per_s=tokens / seconds, steps=steps,
                timeline=timeline, token_ids=[o.token_ids for o in outs])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/cascade-rag-llama1b-peaked")
    parser.add_argument("--variants", nargs="+", default=[""])
    parser.add_argument("--page-size", type=int, default=16, help="KV page size, both systems")
    args = parser.parse_args()
    model_dir = make_peaked_model_dir(args.model_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    pages = dict(page_size=args.page_size)
    plain = run(model_dir, vocab, args.variants[0], cascade=False, **pages)
    plain_ids = plain.pop("token_ids")
    rows, result = [("plain decode", plain)], dict(plain=plain)
    for spec in args.variants:
        cascade = run(model_dir, vocab, spec, **pages)
        same = sum(a == b for a, b in zip(plain_ids, cascade.pop("token_ids")))
        cascade.update(x_plain=cascade["output_tokens_per_s"] / plain["output_tokens_per_s"],
                       same_tokens=same / NUM_REQUESTS)  # fmt: skip
        result["cascade" if not spec else f"cascade {spec}"] = cascade
        rows.append((f"cascade decode {spec}".strip(), cascade))
    write_json("decode_heavy.json", result)
    print(
        f"decode-heavy: {NUM_REQUESTS} requests sharing {CONTEXT_TOKENS} cached tokens, "
        f"{QUESTION_TOKENS}-token questions, {NEW_TOKENS} new tokens; Llama-3.2-1B shape, bf16, "
        f"page size {args.page_size}"
    )
    print("| system | s (median of 3) | output tok/s | steps | x plain | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        x = f"{r['x_plain']:.2f}x" if "x_plain" in r else ""
        same = f"{r['same_tokens'] * NUM_REQUESTS:.0f}/{NUM_REQUESTS}" if "x_plain" in r else ""
        print(f"| {name} | {r['seconds']:.3f} | {r['output_tokens_per_s']:.0f} | {r['steps']} "
              f"| {x} | {same} |")  # fmt: skip
    print("\nwhere the last run's time went (ms): before the first step | first step (prefill) "
          "| later steps (ms per step) | between steps | after the last step")  # fmt: skip
    for name, r in rows:
        t = r["timeline"]
        per = t["later_steps_s"] / max(t["later_steps"], 1)
        print(f"  {name}: {t['before_first_step'] * 1e3:.1f} | {t['first_step'] * 1e3:.1f} | "
              f"{t['later_steps_s'] * 1e3:.1f} ({per * 1e3:.3f}) | "
              f"{t['between_steps_s'] * 1e3:.1f} | {t['after_last_step'] * 1e3:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
