"""Cost of grammar-constrained decoding: constrained vs unconstrained output tok/s, one process.

Workload (CPU, float32, default SmolLM2-135M-Instruct): chat prompts of ~40 tokens, 64 new
tokens each, greedy, at batch 1 and batch 16. The constrained rows decode under a JSON schema
(an array of at least 1000 short strings, so every row runs the full 64 tokens, as the
unconstrained rows do with `ignore_eos`); each step computes an llguidance mask for every
constrained row and applies them with one `masked_fill`. Each configuration runs `--repeats`
times, alternating constrained and unconstrained runs; the medians are compared. The time
llguidance spends computing masks is measured by timing `GrammarCompiler.fill_bitmask` in
the same runs (unpacking and applying the masks is in the ratio, not in that share).

    python bench/bench_constrained.py [--repeats 3] [--tokens 64]

Prints per batch size: tok/s unconstrained, tok/s constrained, their ratio, and the mask's
share of a constrained run. The target is a mask cost under 15% at batch 16.
"""

from __future__ import annotations

import argparse
import statistics
import time

from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import Constraint, SamplingParams

SCHEMA = {
    "type": "array",
    "items": {"type": "string", "maxLength": 12},
    "minItems": 1000,
}
TOPICS = [
    "rivers", "lanterns", "islands", "trams", "markets", "winter", "ships", "bridges",
    "gardens", "libraries", "mountains", "festivals", "bakeries", "harbours", "forests", "stars",
]  # fmt: skip


def prompts(batch: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"List short words about {TOPICS[i % len(TOPICS)]} as JSON."}]
        for i in range(batch)
    ]


def run(engine, batch: int, tokens: int, constrained: bool, timer: list[float]) -> float:
    """Output tok/s of one batch; appends the mask time to `timer`."""
    if constrained:
        params = SamplingParams(max_tokens=tokens, constraint=Constraint(json_schema=SCHEMA))
    else:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    compiler = engine._core.grammars
    original = compiler.fill_bitmask
    spent = [0.0]

    def timed(states):
        t0 = time.perf_counter()
        try:
            return original(states)
        finally:
            spent[0] += time.perf_counter() - t0

    compiler.fill_bitmask = timed
    try:
        t0 = time.perf_counter()
        outs = engine.generate(prompts(batch), params)
        elapsed = time.perf_counter() - t0
    finally:
        compiler.fill_bitmask = original
    generated = sum(o.usage.completion_tokens for o in outs)
    assert generated == batch * tokens, f"{generated} tokens, expected {batch * tokens}"
    timer.append(spent[0] / elapsed)
    return generated / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    engine = CascadeEngine(kv_cache_tokens=16384, max_model_len=1024)
    run(engine, 2, 8, True, [])  # warm-up: llguidance tokenizer, grammar compile, kernels
    run(engine, 2, 8, False, [])
    print(f"workload: ~40-token chat prompts, {args.tokens} new tokens, greedy, CPU float32")
    print("batch | unconstrained tok/s | constrained tok/s | ratio | mask share of run")
    for batch in (1, 16):
        plain, constrained, shares = [], [], []
        for _ in range(args.repeats):
            plain.append(run(engine, batch, args.tokens, False, []))
            constrained.append(run(engine, batch, args.tokens, True, shares))
        p, c = statistics.median(plain), statistics.median(constrained)
        share = statistics.median(shares)
        print(f"{batch:5d} | {p:19.1f} | {c:17.1f} | {c / p:5.3f} | {share:6.1%}")
    engine.close()


if __name__ == "__main__":
    main()
