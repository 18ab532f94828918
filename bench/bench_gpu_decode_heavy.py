"""Decode-heavy serving on the GPU: cascade vs plain decode with the shared context cached.

Workload: 128 requests sharing one 8,192-token context (a system prompt and documents, cached
once as chunks), each with its own 32-token question, 256 new tokens each (greedy, end of
sequence ignored). Model: Llama-3.2-1B shape with random bf16 weights built so that every
greedy token leads by a wide margin (`gpu_common.make_peaked_model_dir`: token comparisons
between systems then test the systems, not bf16 rounding at near ties). Systems, in one process:
the engine with chunk caching and plain paged decode, and the same with cascade decode (the
shared context read once per step for the whole batch). Reports output tokens/s (best of two
runs each) and the ratio.

    python bench/bench_gpu_decode_heavy.py   # writes $OUT/decode_heavy.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import make_peaked_model_dir, timed_generate, write_json  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

NUM_REQUESTS, CONTEXT_TOKENS, QUESTION_TOKENS, NEW_TOKENS = 128, 8192, 32, 256


def run(model_dir, vocab: int, **options) -> dict:
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
    times, outs, steps = timed_generate(engine, prompts, params, repeats=2)
    engine.close()
    tokens = sum(len(o.token_ids) for o in outs)
    seconds = min(times)
    return dict(seconds=seconds, output_tokens_per_s=tokens / seconds, steps=steps,
                token_ids=[o.token_ids for o in outs])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/cascade-rag-llama1b-peaked")
    args = parser.parse_args()
    model_dir = make_peaked_model_dir(args.model_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    plain = run(model_dir, vocab, cascade=False)
    cascade = run(model_dir, vocab)
    same = sum(a == b for a, b in zip(plain.pop("token_ids"), cascade.pop("token_ids")))
    ratio = cascade["output_tokens_per_s"] / plain["output_tokens_per_s"]
    write_json("decode_heavy.json", dict(plain=plain, cascade=cascade, cascade_x_plain=ratio,
                                         same_tokens=same / NUM_REQUESTS))  # fmt: skip
    print(
        f"decode-heavy: {NUM_REQUESTS} requests sharing {CONTEXT_TOKENS} cached tokens, "
        f"{QUESTION_TOKENS}-token questions, {NEW_TOKENS} new tokens; Llama-3.2-1B shape, bf16"
    )
    print("| system | s | output tok/s | steps |")
    print("|---|---|---|---|")
    for name, r in (("plain decode", plain), ("cascade decode", cascade)):
        print(f"| {name} | {r['seconds']:.2f} | {r['output_tokens_per_s']:.0f} | {r['steps']} |")
    print(f"cascade / plain: {ratio:.2f}x; identical tokens in {same}/{NUM_REQUESTS} requests")


if __name__ == "__main__":
    main()
