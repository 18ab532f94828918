"""Host work of one decode step at 2K, 8K and 32K context: block-table path vs the old path.

No model runs: the real `Scheduler` and `ChunkKVCache` over a page pool of 1-float pages, and
the real `ModelRunner` step inputs, on the CPU. Workload per case: 128 sequences whose prompts
are a cached context (a 200-token system prompt, then 1,000-token documents, cut to the context
length) and a private 32-token question; all are admitted in one step, then every step decodes
one token per sequence (a fake sampled token appended) and nothing finishes. After `--warmup`
decode steps, `--steps` steps are timed. Cases:

- shared: all 128 sequences share one context (cascade, max_levels=3: one shared entry).
- 4 groups: 4 groups of 32 share 4 contexts with a common system prompt (two shared levels).
- plain: the shared context with max_levels=1 (one level; every sequence reads all its pages).

Per step, medians in microseconds of the host thread's CPU time (`--clock wall` for elapsed
time; on a busy shared machine CPU time is the stable measure of the host's work):
  (a) `scheduler.schedule()`,
  (b) the step's host inputs: new = `BatchLayout.host_inputs` (cached cascade structure, numpy
      over the block table); old = the slow reference path (`Sequence.page_table` for every
      sequence, `plan_levels`, slot and input lists), which the engine ran before the block
      table (the old scheduler built the page tables inside schedule(); here they are in (b)),
  (c) new only: `BatchLayout.device_inputs` (the packed copy, the last level's page gather from
      the block table, the metadata objects). On a GPU this is a few asynchronous kernel
      launches; on this CPU the gather is real work that grows with the pages read (in plain
      mode every sequence reads its whole context), so it is reported apart from (b). In plain
      mode at 32K it also moves megabytes per step through the CPU's caches, which the next
      step's (a) and (b) feel; `--no-device-step` skips (c) on the timed steps to show the host
      work alone.
  replans: re-plans of the cascade structure during the timed steps (0 in steady decode);
  re-plan: (b) with the cached structure dropped, i.e. what a step costs when the batch's
      sharing changed (admission, finish, preemption), median of 20 after the timed steps.

Both paths run the same trace in one process, each on its own fresh scheduler (new, then old,
per context length), so the old path's garbage (and the collections it triggers) lands in its
own numbers; the new path's metadata is checked equal to the old path's once, untimed. The
target: (a) + (b) of the new path flat across context lengths (32K / 2K within 1.2) and below
1 ms at 128 x 32K.

    python bench/bench_step_host.py [--steps 200] [--warmup 20] [--lengths 2048 8192 32768]
                                    [--repeats 1] [--clock cpu] [--no-device-step] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

import torch

from cascade_rag.chunks import ChunkRegistry, ChunkType
from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler
from cascade_rag.engine.sequence import PreparedPrompt, Sequence
from cascade_rag.sampling import SamplingParams

PAGE_SIZE = 16
NUM_SEQS = 128
QUESTION = 32
SYSTEM = 200
DOC = 1000
VOCAB = 32000
CLOCK = time.thread_time  # `--clock`: this thread's CPU time, or wall time (perf_counter)


def contexts(registry: ChunkRegistry, length: int, groups: int, rng: random.Random):
    """`groups` chains of chunks, each `length` tokens: a common system prompt, own documents."""
    ids = [rng.randrange(VOCAB) for _ in range(SYSTEM)]
    system = registry.register(ids, ChunkType.SYSTEM_PROMPT)
    chains = []
    for _ in range(groups):
        chain, left = [system], length - SYSTEM
        while left > 0:
            n = min(DOC, left)
            chain.append(registry.register([rng.randrange(VOCAB) for _ in range(n)]))
            left -= n
        chains.append(chain)
    return chains


def same_metadata(a, b) -> bool:
    if a.slot_mapping.tolist() != b.slot_mapping.tolist() or len(a.levels) != len(b.levels):
        return False
    names = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")
    return all(
        x.causal == y.causal
        and all(getattr(x, k).tolist() == getattr(y, k).tolist() for k in names)
        for x, y in zip(a.levels, b.levels)
    )


def run_case(
    length: int, groups: int, levels: int, steps: int, warmup: int, path: str, device_step: bool
) -> dict:
    """One pass of the workload on a fresh scheduler; `path` is "new" or "old"."""
    rng = random.Random(length * 7 + groups)
    registry = ChunkRegistry("bench-model|bench-tokenizer")
    tokens = groups * (length + 2 * PAGE_SIZE) + NUM_SEQS * (QUESTION + warmup + steps + 64)
    pool = PagePool(tokens // PAGE_SIZE + 64, PAGE_SIZE, 1, 1, 1)
    kv = ChunkKVCache(pool, registry)
    sched = Scheduler(kv, NUM_SEQS, max_num_batched_tokens=1 << 22)
    new = ModelRunner(None, pool, None, levels, 0, block_table=sched.block_table)
    old = ModelRunner(None, pool, None, levels, 0)
    layout = new.batch_layout
    chains = contexts(registry, length, groups, rng)
    for i in range(NUM_SEQS):
        tail = tuple(rng.randrange(VOCAB) for _ in range(QUESTION))
        prompt = PreparedPrompt(tuple(chains[i % groups]), tail)
        sched.add(Sequence(prompt=prompt, params=SamplingParams(max_tokens=1 << 20)))
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    out: dict = {}
    for step in range(1 + warmup + steps):
        if step == warmup + 1:
            gc.collect()  # start the timed steps without earlier garbage
            replans = layout.num_replans
        t0 = CLOCK()
        plan = sched.schedule()
        t1 = CLOCK()
        if path == "new":
            host = layout.host_inputs(plan.scheduled)
            t2 = CLOCK()
            if device_step or step <= warmup:
                inputs = layout.device_inputs(host)
            t3 = CLOCK()
        else:
            order, metadata = old.build_reference_metadata(plan.scheduled)
            old._layout(plan.scheduled, order)  # input ids, positions, logit rows
            t2 = t3 = CLOCK()
        assert len(plan.scheduled) == NUM_SEQS and not plan.preempted and not plan.failed
        if step == warmup and path == "new":  # once, untimed: the two paths agree
            ref_order, ref = old.build_reference_metadata(plan.scheduled)
            out["same"] = inputs.order.tolist() == ref_order and same_metadata(inputs.metadata, ref)
            out["levels"] = len(inputs.metadata.levels)
            out["pages_read"] = sum(lv.kv_indices.numel() for lv in inputs.metadata.levels)
        if step > warmup:
            times["a"].append(t1 - t0)
            times["b"].append(t2 - t1)
            times["c"].append(t3 - t2)
        sched.finish_step(plan, failed=False)
        for e in plan.scheduled:
            e.seq.token_ids.append(rng.randrange(VOCAB))
    out["replans"] = layout.num_replans - replans if path == "new" else 0
    if path == "new":  # what a change of the batch's sharing costs: a forced re-plan
        spent = []
        for _ in range(20):
            layout.set_min_shared_tokens(layout.min_shared_tokens)  # drops the cached plan
            t0 = CLOCK()
            layout.host_inputs(plan.scheduled)
            spent.append(CLOCK() - t0)
        out["replan_us"] = statistics.median(spent) * 1e6
    out.update({k: statistics.median(v) * 1e6 for k, v in times.items()})
    if path == "new" and not device_step:
        out["c"] = float("nan")
    return out


def best(runs: list[dict]) -> dict:
    """Per timed part, the lowest of the runs' medians (the run least disturbed by load)."""
    out = dict(runs[0])
    for key in ("a", "b", "c", "replan_us"):
        if key not in out:
            continue
        out[key] = min(r[key] for r in runs)
    out["same"] = all(r.get("same", True) for r in runs)
    out["replans"] = max(r["replans"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: host work is one Python thread; on a busy 2-core "
        "machine more threads make small CPU ops wait for each other)",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the host thread's CPU time (what the host work costs; a busy machine's "
        "other processes do not count); wall: elapsed time",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per case; the lowest median is shown"
    )
    parser.add_argument(
        "--no-device-step",
        dest="device_step",
        action="store_false",
        help="skip (c) on the timed steps (host work alone)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    load = os.getloadavg()
    print(
        f"# cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"load={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} page_size={PAGE_SIZE} "
        f"seqs={NUM_SEQS} question={QUESTION} steps={args.steps} repeats={args.repeats} "
        f"device_step={args.device_step} clock={args.clock} "
        "(median us per decode step, best of the repeats)"
    )
    cases = [("shared", 1, 3), ("4 groups", 4, 3), ("plain", 1, 1)]
    for path in ("new", "old"):  # untimed: first-call costs of the process stay out
        run_case(min(args.lengths), 4, 3, 20, 5, path, args.device_step)
    header = (
        f"{'':<9} {'':>7} {'':>2} {'':>7} | {'new: block table':<28} | {'old: page tables':<22} |\n"
        f"{'case':<9} {'context':>7} {'lv':>2} {'pages':>7} | {'(a)':>6} {'(b)':>6} {'(c)':>6} "
        f"{'(a)+(b)':>7} | {'(a)':>6} {'(b)':>6} {'(a)+(b)':>7} | {'old/new':>7} same "
        f"{'replans':>7} {'re-plan':>7}"
    )
    print(header)
    print("-" * len(header.splitlines()[-1]))
    for name, groups, levels in cases:
        runs = {(length, path): [] for length in args.lengths for path in ("new", "old")}
        for _ in range(args.repeats):  # lengths and paths interleaved: drifting load hits all
            for length in args.lengths:
                for path in ("new", "old"):
                    device_step = args.device_step and path == "new"
                    case = (length, groups, levels, args.steps, args.warmup, path, device_step)
                    runs[length, path].append(run_case(*case))
        rows = {}
        for length in args.lengths:
            r, o = best(runs[length, "new"]), best(runs[length, "old"])
            rows[length] = (r, o)
            new_ab, old_ab = r["a"] + r["b"], o["a"] + o["b"]
            print(
                f"{name:<9} {length:>7} {r['levels']:>2} {r['pages_read']:>7} | {r['a']:>6.0f} "
                f"{r['b']:>6.0f} {r['c']:>6.0f} {new_ab:>7.0f} | {o['a']:>6.0f} {o['b']:>6.0f} "
                f"{old_ab:>7.0f} | {old_ab / new_ab:>7.1f} {'yes' if r['same'] else 'NO':>4} "
                f"{r['replans']:>7} {r['replan_us']:>7.0f}"
            )
        (lo, lo_old), (hi, hi_old) = rows[min(args.lengths)], rows[max(args.lengths)]
        ratio_new = (hi["a"] + hi["b"]) / (lo["a"] + lo["b"])
        ratio_old = (hi_old["a"] + hi_old["b"]) / (lo_old["a"] + lo_old["b"])
        c_ratio = f"; (c) new {hi['c'] / lo['c']:.2f}x" if args.device_step else ""
        print(
            f"{name:<9} {max(args.lengths)}/{min(args.lengths)}: (a)+(b) new {ratio_new:.2f}x, "
            f"old {ratio_old:.2f}x{c_ratio}"
        )


if __name__ == "__main__":
    main()
