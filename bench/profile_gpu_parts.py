"""Kernel times of a cascade decode step's parts, each alone on the GPU (us per launch, median
of CUDA-graph replays of 20 launches): what the step's pieces could gain before building it.

At 128 rows, Llama-3.2-1B attention shape (32 query heads, 8 KV heads of 64), bf16:
- the shared level, 128 rows x 8K keys, FlashInfer's FA3 paged kernel in 2, 4 and 8 parts at
  page sizes 16-128; FA2 with its own split; the ragged kernel over the same keys as one dense
  tensor (checked against PyTorch's attention);
- the step's GEMMs at M=128 under cuBLAS and cuBLASLt (and the TB/s of weight reads);
- copying the query rows for 4 parts (broadcast copies, a Triton kernel); argmax of logits.

    python bench/profile_gpu_parts.py
"""

import statistics
import sys

import flashinfer
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

dev = "cuda"
bf = torch.bfloat16
HQ, HK, D, B = 32, 8, 64, 128


@triton.jit
def _repeat_kernel(
    src, dst, row_stride, n_cols: tl.constexpr, rows, P: tl.constexpr, BLOCK: tl.constexpr
):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(src + r * row_stride + cols, mask=m)
    for j in tl.static_range(P):
        tl.store(dst + (j * rows + r) * n_cols + cols, x, mask=m)


def triton_repeat(q, out, p):
    rows = q.shape[0]
    n = q.shape[1] * q.shape[2]
    _repeat_kernel[(rows,)](q, out, q.stride(0), n, rows, p, triton.next_power_of_2(n))


