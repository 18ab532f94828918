"""A PyTorch stand-in for the parts of FlashInfer the GPU code calls, for tests on the CPU.

`stand_in_module()` returns a module object to put in `sys.modules["flashinfer"]`. What it
models is what the graph code relies on (FlashInfer 0.7.2's documented behaviour):

- Wrappers made with `use_cuda_graph=True` keep the caller's fixed buffers: `plan` copies the
  step's index arrays into them (and checks the fixed batch size, the buffer capacity and,
  for paged prefill, that no later plan has more rows than the first); `run` reads only those
  buffers, as a replayed graph would. A forward that depends on anything planned but not
  copied into a buffer fails the tests.
- LSE values are base 2. A row whose entry has no keys gets a NaN output and lse -inf (so a
  merge that does not mask it poisons the result); rows that no entry covers get NaN too.
- `merge_state_in_place(v, s, v_other, s_other, mask)` leaves rows with mask 0 untouched.
- `append_paged_kv_cache`, `rmsnorm`, `fused_add_rmsnorm` (in place: residual += x, x =
  norm(residual) computed from the float32 sum), `silu_and_mul`,
  `apply_rope_with_cos_sin_cache_inplace` (neox layout).

Attention is computed in float32 with explicit loops: slow, for small shapes only.
"""

from __future__ import annotations

import math
import types

import torch

LOG2E = 1.0 / math.log(2.0)


def _get_length(indptr, last_len, page_size, i):
    pages = int(indptr[i + 1]) - int(indptr[i])
    return 0 if pages == 0 else (pages - 1) * page_size + int(last_len[i])


def _attend(q, keys, values, causal):
    """q [m, hq, d], keys/values [L, hk, d] -> out [m, hq, d] float32, lse [m, hq] base 2."""
    m, hq, d = q.shape
    L = keys.shape[0]
    if L == 0:
        return torch.full((m, hq, d), float("nan")), torch.full((m, hq), float("-inf"))
    group = hq // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(d)
    if causal:  # bottom-right aligned: row i sees keys j <= L - m + i
        rows = torch.arange(m)[:, None]
        cols = torch.arange(L)[None, :]
        scores = scores.masked_fill(cols > L - m + rows, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hq, m]
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out, (lse * LOG2E).t()


class _PagedWrapper:
    def _store(self, name, value, buffer):
        if self._graph:
            if buffer.shape[0] < value.shape[0]:
                raise ValueError(f"{name}: {value.shape[0]} values exceed the buffer")
            buffer[: value.shape[0]].copy_(value)
            return buffer
        return value.to(torch.int32).clone()

    def _pages(self, kv_cache, indptr, indices, last_len, i):
        k_cache, v_cache = kv_cache
        n = _get_length(indptr, last_len, self._page_size, i)
        pages = indices[int(indptr[i]) : int(indptr[i + 1])].long()
        hk, d = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache[pages].reshape(-1, hk, d)[:n]
        values = v_cache[pages].reshape(-1, hk, d)[:n]
        return keys, values


