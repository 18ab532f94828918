"""FlashInfer attention over the paged KV cache (GPU, bf16/fp16): prefill and cascade decode.

`FlashInferAttention.plan` runs FlashInfer's planners once per step for every level of the
step's `AttentionMetadata`; `forward`, once per layer, writes the new K/V into the pages,
makes the boundary-page copies, runs each level and merges the levels' partial results with
FlashInfer's `merge_state_in_place` (its log-sum-exp values are base 2, consistently).

- The last (causal) level covers every query row. A pure decode step (one row per sequence)
  runs it with the paged decode kernel, any other step with the paged prefill kernel.
- A shared level runs FlashInfer's paged prefill kernel, not causal, over the rows of its
  non-empty entries only (a level's rows are gathered when some entries have no keys).
- RoPE is applied by the model before attention (`pos_encoding_mode="NONE"`). A level with
  position deltas (reuse anywhere: a chunk read away from where it was computed) gets its query
  rows re-rotated by `cascade_rag.attention.rope` before its kernel runs (tables planned once
  per step, rotation in float32), and new keys with `k_rope_delta` are rotated before they are
  written. The pages themselves are never rewritten, so one kernel call serves every row that
  reads a chunk, each row rotated for its own offset.
- Reuse anywhere plans one level per chunk segment: wrappers for more levels than the engine's
  cascade depth are made on first use (they share the workspace, as all levels do).

It does not decide grouping (the model runner's cascade planner does; `min_shared_tokens`
tells it when a shared level pays on this GPU) and is imported only when used, so the package
works where FlashInfer is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import flashinfer
import torch

from cascade_rag.attention import rope
from cascade_rag.attention.calibration import level_overhead_bytes
from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel

_WORKSPACE_BYTES = 256 * 1024 * 1024


@dataclass
class _LevelRun:
    wrapper: object
    rows: torch.Tensor | None  # query rows of the level's non-empty entries; None = all rows
    q_shift: tuple[torch.Tensor, torch.Tensor] | None = None  # float32 cos, sin [rows, d]


def _int32(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.int32)


def _host_int32(x: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host index tensor as int32, pinned when `pin` (the planners read it on the host and
    copy it to the device non-blocking). The model runner's host tensors are CPU tensors, so
    this does not wait for the device; a device tensor (a hand-made metadata) is read back."""
    out = torch.empty(x.shape, dtype=torch.int32, pin_memory=pin)
    return out.copy_(x)