def timeit(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    ts = []
    for _ in range(iters // 20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1000 / 20)
    return statistics.median(ts)


def shared_level(ps, p, ctx=8192, backend="fa3"):
    pages = ctx // ps
    k_cache = torch.randn(pages + 1, ps, HK, D, dtype=bf, device=dev)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(p * B, HQ, D, dtype=bf, device=dev)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    qo = torch.arange(p + 1, dtype=torch.int32) * B
    bounds = [(pages * j) // p for j in range(p + 1)]
    kv = torch.tensor(bounds, dtype=torch.int32)
    last = torch.full((p,), ps, dtype=torch.int32)
    idx = torch.arange(pages, dtype=torch.int32, device=dev)
    w.plan(
        qo,
        kv,
        idx,
        last,
        HQ,
        HK,
        D,
        ps,
        causal=False,
        q_data_type=bf,
        kv_data_type=bf,
        disable_split_kv=p > 1,
    )
    out = torch.empty_like(q)
    lse = torch.empty(p * B, HQ, dtype=torch.float32, device=dev)
    return timeit(lambda: w.run(q, (k_cache, v_cache), out=out, lse=lse, return_lse=True))


def ragged_level(p, ctx=8192, backend="fa3", offset_pages=37):
    ps = 16
    pages = ctx // ps + offset_pages + 1
    k_cache = torch.randn(pages, ps, HK, D, dtype=bf, device=dev)
    v_cache = torch.randn_like(k_cache)
    k, v = k_cache.view(-1, HK, D), v_cache.view(-1, HK, D)
    q = torch.randn(p * B, HQ, D, dtype=bf, device=dev)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
    qo = torch.arange(p + 1, dtype=torch.int32) * B
    start = offset_pages * ps
    kv = torch.tensor([start + (ctx * j) // p for j in range(p + 1)], dtype=torch.int32)
    w.plan(qo, kv, HQ, HK, D, causal=False, q_data_type=bf, kv_data_type=bf, disable_split_kv=p > 1)
    out = torch.empty_like(q)
    lse = torch.empty(p * B, HQ, dtype=torch.float32, device=dev)
    t = timeit(lambda: w.run(q, k, v, out=out, lse=lse, return_lse=True))
    # check against the paged result of the same keys
    keys = k[start : start + ctx].repeat_interleave(4, 1).transpose(0, 1).float()
    values = v[start : start + ctx].repeat_interleave(4, 1).transpose(0, 1).float()
    ref = F.scaled_dot_product_attention(q[:B].transpose(0, 1).float(), keys, values)
    ref = ref.transpose(0, 1)
    if p == 1:
        err = (out[:B].float() - ref).abs().max().item()
        print(f"    ragged p=1 max err vs sdpa {err:.4f}")
    return t


def main():
    print(torch.cuda.get_device_name(), flashinfer.__version__)
    print("shared level (128 rows x 8K keys), us per layer")
    for backend in ("fa3",):
        for ps in (16, 32, 64, 128):
            for p in (2, 4, 8):
                try:
                    t = shared_level(ps, p, backend=backend)
                    print(f"  {backend} page {ps:4d} parts {p}: {t:7.2f}")
                except Exception as exc:  # noqa: BLE001
                    print(f"  {backend} page {ps} parts {p}: failed {str(exc)[:120]}")
    for ps in (16, 64):
        print(f"  fa2 own split page {ps}: {shared_level(ps, 1, backend='fa2'):7.2f}")
    for p in (1, 2, 4, 8):
        try:
            print(f"  fa3 ragged (dense keys) parts {p}: {ragged_level(p):7.2f}")
        except Exception as exc:  # noqa: BLE001
            print(f"  ragged parts {p}: failed {str(exc)[:160]}")

    print("GEMMs at M=128 (us, TB/s of weight reads)")
    x = torch.randn(B, 2048, dtype=bf, device=dev)
    shapes = dict(
        qkv=(2048, 3072),
        o=(2048, 2048),
        gate_up=(2048, 16384),
        down=(8192, 2048),
        lm=(2048, 128256),
    )
    weights = {k: torch.randn(n, kk, dtype=bf, device=dev) for k, (kk, n) in shapes.items()}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        row = []
        for name, w in weights.items():
            xx = x if w.shape[1] == 2048 else torch.randn(B, w.shape[1], dtype=bf, device=dev)
            if name == "lm":
                t = timeit(lambda xx=xx, w=w: torch.mm(xx, w.t(), out_dtype=torch.float32), 40)
            else:
                t = timeit(lambda xx=xx, w=w: F.linear(xx, w))
            row.append(f"{name} {t:6.1f} ({w.numel() * 2 / t / 1e6:.2f})")
        print(f"  {lib}: " + " | ".join(row))
    torch.backends.cuda.preferred_blas_library("cublas")

    print("q repeat x4 ([128, 32, 64] bf16), us")
    q = torch.randn(B, HQ, D, dtype=bf, device=dev)
    rep = torch.empty(4 * B, HQ, D, dtype=bf, device=dev)
    t3 = timeit(lambda: rep.view(4, *q.shape).copy_(q.unsqueeze(0).expand(4, *q.shape)))
    t2 = timeit(lambda: rep.view(4, -1).copy_(q.reshape(1, -1).expand(4, -1)))
    qs = torch.randn(B, HQ + 2 * HK, D, dtype=bf, device=dev)[:, :HQ]  # a view of qkv
    t3s = timeit(lambda: rep.view(4, *qs.shape).copy_(qs.unsqueeze(0).expand(4, *qs.shape)))
    rep.zero_()
    tt = timeit(lambda: triton_repeat(qs, rep, 4))
    want = qs.unsqueeze(0).expand(4, *qs.shape).reshape(4 * B, HQ, D)
    assert torch.equal(rep, want)
    print(f"  triton from a qkv view {tt:.2f}")
    print(f"  3D expand {t3:.2f} | 2D expand {t2:.2f} | 3D expand from a qkv view {t3s:.2f}")
    lg = torch.randn(B, 128256, dtype=torch.float32, device=dev)
    print(
        f"argmax fp32 {timeit(lambda: lg.argmax(-1)):.2f} | "
        f"bf16 {timeit(lambda: lg.to(bf).argmax(-1)):.2f} (incl cast)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
