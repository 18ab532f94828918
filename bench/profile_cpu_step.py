"""Where a CPU engine step goes, per mode, in one process (a profile, not a benchmark).

Workloads: the 8-question RAG workload of bench_cpu_rag.py on a cold cache (after a warm-up),
and the first `--stream` questions of the reuse_qa.py stream one at a time, prefill only.
Systems: exact prefix reuse and `chunk_reuse="anywhere"` with each `--recompute` k.

Every step of the core engine is timed and split into: scheduling (admission included),
building the attention metadata (model runner), `attn.plan`, attention forward (all layers),
the rest of the model forward (matmuls, norms, RoPE, logits), and sampling plus bookkeeping.
Steps are classed as prefill (any step that computes prompt rows) or decode. Prints, per
system, the totals per class and per step; asserts nothing.

Run: python bench/profile_cpu_step.py [--recompute 0 24] [--stream 12]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import bench_cpu_rag  # bench/ is on sys.path when run as a script
import reuse_qa
import torch

from cascade_rag.composition import Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.models.loader import load_model
from cascade_rag.sampling import SamplingParams

PARTS = ("schedule", "metadata", "plan", "attention", "model other", "sample+rest")


class StepTimer:
    """Wraps one core engine's scheduler, runner and attention with timers."""

    def __init__(self, core) -> None:
        self.core = core
        self.acc: dict[str, float] = defaultdict(float)
        self.totals: dict[str, dict[str, float]] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self._wrap(core.scheduler, "schedule", "schedule")
        self._wrap(core.runner, "build_metadata", "metadata")
        self._wrap(core.runner.attn, "plan", "plan")
        self._wrap(core.runner.attn, "forward", "attention")
        self._wrap(core.runner, "run", "run")
        step = core.step

        def timed_step():
            self.acc.clear()
            t0 = time.perf_counter()
            out = step()
            wall = time.perf_counter() - t0
            if self._prefill is None:
                return out
            cls = "prefill" if self._prefill else "decode"
            self._prefill = None
            run, attn = self.acc["run"], self.acc["attention"]
            parts = {
                "schedule": self.acc["schedule"],
                "metadata": self.acc["metadata"],
                "plan": self.acc["plan"],
                "attention": self.acc["attention"],
                "model other": run - self.acc["metadata"] - self.acc["plan"] - attn,
            }
            parts["sample+rest"] = wall - parts["schedule"] - run
            parts["wall"] = wall
            tot = self.totals.setdefault(cls, defaultdict(float))
            for k, v in parts.items():
                tot[k] += v
            self.counts[cls] += 1
            return out

        core.step = timed_step
        self._prefill: bool | None = None
        runner_run = core.runner.run

        def run_recording(batch, rows=None):  # a step computing a prompt row is a prefill
            self._prefill = any(e.qo_len > 1 or e.num_extra_rows for e in batch)
            return runner_run(batch, rows)

        core.runner.run = run_recording

    def _wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[key] += time.perf_counter() - t0

        setattr(obj, name, wrapped)

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def report(self, title: str) -> None:
        print(f"\n{title}")
        print(f"{'class':8s} {'steps':>5s} {'wall s':>7s} " + " ".join(f"{p:>11s}" for p in PARTS))
        for cls in ("prefill", "decode"):
            if cls not in self.totals:
                continue
            t, n = self.totals[cls], self.counts[cls]
            print(f"{cls:8s} {n:5d} {t['wall']:7.2f} " + " ".join(f"{t[p]:11.3f}" for p in PARTS))
            print(
                f"{'  /step':8s} {'':5s} {1000 * t['wall'] / n:6.1f}m "
                + " ".join(f"{1000 * t[p] / n:10.1f}m" for p in PARTS)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recompute", type=int, nargs="*", default=[0, 24])
    parser.add_argument("--stream", type=int, default=12, help="stream questions to run")
    args = parser.parse_args()
    loaded = load_model(dtype=torch.float32)
    print(
        f"cpu_count={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    systems = [("exact prefix", {})] + [
        (f"anywhere k={k}", dict(chunk_reuse="anywhere", recompute_tokens=k))
        for k in args.recompute
    ]
    for name, options in systems:
        with CascadeEngine(loaded, kv_cache_tokens=32768, **options) as engine:
            timer = StepTimer(engine._core)
            engine.generate(bench_cpu_rag.warmup_compositions(), bench_cpu_rag.greedy(4))
            timer.reset()
            t0 = time.perf_counter()
            engine.generate(bench_cpu_rag.compositions(), bench_cpu_rag.greedy())
            timer.report(f"[{name}] 8-question workload, cold: {time.perf_counter() - t0:.2f} s")
            timer.reset()
            t0 = time.perf_counter()
            for q in reuse_qa.stream()[: args.stream]:
                comp = Composition(
                    query=q.text, chunks=[reuse_qa.DOCS[d] for d in q.docs], system=reuse_qa.SYSTEM
                )
                engine.generate(comp, SamplingParams(max_tokens=1))
            timer.report(
                f"[{name}] stream, first {args.stream} questions, prefill only: "
                f"{time.perf_counter() - t0:.2f} s"
            )
    print(f"load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