class FlashInferAttention:
    """FlashInfer backend (see the module docstring).

    `fused_model_ops` tells the engine to switch the model to its fused GPU path
    (`LlamaForCausalLM.fuse_for_speed`): with bf16 there is no exactness to keep.

    Args:
        num_qo_heads, num_kv_heads, head_dim: attention shape.
        page_size: slots per page.
        dtype: dtype of q and of the KV cache (bfloat16 or float16).
        device: CUDA device.
        max_levels: most levels a step will plan.
        shared_backend: FlashInfer prefill backend for shared levels ("fa2" splits long key
            ranges across CTAs; "auto" may pick a variant that does not).
    """

    fused_model_ops = True

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_levels: int = 4,
        shared_backend: str = "fa2",
    ) -> None:
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"  # host tensors handed to the planners
        kv_bytes_per_token = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        # a shared level pays when it saves reading more than this many bytes of KV per layer
        # and step: measured per GPU by `cascade-rag calibrate` (attention/calibration.py)
        on_cuda = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if on_cuda else str(self.device)
        overhead = level_overhead_bytes(name)
        self.min_shared_tokens = int(overhead / kv_bytes_per_token)
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # [0] runs the causal last level; the others the shared levels, whose few query rows
        # over long prefixes need the kernel variant that splits the keys across CTAs
        self._prefill = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")]
        self._shared_backend = shared_backend
        self._prefill += [self._shared_wrapper() for _ in range(max_levels - 1)]
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=num_qo_heads // num_kv_heads >= 4
        )
        self._runs: list[_LevelRun] = []  # last level first
        self._metadata: AttentionMetadata | None = None
        self._k_shift: tuple[torch.Tensor, torch.Tensor] | None = None
        # wrapper index of a shared level -> (the level planned into it, its run)
        self._planned_shared: dict[int, tuple[CascadeLevel, _LevelRun | None]] = {}

    def _shared_wrapper(self):
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=self._shared_backend
        )

    @classmethod
    def for_model(cls, model_config, engine_config) -> FlashInferAttention:
        return cls(
            model_config.num_qo_heads,
            model_config.num_kv_heads,
            model_config.head_dim,
            engine_config.page_size,
            engine_config.torch_dtype,
            engine_config.device,
            max_levels=max(engine_config.levels, 1),
        )

    # ---- once per step -----------------------------------------------------------------

    def plan(self, metadata: AttentionMetadata) -> None:
        """Plan every level of the step once (host index tensors read on the host, page ids
        on the device; nothing waits for the device).

        A shared level that is the very `CascadeLevel` object planned into the same wrapper
        last step (the model runner reuses them while the batch's sharing does not change) is
        not planned again: its wrapper still holds that plan.
        """
        levels = metadata.levels
        while len(levels) > len(self._prefill):  # reuse anywhere: a level per chunk segment
            self._prefill.append(self._shared_wrapper())
        planned = self._planned_shared
        self._metadata = metadata
        last = levels[-1]
        runs = [self._plan_last(last, metadata.num_tokens)]
        runs[0].q_shift = self._shift(last.rope_delta, None, metadata)
        self._planned_shared = {}
        for i, level in enumerate(levels[:-1]):
            before = planned.get(i)
            if before is not None and before[0] is level:
                run = before[1]
            else:
                run = self._plan_shared(level, self._prefill[i + 1])
                if run is not None:
                    run.q_shift = self._shift(level.rope_delta, run.rows, metadata)
            self._planned_shared[i] = (level, run)
            if run is not None:
                runs.append(run)
        self._k_shift = self._shift(metadata.k_rope_delta, None, metadata)
        self._runs = runs

    def _shift(self, deltas, rows, metadata: AttentionMetadata):
        """float32 rotation tables for the rows' deltas (None when all are 0)."""
        if deltas is None:
            return None
        deltas = deltas.to("cpu", torch.int64)
        if rows is not None:
            deltas = deltas[rows.cpu()]
        if not bool(deltas.any()):
            return None
        return rope.shift_tables(deltas, metadata.rope_inv_freq, torch.float32, self.device)

    def _plan_last(self, level: CascadeLevel, num_tokens: int) -> _LevelRun:
        kv_indptr = _host_int32(level.kv_indptr, self._pin)
        kv_indices = _int32(level.kv_indices, self.device)  # on the device already: no copy
        last_len = _host_int32(level.kv_last_page_len, self._pin)
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if level.num_entries == num_tokens:  # one row per sequence: decode kernel
            self._decode.plan(
                kv_indptr, kv_indices, last_len, self.num_qo_heads, self.num_kv_heads,
                self.head_dim, self.page_size, pos_encoding_mode="NONE", **common,
            )  # fmt: skip
            return _LevelRun(self._decode, None)
        wrapper = self._prefill[0]
        wrapper.plan(
            _host_int32(level.qo_indptr, self._pin), kv_indptr, kv_indices, last_len,
            self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size, causal=True,
            pos_encoding_mode="NONE", **common,
        )  # fmt: skip
        return _LevelRun(wrapper, None)

    def _plan_shared(self, level: CascadeLevel, wrapper) -> _LevelRun | None:
        pin = self._pin
        # the model runner's host index tensors are CPU tensors: .cpu() does not copy
        kv_counts = (level.kv_indptr[1:] - level.kv_indptr[:-1]).cpu()
        keep = torch.nonzero(kv_counts > 0).flatten()
        if keep.numel() == 0:
            return None
        qo = level.qo_indptr.cpu()
        q_lens = (qo[1:] - qo[:-1])[keep]
        sub_qo = torch.zeros(keep.numel() + 1, dtype=torch.int32)
        sub_qo[1:] = torch.cumsum(q_lens, 0)
        sub_kv = torch.zeros(keep.numel() + 1, dtype=torch.int32)
        sub_kv[1:] = torch.cumsum(kv_counts[keep], 0)
        if keep.numel() == level.num_entries:
            rows = None
        else:
            rows = torch.cat([torch.arange(int(qo[i]), int(qo[i + 1])) for i in keep.tolist()])
            rows = (rows.pin_memory() if pin else rows).to(self.device, non_blocking=True)
        wrapper.plan(
            _host_int32(sub_qo, pin), _host_int32(sub_kv, pin),
            _int32(level.kv_indices, self.device), _host_int32(level.kv_last_page_len[keep], pin),
            self.num_qo_heads, self.num_kv_heads,
            self.head_dim, self.page_size, causal=False, pos_encoding_mode="NONE",
            q_data_type=self.dtype, kv_data_type=self.dtype,
        )  # fmt: skip
        return _LevelRun(wrapper, rows)

    # ---- once per layer ----------------------------------------------------------------

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_qo_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        meta = self._metadata
        assert meta is not None, "plan() before forward()"
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if self._k_shift is not None:  # recomputed tokens stored at canonical positions
            k = rope.rotate(k.float(), self._k_shift)
        flat_k[meta.slot_mapping] = k.to(flat_k.dtype)
        flat_v[meta.slot_mapping] = v.to(flat_v.dtype)
        if meta.copy_src.numel():
            flat_k[meta.copy_dst] = flat_k[meta.copy_src]
            flat_v[meta.copy_dst] = flat_v[meta.copy_src]
        q = q.to(self.dtype).contiguous()
        last, *shared = self._runs
        out, lse = last.wrapper.run(_shifted(q, last.q_shift), (k_cache, v_cache), return_lse=True)
        for run in shared:
            q_l = q if run.rows is None else q[run.rows]
            q_l = _shifted(q_l, run.q_shift)
            o_l, lse_l = run.wrapper.run(q_l, (k_cache, v_cache), return_lse=True)
            if run.rows is None:
                flashinfer.merge_state_in_place(out, lse, o_l, lse_l)
            else:
                o_sub, lse_sub = out[run.rows], lse[run.rows]
                flashinfer.merge_state_in_place(o_sub, lse_sub, o_l, lse_l)
                out[run.rows] = o_sub
                lse[run.rows] = lse_sub
        return out


def _shifted(q: torch.Tensor, tables) -> torch.Tensor:
    """Query rows re-rotated for a level's position deltas (in float32), or q itself."""
    if tables is None:
        return q
    return rope.rotate(q.float(), tables).to(q.dtype).contiguous()