class BatchDecodeWithPagedKVCacheWrapper(_PagedWrapper):
    def __init__(
        self,
        float_workspace_buffer,
        kv_layout="NHD",
        use_cuda_graph=False,
        use_tensor_cores=False,
        paged_kv_indptr_buffer=None,
        paged_kv_indices_buffer=None,
        paged_kv_last_page_len_buffer=None,
        backend="auto",
    ):
        assert kv_layout == "NHD"
        self._graph = use_cuda_graph
        self._tensor_cores = use_tensor_cores
        if use_cuda_graph:
            self._fixed = len(paged_kv_last_page_len_buffer)
            assert len(paged_kv_indptr_buffer) == self._fixed + 1
        self._bufs = (
            paged_kv_indptr_buffer,
            paged_kv_indices_buffer,
            paged_kv_last_page_len_buffer,
        )
        self.num_plans = 0

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, pos_encoding_mode="NONE", q_data_type=None, kv_data_type=None,
             **kwargs):  # fmt: skip
        assert pos_encoding_mode == "NONE"
        batch = len(last_page_len)
        if self._graph and batch != self._fixed:
            raise ValueError(f"batch size {batch} != fixed {self._fixed}")
        assert indptr.dtype == torch.int32 and last_page_len.dtype == torch.int32
        self._indptr = self._store("indptr", indptr, self._bufs[0])
        self._indices = self._store("indices", indices, self._bufs[1])
        self._last = self._store("last_page_len", last_page_len, self._bufs[2])
        self._batch, self._page_size = batch, page_size
        # what FlashInfer's plan partitions the work by: the page counts for the CUDA-core
        # decode kernel, the lengths as well for the tensor-core one (a prefill plan)
        self._planned = (self._indptr.clone(), self._last.clone())
        self.num_plans += 1

    def run(self, q, paged_kv_cache, out=None, lse=None, return_lse=False):
        if q.shape[0] != self._batch:
            raise ValueError(f"q has {q.shape[0]} rows, plan {self._batch}")
        indptr, last = self._planned
        if not torch.equal(self._indptr, indptr) or (
            self._tensor_cores and not torch.equal(self._last, last)
        ):
            raise AssertionError("the buffers no longer hold what the wrapper was planned for")
        outs, lses = [], []
        for i in range(self._batch):
            keys, values = self._pages(paged_kv_cache, self._indptr, self._indices, self._last, i)
            o, s = _attend(q[i : i + 1], keys, values, causal=False)
            outs.append(o)
            lses.append(s)
        return _results(torch.cat(outs).to(q.dtype), torch.cat(lses), out, lse, return_lse)


class BatchPrefillWithPagedKVCacheWrapper(_PagedWrapper):
    def __init__(
        self,
        float_workspace_buffer,
        kv_layout="NHD",
        use_cuda_graph=False,
        qo_indptr_buf=None,
        paged_kv_indptr_buf=None,
        paged_kv_indices_buf=None,
        paged_kv_last_page_len_buf=None,
        backend="auto",
    ):
        assert kv_layout == "NHD"
        self._graph = use_cuda_graph
        if use_cuda_graph:
            self._fixed = len(qo_indptr_buf) - 1
            assert len(paged_kv_indptr_buf) == self._fixed + 1
            assert len(paged_kv_last_page_len_buf) == self._fixed
        self._bufs = (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf,
                      paged_kv_last_page_len_buf)  # fmt: skip
        self._max_rows = None
        self.num_plans = 0

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal=False,
             pos_encoding_mode="NONE", q_data_type=None, kv_data_type=None, **kwargs):  # fmt: skip
        assert pos_encoding_mode == "NONE"
        batch = len(qo_indptr) - 1
        rows = int(qo_indptr[-1])
        if self._graph:
            if batch != self._fixed:
                raise ValueError(f"batch size {batch} != fixed {self._fixed}")
            if self._max_rows is None:
                self._max_rows = rows
            elif rows > self._max_rows:
                raise ValueError(f"{rows} rows > the first plan's {self._max_rows}")
        qo_lens = qo_indptr[1:] - qo_indptr[:-1]
        assert bool((qo_lens >= 0).all()), "qo_indptr must not decrease"
        self._qo = self._store("qo_indptr", qo_indptr, self._bufs[0])
        self._indptr = self._store("kv_indptr", paged_kv_indptr, self._bufs[1])
        self._indices = self._store("kv_indices", paged_kv_indices, self._bufs[2])
        self._last = self._store("last_page_len", paged_kv_last_page_len, self._bufs[3])
        self._batch, self._page_size, self._causal = batch, page_size, causal
        self._rows = rows
        self.num_plans += 1

    def run(self, q, paged_kv_cache, out=None, lse=None, return_lse=False):
        if not self._graph and q.shape[0] != self._rows:
            raise ValueError(f"q has {q.shape[0]} rows, qo_indptr {self._rows}")
        m, hq, d = q.shape
        o = torch.full((m, hq, d), float("nan"))
        s = torch.full((m, hq), float("nan"))
        for i in range(self._batch):
            lo, hi = int(self._qo[i]), int(self._qo[i + 1])
            if hi == lo:
                continue
            keys, values = self._pages(paged_kv_cache, self._indptr, self._indices, self._last, i)
            o[lo:hi], s[lo:hi] = _attend(q[lo:hi], keys, values, self._causal)
        return _results(o.to(q.dtype), s, out, lse, return_lse)


