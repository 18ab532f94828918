"""Plot the GPU benchmark results (JSON written by bench_gpu_*.py) into one PNG.

    python bench/plot_gpu_results.py [bench/results] [bench/results/gpu_results.png]

Needs matplotlib (`pip install 'cascade-rag[bench]'`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else folder / "gpu_results.png")
    attn = json.loads((folder / "decode_attention.json").read_text())
    rag = json.loads((folder / "rag.json").read_text())
    heavy = json.loads((folder / "decode_heavy.json").read_text())
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    ax = axes[0]
    for batch in sorted({r["batch"] for r in attn["rows"]}):
        rows = [r for r in attn["rows"] if r["batch"] == batch]
        x = [r["shared"] // 1024 for r in rows]
        ax.plot(x, [r["cascade_speedup"] for r in rows], "o--", label=f"cascade, batch {batch}")
        chosen = [r["chosen_vs_plain"] for r in rows]
        ax.plot(x, chosen, "s-", label=f"engine's choice, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shared prefix (K tokens)")
    ax.set_ylabel("speed vs plain paged decode (x)")
    ax.set_title(f"decode attention, one layer ({attn.get('gpu', 'GPU')})")
    ax.legend(fontsize=7)

    ax = axes[1]
    names = [r["system"].replace("engine, ", "engine:\n").replace("HF generate, ", "HF ")
             for r in rag["rows"]]  # fmt: skip
    ax.barh(names, [r["output_tokens_per_s"] for r in rag["rows"]], color="tab:blue")
    ax.set_xlabel("output tokens/s")
    ax.set_title(f"RAG end to end: 64 requests, Llama-3.2-1B shape ({rag.get('gpu', 'GPU')})")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)

    ax = axes[2]
    speeds = [heavy["plain"]["output_tokens_per_s"], heavy["cascade"]["output_tokens_per_s"]]
    ax.bar(["plain decode", "cascade decode"], speeds)
    ax.set_ylabel("output tokens/s")
    ratio = speeds[1] / speeds[0]
    ax.set_title(f"decode-heavy: 128 x 8K shared ({ratio:.2f}x, {heavy.get('gpu', 'GPU')})")

    fig.suptitle("cascade-rag on the GPU (bf16, random weights)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
