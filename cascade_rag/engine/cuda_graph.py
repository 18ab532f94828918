"""CUDA graphs for pure decode steps: capture per batch bucket, replay with a fresh plan.

A decode step on the GPU is hundreds of small kernels whose launches cost the host more time
than the kernels take. `DecodeGraphRunner` captures the whole forward pass of a decode step
(embedding, every layer, final norm, LM head) once per batch bucket (1, 2, 4, 8, 16, 24, 32, 48,
64, 96, 128, ... up to the largest decode batch) and number of shared cascade levels, and
replays it: per step the host only plans attention (`DecodeGraphAttention.plan`, FlashInfer's
planners writing fixed buffers), copies the step's token ids, positions and slots into static
buffers and launches one graph. A step of n sequences runs the bucket of the next size up; the
padded rows write and read only a scratch page taken from the pool for good, and their logits
are never returned.

Which steps replay (`can_run`): one query row per sequence, no boundary-page copies, no RoPE
position deltas (reuse anywhere), at most the captured number of shared levels, entries and
pages that fit the buffers. Everything else (prefill, mixed steps) runs eagerly, as before.
Graphs share one memory pool; they are captured on first use, or all at start
(`capture="warm"`, largest first so smaller graphs reuse the pool's memory).

Wiring (`make_decode_graphs`): the engine asks for a runner after building its `ModelRunner`;
the model runner replays where `can_run` says so. This module does not build step metadata
(model_runner.py does), does not sample, and is never used on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cascade_rag.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
_WORKSPACE_BYTES = 128 * 1024 * 1024


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes up to `max_batch`: powers of two to 8, then steps of 8, 16, 32,
    then of 64 past 256; `max_batch` itself is always one.

    Example:
        >>> batch_buckets(40)
        [1, 2, 4, 8, 16, 24, 32, 40]
    """
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    sizes = [s for s in _BUCKETS if s < max_batch]
    size = 320
    while size < max_batch:
        sizes.append(size)
        size += 64
    return sizes + [max_batch]


