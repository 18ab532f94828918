"""End-to-end RAG on the GPU: the engine against what LangChain / LlamaIndex users run today.

Workload: 64 requests, each a 256-token system prompt, 4 of 8 shared 512-token documents (a
retriever's canonical order, so overlapping sets share prefixes) and a 32-token question, 64
new tokens each (greedy, end of sequence ignored so every system makes exactly 64 tokens).
Model: Llama-3.2-1B shape (16 layers, hidden 2048, 32 heads, 8 KV heads, head_dim 64,
vocabulary 128,256) with random bf16 weights built so that every
greedy token leads by a wide margin (`gpu_common.make_peaked_model_dir`: token comparisons
between systems then test the systems, not bf16 rounding at near ties). Systems, in one
process, same token ids:

- Hugging Face `generate` at batch 1, 4 (HuggingFacePipeline's default) and 64;
- the engine with chunk caching off;
- the engine with chunk caching but plain decode (no cascade);
- the full engine (chunk caching + cascade where it pays);
- the full engine with reuse anywhere (`chunk_reuse="anywhere"`: a document's KV computed once
  and reused at any position), recomputing the first 24 tokens (the default) or none of each
  document placed away from where it was computed.

`--order shuffled` gives each request its documents in a random order (a retriever's score
order) instead of the canonical one, so exact prefix reuse shares little beyond the system
prompt; `--no-hf` leaves out the Hugging Face rows (then there are no x HF columns).

Each engine system is timed three times from a cold chunk cache (median reported).

Hugging Face at batch 1 is timed on the first `--hf-batch1-requests` requests (default 8): its
throughput does not depend on how many requests follow one another.

    python bench/bench_gpu_rag.py   # writes $OUT/rag.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_common import Timer, make_peaked_model_dir, timed_generate, write_json  # noqa: E402

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

NUM_REQUESTS, SYSTEM_TOKENS, NUM_DOCS, DOC_TOKENS, DOCS_PER_REQUEST = 64, 256, 8, 512, 4
QUESTION_TOKENS, NEW_TOKENS = 32, 64
REPEATS = 3  # engine runs per system (median reported)


def workload(vocab: int, seed: int = 0, shuffled: bool = False):
    """(system ids, doc ids list, [(doc indices, question ids)]), documents in canonical
    order or (`shuffled`) in a random order per request."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    system = ids(SYSTEM_TOKENS)
    docs = [ids(DOC_TOKENS) for _ in range(NUM_DOCS)]
    requests = []
    for _ in range(NUM_REQUESTS):
        picked = rng.sample(range(NUM_DOCS), DOCS_PER_REQUEST)
        if not shuffled:
            picked.sort()
        requests.append((picked, ids(QUESTION_TOKENS)))
    return system, docs, requests


def prompts_for(engine, system, docs, requests):
    sys_chunk = engine.register_token_chunk(system, ChunkType.SYSTEM_PROMPT)
    doc_chunks = [engine.register_token_chunk(d) for d in docs]
    return [
        PreparedPrompt((sys_chunk, *(doc_chunks[i] for i in picked)), tuple(question))
        for picked, question in requests
    ]


def flat_ids(system, docs, requests):
    return [
        system + [t for i in picked for t in docs[i]] + question for picked, question in requests
    ]


def run_hf(model, all_ids, batch_size):
    outputs = []
    with Timer() as t, torch.inference_mode():
        for start in range(0, len(all_ids), batch_size):
            batch = torch.tensor(all_ids[start : start + batch_size], device="cuda")
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.extend(out[:, batch.shape[1] :].tolist())
    return t.seconds, outputs


