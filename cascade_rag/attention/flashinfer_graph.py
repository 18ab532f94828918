"""Graph-safe FlashInfer attention for pure decode steps: fixed buffers, planned outside the graph.

A CUDA graph replays its kernels with the pointers and launch shapes they were captured with, so
everything that changes from one decode step to the next must sit in buffers the graph already
points to, and every launch shape must be fixed. `DecodeGraphAttention` serves one batch bucket
of `batch_size` rows; a step of n <= batch_size sequences (one query row each) is padded:

- Last level: FlashInfer's paged decode wrapper created with `use_cuda_graph=True` over fixed
  `kv_indptr` / `kv_indices` / `kv_last_page_len` buffers. Padded rows read one slot of a
  scratch page that no request owns. Long last levels (plain decode) run FlashInfer's
  tensor-core kernel for GQA groups of 4 or more, as the eager backend. A step whose longest
  last-level entry has at most `short_last_tokens` tokens (cascade decode: only each request's
  own tokens are left there) runs a second wrapper instead, by default the CUDA-core decode
  kernel (H200, 128 rows of ~44 own tokens, Llama-3.2-1B shape: 161 us per step for 16 layers
  against 474 us for the tensor-core kernel, each plus its split-KV merge of about 75 us);
  which wrapper a step uses is part of its graph
  (`DecodeLayout.short`). A graph-mode plan always splits keys across CTAs and merges the
  parts, except the tensor-core kernel planned with split-KV off (`short_last_kernel="prefill"`).
- Shared levels: paged prefill wrappers (not causal, docs/design.md rule 5) over a fixed number
  of entries, `shared_entry_capacity(batch_size, group_size)`: the step's entries (runs of
  entries without keys merged into one), then entries without rows; the padded rows [n,
  batch_size) form one entry without keys, so every level still covers every row. A level's
  result is merged into the last level's with a per-row mask, so rows that read no keys in that
  level (whatever the kernel writes for them) are left exactly as they are.
- Shared pieces (`shared_pieces` > 1): a shared level's few long entries give few CTAs (128
  rows x 8 KV heads over an 8K prefix: 32), so the keys must be split to fill the GPU. Instead
  of FlashInfer's own split (partial results in float32, merged by a kernel of its own), each
  entry's pages are cut into `pieces` contiguous parts, each part an entry of its own over a
  copy of the query rows (the queries are repeated piece-major, [pieces * batch_size] rows;
  the level's page list is permuted once per plan so that the parts' pages follow each
  other), planned with split-KV off; the parts' results are merged into the last level's one
  piece at a time, each with its own row mask. This also lets FlashInfer's Hopper kernels
  ("fa3", which never split keys) run shared levels. Measured on the H200 (128 rows over an
  8K shared prefix, 16 layers, per step): FA2 with its own split 633 us of attention plus 296
  us for its split-KV merge; FA3 in 4 parts 552 us plus 113 us of in-place merges; FA2 in 4
  parts 1,186 us (so parts default to FA3, on GPUs of compute capability 9 or more). The
  states of a level's parts are merged into the last level's by one kernel per layer
  (`attention.merge.merge_blocks`, Triton), not one FlashInfer merge per part.
- Kept plans: FlashInfer plans the CUDA-core decode kernel from the page counts alone
  (kv_indptr), so a step whose counts equal that wrapper's last plan keeps it and only copies
  the last-page lengths (and page ids, when they come as a new tensor).
- New K/V: one `append_paged_kv_cache` call writes k and v, addressing the whole pool as a
  single page list (page i at index i) with each row's slot as its position; padded rows write
  the scratch slot.
- Fused RoPE (`rope_and_attend`, with `fused_rope`): the model hands q and k before RoPE,
  and one kernel (attention/rope_append.py) rotates them, writes the rotated query rows once
  per part (so no separate copy for the parts) and appends k and v at the rows' slots; then
  the levels run as in `forward`.

`plan` runs FlashInfer's planners on the host and copies the step's index arrays into the
buffers (once per step); `forward` (once per layer) launches kernels only: no host reads, no
data-dependent shapes, so it can be captured. How many shared levels `forward` runs is part of
a captured graph (`num_shared`, set by `plan`): the graph runner keeps one graph per bucket and
number of shared levels.

It does not capture or replay graphs (engine/cuda_graph.py does), does not decide the levels
(the model runner does) and takes no step with boundary-page copies, position deltas or more
entries than its buffers hold (`layout` returns None: such steps run eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass

import flashinfer
import numpy as np
import torch

from cascade_rag.attention import rope_append as _rope_append
from cascade_rag.attention.merge import merge_blocks
from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel

# FlashInfer picks a graph-mode prefill plan's query tile for its longest possible entry,
# (total rows - entries + 1) rows of `group_size` query heads each; above this many packed rows
# it takes the 128-row tile, so a long shared entry over many rows is read by few tiles.
_LARGE_TILE_ROWS = 64


def shared_entry_capacity(batch_size: int, group_size: int) -> int:
    """Entries a shared level of a `batch_size` bucket holds (its fixed FlashInfer batch size).

    Fewer entries than rows make FlashInfer's worst-case entry longer, hence its query tile
    larger: with at most `batch_size - 64 // group_size` entries it is the 128-row tile, as in
    an eager plan of one entry over the whole batch. A bucket whose rows fit one 64-row tile
    keeps one entry per row.

    Example:
        >>> shared_entry_capacity(128, 4)  # Llama-3.2-1B: 32 query heads, 8 KV heads
        112
    """
    if batch_size * group_size <= _LARGE_TILE_ROWS:
        return batch_size
    return batch_size - _LARGE_TILE_ROWS // group_size


def default_shared_pieces(
    batch_size: int, group_size: int, num_kv_heads: int, num_sms: int, most: int = 4
) -> int:
    """Parts a shared level's keys are cut into so that one shared entry over the whole bucket
    gives about one CTA per SM: its query tiles (128 packed rows each) x KV heads per part.

    Each part costs one merge kernel per layer (about 1.8 us on the H200: 8 parts measured
    slower than 4 at 128 rows), so a bucket that would need more than `most` parts is left to
    FlashInfer's own split (1).

    Example:
        >>> default_shared_pieces(128, 4, 8, 132)  # H200: 4 tiles x 8 heads = 32 CTAs a part
        4
    """
    tiles = -(-batch_size * group_size // 128) * num_kv_heads
    pieces = max(1, num_sms // tiles)
    return pieces if pieces <= most else 1


def piece_bounds(num_pages: np.ndarray, pieces: int) -> np.ndarray:
    """[entries, pieces + 1] page offsets of each entry's parts: part j of an entry of P pages
    is its pages [floor(j P / pieces), floor((j + 1) P / pieces)); the last part ends with the
    entry's last page (and so holds its partial page).

    Example:
        >>> piece_bounds(np.array([10, 2]), 4).tolist()
        [[0, 2, 5, 7, 10], [0, 0, 1, 1, 2]]
    """
    j = np.arange(pieces + 1)
    return (num_pages[:, None] * j[None, :]) // pieces


def unsplit_decode_rows(
    workspace: torch.Tensor,
    batch_size: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    scratch_page: int,
) -> int:
    """Rows from which FlashInfer's graph-mode plan of its CUDA-core decode kernel stops
    splitting keys: it splits (and merges the splits) while rows x KV heads is below its grid
    size, SMs x CTAs per SM, and then pads a split plan to grid size / KV heads rows, which is
    what this reads back from a plan of `batch_size` one-slot rows. `batch_size` if the plan
    does not split, or says nothing readable.
    """
    i32 = dict(dtype=torch.int32, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.zeros(batch_size + 1, **i32),
        paged_kv_indices_buffer=torch.zeros(batch_size, **i32),
        paged_kv_last_page_len_buffer=torch.zeros(batch_size, **i32),
    )
    wrapper.plan(
        torch.arange(batch_size + 1, dtype=torch.int32),
        torch.full((batch_size,), scratch_page, dtype=torch.int32),
        torch.ones(batch_size, dtype=torch.int32),
        num_qo_heads, num_kv_heads, head_dim, page_size,
        pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype,
    )  # fmt: skip
    try:  # FlashInfer 0.7's DecodePlanInfo: [padded_batch_size, ..., split_kv] (10 values)
        info = [int(x) for x in wrapper._plan_info]
        padded, split = info[0], bool(info[9])
    except (AttributeError, IndexError, TypeError, ValueError):
        return batch_size
    return max(batch_size, padded) if split else batch_size


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.int64).numpy()


@dataclass
class _SharedPlan:
    """One shared level, padded to the bucket: what `plan` hands the level's wrapper."""

    qo_indptr: np.ndarray  # [capacity + 1] int32
    kv_indptr: np.ndarray  # [capacity + 1] int32
    kv_indices: torch.Tensor  # [kv_indptr[-1]] page ids (host or device)
    kv_last_page_len: np.ndarray  # [capacity] int32
    mask: np.ndarray  # [pieces, batch_size] bool: rows that read keys in each part
    source: tuple[CascadeLevel, int] | None = None  # (level, n) it pads; None: a dummy