class CudaGraph:
    """One captured CUDA graph: `capture(fn)` warms `fn` up on a side stream (lazy kernel
    loading and library handles happen outside the capture), then captures it; `replay()`
    launches it."""

    def __init__(self, pool) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], None]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphRunner:
    """Replays captured CUDA graphs for pure decode steps (see the module docstring).

    Args:
        model: the model (`LlamaForCausalLM`: forward(input_ids, positions, kv_caches, attn),
            compute_logits(hidden, out=...)), already in its fused GPU form if it uses one.
        pool: the page pool; one page is taken from it for good as the padded rows' scratch.
        make_attention: `(batch_size, scratch_page) -> DecodeGraphAttention` for a bucket.
        max_batch: the largest decode batch replayed (larger ones run eagerly).
        max_shared_levels: most shared cascade levels of a replayed step (0: plain only).
        capture: "lazy" (a graph is captured on its first use) or "warm" (all at once now).
        graph_factory: `(memory_pool) -> graph` with capture(fn) and replay(); tests pass a
            stand-in that runs `fn` again on replay.

    Example:
        >>> if graphs.can_run(metadata, num_seqs=len(batch)):
        ...     logits = graphs.run(input_ids, positions, metadata)  # [n, vocab] float32
    """

    def __init__(
        self,
        model,
        pool,
        make_attention: Callable[[int, int], object],
        max_batch: int,
        max_shared_levels: int,
        capture: str = "lazy",
        graph_factory: Callable[[object], object] | None = None,
    ) -> None:
        if capture not in ("lazy", "warm"):
            raise ValueError(f"capture={capture!r} is not 'lazy' or 'warm'")
        self.model = model
        self.pool = pool
        self.device = pool.kv_caches[0][0].device
        self.buckets = batch_buckets(max_batch)
        self.max_shared_levels = max_shared_levels
        self._make_attention = make_attention
        self.scratch_page = pool.alloc(1)[0]  # never freed: padded rows write here
        on_cuda = self.device.type == "cuda"
        self._graph_factory = graph_factory or CudaGraph
        self._mempool = torch.cuda.graph_pool_handle() if on_cuda else None
        b = self.buckets[-1]
        with torch.inference_mode():
            # [2, max_batch]: input ids, positions; padded rows keep whatever they held (any
            # valid token and position: their outputs are never read)
            self._inputs = torch.zeros(2, b, dtype=torch.int64, device=self.device)
            self._staging = torch.zeros(2, b, dtype=torch.int64, pin_memory=on_cuda)
            self._logits = torch.zeros(b, model.config.vocab_size, device=self.device)
        self._staged: torch.cuda.Event | None = None
        self._attention: dict[int, object] = {}
        self._graphs: dict[tuple[int, int, bool], object] = {}  # (rows, shared levels, short)
        self._pending: tuple[AttentionMetadata, int, object] | None = None
        self.num_replays = 0
        self.num_captures = 0
        self.planned = None  # CUDA event after the last step's plan (see `run`)
        if capture == "warm":
            self.capture_all()

    # ---- which steps -------------------------------------------------------------------

    def bucket(self, n: int) -> int | None:
        """The captured batch size a step of n sequences runs with (None: too large)."""
        for size in self.buckets:
            if size >= n:
                return size
        return None

    def can_run(self, metadata: AttentionMetadata, num_seqs: int) -> bool:
        """Whether this step replays a graph: a pure decode step (one query row per sequence)
        without copies or position deltas that fits a bucket. Host-side checks only; the
        padded layout is kept for `run`."""
        self._pending = None
        n = metadata.num_tokens
        size = self.bucket(n)
        if n != num_seqs or size is None or len(metadata.levels) - 1 > self.max_shared_levels:
            return False
        layout = self._bucket_attention(size).layout(metadata)
        if layout is None:
            return False
        self._pending = (metadata, size, layout)
        return True

    # ---- one step ----------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        metadata: AttentionMetadata,
        last_rows: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Replay the step's graph; returns float32 logits [n, vocab], row i for the sequence
        whose last row is `last_rows[i]` (None: row i).

        The result is a view of a static buffer, valid until the next `run`. Call `can_run`
        first (it is called here again if it was not, or for other metadata).
        """
        if self._pending is None or self._pending[0] is not metadata:
            if not self.can_run(metadata, metadata.num_tokens):
                raise ValueError(
                    "this step cannot replay a decode graph (see can_run); run it eagerly"
                )
        _, size, layout = self._pending
        self._pending = None
        n = metadata.num_tokens
        attn = self._attention[size]
        key = (size, len(layout.shared), layout.short)
        if key not in self._graphs:
            self._capture(*key)
        attn.plan(layout)
        # the plan's copies out of pinned host buffers are queued; a caller that plans the
        # next step before this one ran (overlap) waits for this event first
        self.planned = torch.cuda.Event() if self.device.type == "cuda" else None
        if self.planned is not None:
            self.planned.record()
        attn.set_slots(metadata.slot_mapping, n)
        self._set_inputs(input_ids, positions, n)
        self._graphs[key].replay()
        self.num_replays += 1
        logits = self._logits[:n]
        if last_rows is None or _is_identity(last_rows, n):
            return logits
        if not isinstance(last_rows, torch.Tensor):
            last_rows = torch.as_tensor(np.asarray(last_rows, np.int64))
        return logits[last_rows.to(self.device)]

    def _set_inputs(self, input_ids, positions, n: int) -> None:
        if isinstance(input_ids, torch.Tensor) and input_ids.device == self.device:
            self._inputs[0, :n].copy_(input_ids, non_blocking=True)
            self._inputs[1, :n].copy_(positions, non_blocking=True)
            return
        if self._staged is not None:  # the last copy out of the pinned buffer has been made
            self._staged.synchronize()
        staging = self._staging.numpy()
        staging[0, :n] = np.asarray(input_ids, np.int64)
        staging[1, :n] = np.asarray(positions, np.int64)
        self._inputs[:, :n].copy_(self._staging[:, :n], non_blocking=True)
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()

    # ---- capture -----------------------------------------------------------------------

    def _bucket_attention(self, size: int):
        attn = self._attention.get(size)
        if attn is None:
            attn = self._attention[size] = self._make_attention(size, self.scratch_page)
        return attn

    @torch.inference_mode()
    def _capture(self, size: int, num_shared: int, short: bool = False) -> None:
        attn = self._bucket_attention(size)
        attn.plan_dummy(num_shared, short)  # every row reads and writes the scratch page
        ids, positions = self._inputs[0, :size], self._inputs[1, :size]
        logits = self._logits[:size]
        kv_caches = self.pool.kv_caches

        def forward() -> None:
            hidden = self.model(ids, positions, kv_caches, attn)
            self.model.compute_logits(hidden, out=logits)

        graph = self._graph_factory(self._mempool)
        graph.capture(forward)
        self._graphs[(size, num_shared, short)] = graph
        self.num_captures += 1
        logger.debug(
            "captured the decode graph of %d rows, %d shared levels, short last level %s",
            size, num_shared, short,
        )  # fmt: skip

    def capture_all(self) -> None:
        """Capture every bucket, number of shared levels and last-level wrapper now, largest
        bucket first."""
        for size in reversed(self.buckets):
            for num_shared in range(self.max_shared_levels + 1):
                for short in self._bucket_attention(size).last_variants:
                    if (size, num_shared, short) not in self._graphs:
                        self._capture(size, num_shared, short)


def _is_identity(rows, n: int) -> bool:
    if isinstance(rows, torch.Tensor):
        return False  # a device tensor cannot be checked without a sync: gather
    return len(rows) == n and all(r == i for i, r in enumerate(rows))


def make_decode_graphs(config, runner) -> DecodeGraphRunner | None:
    """The decode graph runner an engine uses, or None (graphs off, or not possible here).

    Needs `config.cuda_graphs`, a CUDA device and the FlashInfer backend (`runner.attn`);
    otherwise it logs why and returns None.

    Args:
        config: the `EngineConfig`.
        runner: the engine's `ModelRunner` (its model, pool and attention backend).
    """
    if not config.cuda_graphs:
        return None
    why = None
    if not config.is_cuda:
        why = f"device={config.device!r} is not CUDA"
    else:
        try:
            from cascade_rag.attention.flashinfer_backend import FlashInferAttention
        except ImportError:
            why = "FlashInfer is not installed"
        else:
            if not isinstance(runner.attn, FlashInferAttention):
                why = f"the attention backend is {type(runner.attn).__name__}, not FlashInfer"
    if why is not None:
        logger.info("cuda_graphs=True is ignored: %s; every step runs eagerly", why)
        return None
    from cascade_rag.attention.flashinfer_graph import DecodeGraphAttention

    mc = runner.model.config
    pool = runner.pool
    max_len = min(mc.max_position_embeddings, config.max_model_len or mc.max_position_embeddings)
    max_pages_per_seq = -(-max_len // pool.page_size) + 1
    device = runner.device
    workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    dtype = runner.model.dtype

    def make_attention(batch_size: int, scratch_page: int) -> DecodeGraphAttention:
        return DecodeGraphAttention(
            mc.num_qo_heads, mc.num_kv_heads, mc.head_dim, pool.page_size, dtype, device,
            batch_size, max(config.levels - 1, 0), pool.num_pages, scratch_page, workspace,
            max_pages_per_seq=max_pages_per_seq, shared_pieces=config.cuda_graph_shared_pieces,
            short_last_tokens=config.cuda_graph_short_last_tokens,
            fused_rope=config.cuda_graph_fused_rope,
        )  # fmt: skip

    return DecodeGraphRunner(
        runner.model,
        pool,
        make_attention,
        max_batch=config.cuda_graph_max_batch or config.max_num_seqs,
        max_shared_levels=max(config.levels - 1, 0),
        capture=config.cuda_graph_capture,
    )


def run_with_graphs(runner, graphs: DecodeGraphRunner | None, batch) -> torch.Tensor:
    """`runner.run(batch)` with `graphs` in place of the runner's own (None: eager), returned as
    a copy (graph logits live in a static buffer that the next replay overwrites). For tests
    and benchmarks that compare graph replay with eager execution on the same engine."""
    saved, runner.graphs = runner.graphs, graphs
    try:
        with torch.inference_mode():
            return runner.run(batch).clone()
    finally:
        runner.graphs = saved