def run_engine(model_dir, prompts_args, **options):
    engine = CascadeEngine(
        str(model_dir),
        dtype="bfloat16",
        device="cuda",
        kv_cache_tokens=NUM_REQUESTS * 2600,
        max_num_seqs=NUM_REQUESTS,
        max_num_batched_tokens=32768,
        **options,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate([PreparedPrompt((), (1, 2, 3, 4))] * 4, SamplingParams(max_tokens=8))  # warm-up
    prompts = prompts_for(engine, *prompts_args)
    # each run starts from a cold chunk cache
    times, outs, steps = timed_generate(engine, prompts, params, REPEATS, engine.clear_cache)
    engine.close()
    computed = sum(o.usage.prompt_tokens - o.usage.cached_tokens for o in outs)
    return statistics.median(times), [o.token_ids for o in outs], computed, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/cascade-rag-llama1b-peaked")
    parser.add_argument("--hf-batch1-requests", type=int, default=8)
    parser.add_argument("--order", choices=("canonical", "shuffled"), default="canonical")
    parser.add_argument("--no-hf", action="store_true", help="engine rows only")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = make_peaked_model_dir(args.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    system, docs, requests = workload(hf.config.vocab_size, shuffled=args.order == "shuffled")
    all_ids = flat_ids(system, docs, requests)
    prompt_tokens = sum(len(x) for x in all_ids)
    run_hf(hf, all_ids[:2], 2)  # warm-up

    rows = []

    def add(name, seconds, n_requests, computed, outputs, reference=None):
        tokens = n_requests * NEW_TOKENS
        same = None
        if reference is not None:
            same = sum(a == b for a, b in zip(outputs, reference)) / len(outputs)
        rows.append(dict(system=name, seconds=seconds, requests=n_requests,
                         output_tokens_per_s=tokens / seconds, prompt_tokens_computed=computed,
                         same_tokens_as_hf_batch64=same))  # fmt: skip

    n1 = args.hf_batch1_requests
    ref64 = None
    if not args.no_hf:
        secs, _ = run_hf(hf, all_ids[:n1], 1)
        add("HF generate, batch 1", secs, n1, sum(len(x) for x in all_ids[:n1]), None)
        secs, _ = run_hf(hf, all_ids, 4)
        add("HF generate, batch 4", secs, NUM_REQUESTS, prompt_tokens, None)
        secs, ref64 = run_hf(hf, all_ids, 64)
        add("HF generate, batch 64", secs, NUM_REQUESTS, prompt_tokens, None)
    del hf
    torch.cuda.empty_cache()

    wl = (system, docs, requests)
    for name, opts in [
        ("engine, chunk cache off", dict(enable_chunk_cache=False)),
        ("engine, chunk cache, plain decode", dict(cascade=False)),
        ("engine, chunk cache + cascade", dict()),
        ("engine, reuse anywhere, recompute 24", dict(chunk_reuse="anywhere")),
        ("engine, reuse anywhere, recompute 0", dict(chunk_reuse="anywhere", recompute_tokens=0)),
    ]:
        secs, outs, computed, steps = run_engine(model_dir, wl, **opts)
        add(name, secs, NUM_REQUESTS, computed, outs, ref64)
        rows[-1]["steps"] = steps

    base = {r["system"]: r["output_tokens_per_s"] for r in rows}
    exact = base["engine, chunk cache + cascade"]
    nan = float("nan")
    for r in rows:
        r["x_hf_batch4"] = r["output_tokens_per_s"] / base.get("HF generate, batch 4", nan)
        r["x_hf_batch64"] = r["output_tokens_per_s"] / base.get("HF generate, batch 64", nan)
        r["x_exact_reuse"] = r["output_tokens_per_s"] / exact
    name = "rag.json" if args.order == "canonical" else f"rag_{args.order}.json"
    write_json(name, dict(rows=rows, prompt_tokens=prompt_tokens, order=args.order))
    print(
        f"RAG end to end: {NUM_REQUESTS} requests x {len(all_ids[0])} prompt tokens "
        f"({SYSTEM_TOKENS} system + {DOCS_PER_REQUEST} of {NUM_DOCS} docs x {DOC_TOKENS} + "
        f"{QUESTION_TOKENS} question), {NEW_TOKENS} new tokens; Llama-3.2-1B shape, bf16"
    )
    print(f"document order: {args.order}")
    print("| system | s | output tok/s | prompt tokens computed | x HF b4 | x HF b64 | x exact "
          "reuse | = HF b64 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = (
            ""
            if r["same_tokens_as_hf_batch64"] is None
            else f"{r['same_tokens_as_hf_batch64']:.0%}"
        )
        print(f"| {r['system']} | {r['seconds']:.2f} | {r['output_tokens_per_s']:.0f} | "
              f"{r['prompt_tokens_computed']} | {r['x_hf_batch4']:.2f} | {r['x_hf_batch64']:.2f} | "
              f"{r['x_exact_reuse']:.2f} | {same} |")  # fmt: skip


if __name__ == "__main__":
    main()