@dataclass
class DecodeLayout:
    """A decode step padded to a bucket (host arrays; `DecodeGraphAttention.layout`)."""

    num_rows: int  # n, the step's real rows
    kv_indptr: np.ndarray  # [batch_size + 1] int32, last level
    kv_indices: torch.Tensor  # last level's page ids, without the padded rows' pages
    kv_last_page_len: np.ndarray  # [batch_size] int32
    shared: list[_SharedPlan]
    short: bool = False  # the last level is short: it runs the short-level wrapper


@dataclass
class _SharedLevel:
    wrapper: object
    mask: torch.Tensor  # [pieces, batch_size] bool on the device
    out: torch.Tensor  # [pieces * batch_size, num_qo_heads, head_dim]: results (static)
    lse: torch.Tensor  # [pieces * batch_size, num_qo_heads] float32


class DecodeGraphAttention:
    """Attention of pure decode steps for one batch bucket, capturable in a CUDA graph.

    Use `layout(metadata)` to pad a step (None: it does not fit), `plan(layout)` and
    `set_slots(slot_mapping, n)` once per step outside the graph, and `forward` per layer,
    inside or outside a graph. The attention backend protocol's `plan(metadata)` does all three.

    Args:
        num_qo_heads, num_kv_heads, head_dim: attention shape.
        page_size: slots per page.
        dtype: dtype of q and of the KV cache (bfloat16 or float16).
        device: CUDA device.
        batch_size: rows of the bucket (a step has at most this many sequences).
        max_shared_levels: most shared (non-causal) levels a step has.
        num_pages: pages in the KV pool (`append_paged_kv_cache` addresses them all).
        scratch_page: a page no request reads or writes; padded rows write and read it.
        workspace: FlashInfer float workspace, shared by every wrapper (one graph runs at a
            time, and each plan rewrites what its own graph reads).
        max_pages_per_seq: most pages one sequence's level holds (sizes the index buffers);
            None: `num_pages`.
        shared_backend: FlashInfer prefill backend of the shared levels ("fa2" splits long
            key ranges across CTAs; "fa3" does not, so it needs `shared_pieces` > 1); None:
            "fa3" where the shared levels are cut into parts on a GPU of compute capability 9
            or more, else "fa2".
        shared_pieces: parts each shared entry's keys are cut into (see the module
            docstring); 1: FlashInfer splits them itself; None: `default_shared_pieces` on a
            GPU of compute capability 9 or more, else 1.
        short_last_tokens: a step whose longest last-level entry has at most this many tokens
            runs the short-level wrapper; None: every step runs the long-level one.
        short_last_kernel: the short-level wrapper's kernel: "decode" (CUDA cores) or
            "prefill" (tensor cores, split-KV off).
        short_last_rows: rows the short-level wrapper (CUDA-core decode kernel) is planned
            for, at least `batch_size` (the rows after the step's read one scratch slot each).
            FlashInfer splits the keys of that kernel in graph mode, and so merges the splits,
            unless rows x KV heads reach its grid size (SMs x CTAs per SM); padding the rows
            to that many removes the merge. Used only with `fused_rope` (the query rows then
            sit in a buffer of that many rows). None: the rows FlashInfer's planner asks for
            (`unsplit_decode_rows`) where that is at most 2.5 x `batch_size` (smaller buckets
            keep the split: it is their parallelism), else `batch_size`; 0: `batch_size`.
        fused_rope: offer `rope_and_attend` (RoPE, the parts' query copies and the KV append
            in one kernel, attention/rope_append.py), which the model then calls instead of
            its own RoPE and `forward`.

    Example:
        >>> attn = DecodeGraphAttention(32, 8, 64, 16, torch.bfloat16, "cuda", 48, 2,
        ...                             pool.num_pages, scratch, workspace)
        >>> layout = attn.layout(metadata)  # a decode step of 37 sequences
        >>> attn.plan(layout); attn.set_slots(metadata.slot_mapping, 37)
        >>> out = attn.forward(q, k, v, k_cache, v_cache)  # [48, 32, 64]; rows 37.. are padding
    """

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch_size: int,
        max_shared_levels: int,
        num_pages: int,
        scratch_page: int,
        workspace: torch.Tensor,
        max_pages_per_seq: int | None = None,
        shared_backend: str | None = None,
        shared_pieces: int | None = None,
        short_last_tokens: int | None = 512,
        short_last_kernel: str = "decode",
        short_last_rows: int | None = None,
        fused_rope: bool = False,
    ) -> None:
        if num_pages * page_size >= 2**31:
            raise ValueError(
                f"{num_pages} pages x {page_size} slots do not fit the int32 slot ids of "
                "FlashInfer's KV append; lower kv_cache_tokens or turn cuda_graphs off"
            )
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = b = batch_size
        self.scratch_page = scratch_page
        self.scratch_slot = scratch_page * page_size
        group = num_qo_heads // num_kv_heads
        props = None
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
        hopper = props is not None and props.major >= 9  # FlashInfer's FA3 kernels run there
        if shared_pieces is None:
            shared_pieces = 1
            if hopper:
                sms = props.multi_processor_count
                shared_pieces = default_shared_pieces(b, group, num_kv_heads, sms)
        if shared_pieces < 1:
            raise ValueError(f"shared_pieces={shared_pieces} is not a positive number of parts")
        if short_last_kernel not in ("decode", "prefill"):
            raise ValueError(f"short_last_kernel={short_last_kernel!r}: 'decode' or 'prefill'")
        if shared_backend is None:
            shared_backend = "fa3" if shared_pieces > 1 and hopper else "fa2"
        self.pieces = p = shared_pieces
        self.short_last_tokens = short_last_tokens
        self._short_no_split = short_last_kernel == "prefill"
        self.max_shared_entries = shared_entry_capacity(b, group)
        per_seq = min(max_pages_per_seq or num_pages, num_pages)
        # rows each last-level wrapper is planned for (see short_last_rows)
        short_rows = b
        if fused_rope and short_last_tokens is not None and short_last_kernel == "decode":
            if short_last_rows is None:
                want = unsplit_decode_rows(
                    workspace, b, num_qo_heads, num_kv_heads, head_dim, page_size, dtype,
                    self.device, scratch_page,
                )  # fmt: skip
                short_last_rows = want if want <= 2.5 * b else b
            short_rows = max(b, short_last_rows or b)
        self._rows = {False: b, True: short_rows}
        self.max_indices = b * per_seq + b  # + one scratch page per padded row
        i32 = dict(dtype=torch.int32, device=self.device)
        self._decode_indptr = torch.zeros(short_rows + 1, **i32)
        self._decode_indices = torch.zeros(self.max_indices + short_rows - b, **i32)
        self._decode_last_len = torch.zeros(short_rows, **i32)
        # False: the long-level wrapper; True (made only with short_last_tokens): the short one.
        # Both read the same buffers (the long one their first rows); a step plans and runs
        # one of them.
        tensor_cores = {False: group >= 4, True: short_last_kernel == "prefill"}
        self._decodes = {
            short: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=tensor_cores[short],
                paged_kv_indptr_buffer=self._decode_indptr[: self._rows[short] + 1],
                paged_kv_indices_buffer=self._decode_indices,
                paged_kv_last_page_len_buffer=self._decode_last_len[: self._rows[short]],
            )
            for short in ((False,) if short_last_tokens is None else (False, True))
        }
        # FlashInfer's plan of the CUDA-core decode kernel reads only the page counts
        # (kv_indptr; the kernel reads the last-page lengths from their buffer), so a step
        # with the counts of that wrapper's last plan keeps the plan and copies only what
        # moved: last-page lengths, and page ids when they are a new tensor.
        self._plan_by_pages = {short: not tc for short, tc in tensor_cores.items()}
        self._decode_planned: dict[bool, tuple[np.ndarray, torch.Tensor]] = {}
        self.num_decode_plans = 0  # FlashInfer plans of the last level (kept plans not counted)
        # outputs in static buffers: no allocation (or zero fill) inside a graph
        heads = (num_qo_heads, head_dim)
        self._out = torch.empty(short_rows, *heads, dtype=dtype, device=self.device)
        self._lse = torch.empty(short_rows, num_qo_heads, dtype=torch.float32, device=self.device)
        # the model calls this, when set, instead of rotating q and k and calling `forward`
        self.rope_and_attend = self._rope_and_attend if fused_rope else None
        # the query rows repeated once per part (`rope_and_attend` writes its rotated rows
        # there too: block 0, then the copies; rows after them are read by padding only)
        rows = max(p * b if p > 1 else 0, short_rows if fused_rope else 0)
        self._q_rot = None
        if rows:  # zeros: rows nothing writes are read as finite queries of padded rows
            self._q_rot = torch.zeros(rows, *heads, dtype=dtype, device=self.device)
        self._q_rep = self._q_rot[: p * b] if p > 1 else None
        e = self.max_shared_entries * p

        self._shared: list[_SharedLevel] = []
        for _ in range(max_shared_levels):
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                workspace,
                "NHD",
                use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(e + 1, **i32),
                paged_kv_indptr_buf=torch.zeros(e + 1, **i32),
                paged_kv_indices_buf=torch.zeros(self.max_indices, **i32),
                paged_kv_last_page_len_buf=torch.zeros(e, **i32),
                backend=shared_backend,
            )
            mask = torch.zeros(p, b, dtype=torch.bool, device=self.device)
            out = torch.empty(p * b, num_qo_heads, head_dim, dtype=dtype, device=self.device)
            lse = torch.empty(p * b, num_qo_heads, dtype=torch.float32, device=self.device)
            self._shared.append(_SharedLevel(wrapper, mask, out, lse))
        # A shared level that comes back as the same object (the model runner reuses its
        # levels while the batch's sharing does not change) with the same rows is neither
        # padded nor planned again: its wrapper still holds that plan.
        self._padded: list[_SharedPlan | None] = [None] * max_shared_levels
        self._planned: list[tuple[CascadeLevel, int] | None] = [None] * max_shared_levels
        # the KV append sees the pool as one request whose page i is page i: a row's slot is
        # its position in that request
        self._append_pages = torch.arange(num_pages, **i32)
        self._append_indptr = torch.tensor([0, num_pages], **i32)
        self._append_last_len = torch.tensor([page_size], **i32)
        self._append_batch = torch.zeros(b, **i32)
        self.slots = torch.full((b,), self.scratch_slot, **i32)  # [batch_size] where K/V go
        self._scratch_from = 0  # slots[i] is the scratch slot for every i >= this
        self.num_shared = 0  # shared levels `forward` runs (fixed within a captured graph)
        self.short = False  # which last-level wrapper `forward` runs (fixed within a graph)
        self.num_plans = 0  # steps planned
        self.num_shared_plans = 0  # shared-level wrapper plans (reused plans not counted)

    @property
    def max_shared_levels(self) -> int:
        return len(self._shared)

    @property
    def last_variants(self) -> tuple[bool, ...]:
        """The values `DecodeLayout.short` takes in this bucket (each needs its own graph)."""
        return tuple(self._decodes)

    # ---- once per step (host) ------------------------------------------------------------

    def layout(self, metadata: AttentionMetadata) -> DecodeLayout | None:
        """The step padded to this bucket, or None if it is no pure decode step that fits.

        A step fits if it has one query row per last-level entry, at most `batch_size` rows,
        no boundary-page copies and no position deltas, at most `max_shared_levels` shared
        levels of at most `max_shared_entries` entries (after merging runs of entries without
        keys, and one more for the padded rows), and page lists that fit the index buffers.
        """
        n = metadata.num_tokens
        levels = metadata.levels
        if not 0 < n <= self.batch_size or len(levels) - 1 > self.max_shared_levels:
            return None
        if metadata.has_rope_deltas or metadata.copy_src.numel():
            return None
        last = levels[-1]
        if last.num_entries != n:
            return None
        pad = self.batch_size - n
        indptr = _host(last.kv_indptr)
        if int(indptr[-1]) + pad > self.max_indices:
            return None
        kv_indptr = np.concatenate([indptr, indptr[-1] + np.arange(1, pad + 1)])
        own_last = _host(last.kv_last_page_len)
        short = False
        if self.short_last_tokens is not None:
            longest = int(((indptr[1:] - indptr[:-1] - 1) * self.page_size + own_last).max())
            short = longest <= self.short_last_tokens
        last_len = np.concatenate([own_last, np.ones(pad, np.int64)])
        shared = []
        for j, level in enumerate(levels[:-1]):
            plan = self._padded[j]
            if plan is None or plan.source[0] is not level or plan.source[1] != n:
                plan = self._shared_layout(level, n)
                if plan is None:
                    return None
                self._padded[j] = plan
            shared.append(plan)
        return DecodeLayout(
            n, kv_indptr.astype(np.int32), last.kv_indices, last_len.astype(np.int32), shared,
            short,
        )  # fmt: skip

    def _shared_layout(self, level: CascadeLevel, n: int) -> _SharedPlan | None:
        qo, kv = _host(level.qo_indptr), _host(level.kv_indptr)
        last_len = _host(level.kv_last_page_len)
        has_keys = kv[1:] > kv[:-1]
        # an entry without keys is kept only where a run of such entries starts
        keep = has_keys.copy()
        keep[0] = True
        keep[1:] |= has_keys[:-1]
        kept = int(keep.sum())
        fill = self.max_shared_entries - kept
        if fill < (n < self.batch_size) or int(kv[-1]) > self.max_indices:
            return None
        b, p = self.batch_size, self.pieces
        starts_qo = qo[:-1][keep]
        pages = (kv[1:] - kv[:-1])[keep]
        bounds = piece_bounds(pages, p)  # [kept, p + 1]
        part_pages = bounds[:, 1:] - bounds[:, :-1]  # [kept, p]
        # part j of every kept entry, piece-major: block j of the repeated queries is rows
        # [j b, (j + 1) b); each block ends with one entry for the padded rows [n, b)
        padded = [0] if n < b else []
        qo_p, lens_p, counts = [], [], []
        for j in range(p):
            qo_p += [j * b + starts_qo, [j * b + n] if padded else []]
            full = last_len[keep] if j == p - 1 else self.page_size
            lens_p += [np.where(part_pages[:, j] > 0, full, 0), padded]
            counts += [part_pages[:, j], padded]
        extra = p * (fill - len(padded))  # entries without rows or keys
        qo_p = np.concatenate(qo_p + [np.full(extra + 1, p * b)])
        counts = np.concatenate(counts + [np.zeros(extra, np.int64)])
        lens_p = np.concatenate(lens_p + [np.zeros(extra, np.int64)])
        indices = level.kv_indices
        kv_p = np.concatenate([[0], np.cumsum(counts)]) + (kv[0] if p == 1 else 0)
        if p > 1:  # the parts' pages in entry order within each part, parts one after another
            first = kv[:-1][keep]
            perm = np.concatenate(
                [first[i] + np.arange(bounds[i, j], bounds[i, j + 1]) for j in range(p)
                 for i in range(kept)] + [np.zeros(0, np.int64)]
            )  # fmt: skip
            indices = indices[torch.from_numpy(perm).to(indices.device)]
        row_entry = np.repeat(np.arange(len(has_keys)), qo[1:] - qo[:-1])  # entry of each row
        kept_of = np.cumsum(keep) - 1  # an entry's kept entry (its run's start)
        mask = np.zeros((p, b), dtype=bool)
        mask[:, :n] = (part_pages[kept_of[row_entry]] > 0).T & has_keys[row_entry]
        return _SharedPlan(
            qo_p.astype(np.int32),
            kv_p.astype(np.int32),
            indices,
            lens_p.astype(np.int32),
            mask,
            (level, n),
        )

    def plan(self, layout: DecodeLayout | AttentionMetadata) -> None:
        """Plan every wrapper for a step and copy its index arrays into the fixed buffers.

        Given `AttentionMetadata` (the backend protocol), it also sets the step's slots; it
        raises ValueError for a step that does not fit (see `layout`).
        """
        if isinstance(layout, AttentionMetadata):
            metadata = layout
            layout = self.layout(metadata)
            if layout is None:
                raise ValueError(
                    f"this step does not fit the {self.batch_size}-row decode graph buffers "
                    "(not a pure decode step, copies, position deltas or too many entries); "
                    "run it with the eager backend"
                )
            self.set_slots(metadata.slot_mapping, metadata.num_tokens)
        common = dict(pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)
        pad = self.batch_size - layout.num_rows
        self._plan_last_level(layout, common)
        pad += self._rows[layout.short] - self.batch_size
        if pad:  # the padded rows' scratch pages follow the real page lists
            start = int(layout.kv_indptr[layout.num_rows])
            self._decode_indices[start : start + pad].fill_(self.scratch_page)
        for j, (level, plan) in enumerate(zip(self._shared, layout.shared)):
            done = self._planned[j]
            if plan.source is not None and done is not None and done[0] is plan.source[0]:
                if done[1] == plan.source[1]:
                    continue  # planned for this very level and rows already
            self._planned[j] = plan.source
            self.num_shared_plans += 1
            level.wrapper.plan(
                torch.from_numpy(plan.qo_indptr),
                torch.from_numpy(plan.kv_indptr),
                plan.kv_indices,
                torch.from_numpy(plan.kv_last_page_len),
                self.num_qo_heads,
                self.num_kv_heads,
                self.head_dim,
                self.page_size,
                causal=False,
                disable_split_kv=self.pieces > 1,
                **common,
            )
            level.mask.copy_(torch.from_numpy(plan.mask), non_blocking=True)
        self.num_shared = len(layout.shared)
        self.short = layout.short
        self.num_plans += 1

    def _plan_last_level(self, layout: DecodeLayout, common: dict) -> None:
        """Plan the last level's wrapper, or keep its plan (see `_plan_by_pages`)."""
        short = layout.short
        kv_indptr, last_len = layout.kv_indptr, layout.kv_last_page_len
        extra = self._rows[short] - self.batch_size
        if extra:  # rows after the bucket's: one scratch slot each
            kv_indptr = np.concatenate([kv_indptr, kv_indptr[-1] + np.arange(1, extra + 1)])
            kv_indptr = kv_indptr.astype(np.int32)
            last_len = np.concatenate([last_len, np.ones(extra, np.int32)])
        kept = self._decode_planned.get(short)
        if kept is not None and np.array_equal(kept[0], kv_indptr):
            self._decode_last_len[: len(last_len)].copy_(
                torch.from_numpy(last_len), non_blocking=True
            )
            if kept[1] is not layout.kv_indices:  # new page ids, same counts
                self._decode_indices[: len(layout.kv_indices)].copy_(
                    layout.kv_indices, non_blocking=True
                )
                self._decode_planned[short] = (kept[0], layout.kv_indices)
            return
        self._decode_planned.clear()  # the wrappers share the buffers this plan rewrites
        self._decodes[short].plan(
            torch.from_numpy(kv_indptr),
            layout.kv_indices,  # host or device: the plan copies them into the buffer
            torch.from_numpy(last_len),
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            disable_split_kv=short and self._short_no_split,
            **common,
        )
        self.num_decode_plans += 1
        if self._plan_by_pages[short]:
            self._decode_planned[short] = (kv_indptr.copy(), layout.kv_indices)

    def plan_dummy(self, num_shared: int, short: bool = False) -> None:
        """Plan a step in which every row is padding (for capturing: all reads and writes go
        to the scratch page), with `num_shared` shared levels and the `short` last level's
        wrapper or the long one."""
        b, e = self.batch_size, self.max_shared_entries * self.pieces
        rows = b * self.pieces
        scratch = torch.full((b,), self.scratch_page, dtype=torch.int64)
        ones = np.ones(b, np.int32)
        shared = []
        for _ in range(num_shared):  # one entry over every row, reading one scratch slot
            qo = np.full(e + 1, rows, np.int32)
            qo[0] = 0
            kv = np.ones(e + 1, np.int32)
            kv[0] = 0
            lens = np.zeros(e, np.int32)
            lens[0] = 1
            mask = np.zeros((self.pieces, b), bool)
            shared.append(_SharedPlan(qo, kv, scratch[:1], lens, mask))
        layout = DecodeLayout(b, np.arange(b + 1, dtype=np.int32), scratch, ones, shared, short)
        self.plan(layout)
        self.set_slots(None, 0)

    def set_slots(self, slot_mapping: torch.Tensor | None, n: int) -> None:
        """Rows [0, n) write their new K/V to `slot_mapping` [n] (int64, any device), rows
        [n, batch_size) to the scratch slot."""
        if n:
            self.slots[:n].copy_(slot_mapping, non_blocking=True)
        if n < self._scratch_from:
            self.slots[n : self._scratch_from].fill_(self.scratch_slot)
        self._scratch_from = n

    # ---- once per layer (capturable) -----------------------------------------------------

    def forward(
        self,
        q: torch.Tensor,  # [batch_size, num_qo_heads, head_dim]
        k: torch.Tensor,  # [batch_size, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [batch_size, num_qo_heads, head_dim]
        kv_cache = (k_cache, v_cache)
        flashinfer.append_paged_kv_cache(
            k,
            v,
            self._append_batch,
            self.slots,
            kv_cache,
            self._append_pages,
            self._append_indptr,
            self._append_last_len,
        )
        return self._attend(q, kv_cache, repeated=False)

    def _rope_and_attend(
        self,
        positions: torch.Tensor,  # [batch_size] int
        cos_sin: torch.Tensor,  # [max_positions, head_dim] float32: cos, then sin
        q: torch.Tensor,  # [batch_size, num_qo_heads, head_dim], not rotated
        k: torch.Tensor,  # [batch_size, num_kv_heads, head_dim], not rotated
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [batch_size, num_qo_heads, head_dim]
        """`forward` of q and k not rotated yet: RoPE at `positions`, the query copies of
        the shared parts and the KV append in one kernel (`rope_append`), then attention."""
        copies = self.pieces if self.num_shared and self.pieces > 1 else 1
        _rope_append.rope_append(
            q, k, v, positions, cos_sin, self._q_rot, copies, k_cache, v_cache, self.slots
        )
        return self._attend(self._q_rot, (k_cache, v_cache), copies > 1)

    def _attend(self, q: torch.Tensor, kv_cache, repeated: bool) -> torch.Tensor:
        """Attention of the rotated query rows `q` (its first `batch_size` rows; a last-level
        wrapper planned for more rows reads as many) over the levels; `repeated`: `_q_rep`
        already holds their copies for the parts."""
        b, rows = self.batch_size, self._rows[self.short]
        decode = self._decodes[self.short]
        q_dec, out_dec, lse_dec = q[:rows], self._out[:rows], self._lse[:rows]
        if not self.num_shared:
            return decode.run(q_dec, kv_cache, out=out_dec)[:b]
        decode.run(q_dec, kv_cache, out=out_dec, lse=lse_dec, return_lse=True)
        out, lse, q = self._out[:b], self._lse[:b], q[:b]
        p = self.pieces
        q_l = q
        if p > 1:
            q_l = self._q_rep
            if not repeated:
                q_l.view(p, *q.shape).copy_(q.unsqueeze(0).expand(p, *q.shape))
        for level in self._shared[: self.num_shared]:
            out_l, lse_l = level.wrapper.run(
                q_l, kv_cache, out=level.out, lse=level.lse, return_lse=True
            )
            merge_blocks(out, lse, out_l, lse_l, level.mask, base=True)
        return out