def _results(o, s, out, lse, return_lse):
    """A wrapper's results, written into the caller's `out` / `lse` buffers if given."""
    if out is not None:
        assert out.shape == o.shape and out.dtype == o.dtype
        o = out.copy_(o)
    if lse is not None:
        assert lse.shape == s.shape and lse.dtype == torch.float32
        s = lse.copy_(s)
    return (o, s) if return_lse else o


def merge_state_in_place(v, s, v_other, s_other, mask=None):
    rows = torch.arange(v.shape[0]) if mask is None else torch.nonzero(mask).flatten()
    a, b = s[rows], s_other[rows]
    m = torch.maximum(a, b)
    wa, wb = torch.exp2(a - m), torch.exp2(b - m)
    merged = (v[rows].float() * wa[..., None] + v_other[rows].float() * wb[..., None]) / (wa + wb)[
        ..., None
    ]
    v[rows] = merged.to(v.dtype)
    s[rows] = torch.log2(wa + wb) + m


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len, kv_layout="NHD"):  # fmt: skip
    assert kv_layout == "NHD"
    assert batch_indices.dtype == torch.int32 and positions.dtype == torch.int32
    k_cache, v_cache = paged_kv_cache
    page_size = k_cache.shape[1]
    flat = kv_indptr.long()[batch_indices.long()] * page_size + positions.long()
    pages = kv_indices.long()[flat // page_size]
    k_cache[pages, flat % page_size] = append_key.to(k_cache.dtype)
    v_cache[pages, flat % page_size] = append_value.to(v_cache.dtype)


def _norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rmsnorm(input, weight, eps=1e-6, out=None, enable_pdl=None):
    return _norm(input, weight, eps).to(input.dtype)


def fused_add_rmsnorm(input, residual, weight, eps=1e-6, enable_pdl=None):
    total = input.float() + residual.float()
    residual.copy_(total)
    input.copy_(_norm(total, weight, eps))


def silu_and_mul(input, out=None, enable_pdl=None):
    d = input.shape[-1] // 2
    return (torch.nn.functional.silu(input[..., :d].float()) * input[..., d:].float()).to(
        input.dtype
    )


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache,
                                          is_neox=True):  # fmt: skip
    assert is_neox and cos_sin_cache.dtype == torch.float32
    half = cos_sin_cache.shape[-1] // 2
    table = cos_sin_cache[positions.long()]
    cos, sin = table[:, None, :half], table[:, None, half:]
    for x in (query, key):
        x3 = x.view(x.shape[0], -1, head_size)
        x1, x2 = x3[..., :half].float(), x3[..., half:].float()
        x3.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def stand_in_module() -> types.ModuleType:
    module = types.ModuleType("flashinfer")
    for name in (
        "BatchDecodeWithPagedKVCacheWrapper",
        "BatchPrefillWithPagedKVCacheWrapper",
        "merge_state_in_place",
        "append_paged_kv_cache",
        "rmsnorm",
        "fused_add_rmsnorm",
        "silu_and_mul",
        "apply_rope_with_cos_sin_cache_inplace",
    ):
        setattr(module, name, globals()[name])
    module.__stand_in__ = True
    return module
