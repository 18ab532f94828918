"""Compile, in parallel, the FlashInfer kernels that the decode graphs and the fused model path
use and the kit's JIT cache may lack: paged prefill "fa2" (shared levels and tensor-core decode),
RMSNorm, SiLU-and-mul, RoPE from a cos/sin table, the paged KV append, the cascade merge.

FlashInfer compiles a module on its first call, one module at a time; each is mostly one
translation unit, so compiling them side by side in threads uses the GPU machine's cores. Run it
first in a GPU command (then `.gpu-kit/save-jit-cache.sh` keeps the results):

    python bench/gpu_prebuild_kernels.py --head-dims 64 [--backends fa2 fa3]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import flashinfer
import torch

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def _norm() -> None:
    x = torch.randn(4, 256, device=DEV, dtype=BF16)
    w = torch.ones(256, device=DEV, dtype=BF16)
    flashinfer.rmsnorm(x, w, 1e-5)
    flashinfer.fused_add_rmsnorm(x, x.clone(), w, 1e-5)


def _silu() -> None:
    flashinfer.silu_and_mul(torch.randn(4, 512, device=DEV, dtype=BF16))


def _rope(head_dim: int) -> None:
    q = torch.randn(4, 8, head_dim, device=DEV, dtype=BF16)
    k = torch.randn(4, 2, head_dim, device=DEV, dtype=BF16)
    table = torch.randn(16, head_dim, device=DEV, dtype=torch.float32)
    pos = torch.arange(4, device=DEV)
    flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, q, k, head_dim, table, is_neox=True)


def _append(head_dim: int) -> None:
    cache = torch.zeros(4, 16, 2, head_dim, device=DEV, dtype=BF16)
    k = torch.randn(3, 2, head_dim, device=DEV, dtype=BF16)
    i32 = dict(dtype=torch.int32, device=DEV)
    flashinfer.append_paged_kv_cache(
        k, k, torch.zeros(3, **i32), torch.arange(3, **i32), (cache, cache.clone()),
        torch.arange(4, **i32), torch.tensor([0, 4], **i32), torch.tensor([16], **i32),
    )  # fmt: skip


def _prefill(head_dim: int, backend: str) -> None:
    ws = torch.zeros(16 << 20, dtype=torch.uint8, device=DEV)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    i32 = dict(dtype=torch.int32)
    wrapper.plan(torch.tensor([0, 2], **i32), torch.tensor([0, 1], **i32),
                 torch.tensor([0], **i32, device=DEV), torch.tensor([16], **i32),
                 8, 2, head_dim, 16, causal=False, q_data_type=BF16)  # fmt: skip
    cache = torch.randn(1, 16, 2, head_dim, device=DEV, dtype=BF16)
    wrapper.run(torch.randn(2, 8, head_dim, device=DEV, dtype=BF16), (cache, cache))


def _merge() -> None:
    v = torch.randn(2, 8, 64, device=DEV, dtype=BF16)
    s = torch.randn(2, 8, device=DEV)
    flashinfer.merge_state_in_place(v, s, v.clone(), s.clone())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--backends", nargs="+", default=["fa2"], help="paged prefill: fa2 fa3")
    args = parser.parse_args()
    jobs = {"norm": _norm, "silu_and_mul": _silu, "merge": _merge}
    for d in args.head_dims:
        jobs[f"rope/{d}"] = lambda d=d: _rope(d)
        jobs[f"append/{d}"] = lambda d=d: _append(d)
        for backend in args.backends:
            jobs[f"prefill {backend}/{d}"] = lambda d=d, b=backend: _prefill(d, b)
    torch.zeros(1, device=DEV)  # initialise CUDA before the threads
    start = time.perf_counter()

    def timed(item):
        name, job = item
        t = time.perf_counter()
        try:
            job()
            torch.cuda.synchronize()
            return name, time.perf_counter() - t, None
        except Exception as exc:  # noqa: BLE001 - report every module's outcome
            return name, time.perf_counter() - t, exc

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(timed, jobs.items()))
    for name, seconds, exc in results:
        print(f"prebuild {name}: {seconds:.1f} s" + (f" FAILED {exc!r}" if exc else ""))
    print(f"prebuild: all in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
