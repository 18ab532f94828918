"""When a shared cascade level pays on this GPU: measure it, store it per device, look it up.

A shared level saves reading the shared prefix once per request but costs one more kernel
launch and a merge of partial results. The cascade planner therefore makes a shared level only
where the KV reads it saves, `(requests - 1) * shared_tokens * kv_bytes_per_token` per layer and
step, exceed a per-GPU constant: `level_overhead_bytes` (the FlashInfer backend turns it into
its `min_shared_tokens`).

- `measure(device)` times, with FlashInfer on the current GPU, one decode step of one attention
  layer as plain paged decode and as a 2-level cascade (shared prefix + each request's own
  tokens) over a grid of batch x shared length (a few seconds of GPU time), and
  `fit_level_overhead` picks the saved-bytes threshold that loses the least time over the grid.
- `save_calibration` / `load_calibrations` keep results in one JSON file, keyed by the GPU's
  name and the FlashInfer version (`$CASCADE_RAG_CALIBRATION`, else `calibration.json` in the
  cache dir, `$CASCADE_RAG_CACHE` or ~/.cache/cascade_rag); writes are atomic and locked.
- `level_overhead_bytes(device_name)` returns the stored value, else the built-in default
  (measured on an H100, also used for the H200; other GPUs get it with a logged note).

`cascade-rag calibrate` runs `measure` and stores the result. This module does not change the
planner or the backend, and imports FlashInfer only inside `measure`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CALIBRATION_ENV = "CASCADE_RAG_CALIBRATION"
CALIBRATION_FILE = "calibration.json"
_STORE_VERSION = 1

# Calibrated on an H100 with FlashInfer 0.7.2 (bench/bench_gpu_decode_attention.py,
# Llama-3.2-1B attention shape, 2 KB of KV per token): cascade lost at 123K-129K saved tokens
# (batch 16 x 8K, batch 64 x 2K) and won at 491K-522K (batch 16 x 32K, 64 x 8K, 256 x 2K).
DEFAULT_LEVEL_OVERHEAD_BYTES = 600e6
_DEFAULT_DEVICES = ("H100", "H200")  # names the default was measured on or transfers to
_NOTED: set[tuple[str, str | None]] = set()  # (device, flashinfer) already warned about

# the measured step: Llama-3.2-1B attention (32 query heads, 8 KV heads, head_dim 64), bf16
DEFAULT_SHAPE = dict(num_qo_heads=32, num_kv_heads=8, head_dim=64, page_size=16)
DEFAULT_BATCHES = (4, 16, 64, 256)
DEFAULT_SHARED_TOKENS = (512, 2048, 8192, 32768)
DEFAULT_UNIQUE_TOKENS = 256


class CalibrationError(RuntimeError):
    """Calibration cannot run here (no CUDA device or no FlashInfer)."""


@dataclass(frozen=True)
class Timing:
    """One grid point: decode attention of one layer, plain vs 2-level cascade.

    Attributes:
        batch: requests in the step.
        shared_tokens: tokens of the prefix they share.
        saved_bytes: KV bytes the shared level saves reading: (batch - 1) * shared * bytes/token.
        plain_ms, cascade_ms: median kernel time of the step (plan once, run many).
    """

    batch: int
    shared_tokens: int
    saved_bytes: float
    plain_ms: float
    cascade_ms: float

    @property
    def gain_ms(self) -> float:
        """Time the cascade saves (negative where it loses)."""
        return self.plain_ms - self.cascade_ms


@dataclass(frozen=True)
class CalibrationResult:
    """A measured threshold with the timings it was fitted on.

    Attributes:
        device_name: `torch.cuda.get_device_name()` of the measured GPU.
        flashinfer_version: the FlashInfer release measured.
        level_overhead_bytes: break-even saved KV bytes per layer and step.
        bracketed: whether the grid held points where cascade lost and points where it won
            (otherwise the threshold lies outside the grid and is only a bound).
        timings: the grid.
        shape: the attention shape and dtype measured.
        created: when, as an ISO 8601 UTC time.
    """

    device_name: str
    flashinfer_version: str
    level_overhead_bytes: float
    bracketed: bool
    timings: tuple[Timing, ...]
    shape: dict = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["timings"] = [dataclasses.asdict(t) for t in self.timings]
        return out

    @classmethod
    def from_json(cls, data: dict) -> CalibrationResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in fields}
        kw["timings"] = tuple(Timing(**t) for t in data.get("timings", ()))
        return cls(**kw)


# ---- the fit ---------------------------------------------------------------------------------


def fit_level_overhead(timings: list[Timing] | tuple[Timing, ...]) -> tuple[float, bool]:
    """The saved-bytes threshold for "use a shared level" that loses the least time on `timings`.

    The rule "cascade where saved_bytes > T" loses, at each grid point, the time of the wrong
    choice: |gain| where it picks cascade and cascade was slower, or picks plain and cascade was
    faster. T is chosen among the geometric midpoints between consecutive measured saved-bytes
    values (and beyond both ends); among equally good ones the middle of their range (in log).

    Args:
        timings: grid points (at least one).

    Returns:
        (threshold in bytes, bracketed): bracketed is False when cascade won everywhere (the
        threshold is then half the smallest saving) or lost everywhere (twice the largest).

    Raises:
        ValueError: no timings, or a saved_bytes value that is not positive.

    Example:
        >>> lost = Timing(16, 2048, 6.0e7, plain_ms=1.0, cascade_ms=1.2)
        >>> won = Timing(64, 8192, 1.0e9, plain_ms=4.0, cascade_ms=1.0)
        >>> fit_level_overhead([lost, won])  # sqrt(6e7 * 1e9)  # doctest: +ELLIPSIS
        (244948974.27..., True)
    """
    if not timings:
        raise ValueError("fit_level_overhead needs at least one timing")
    if any(not t.saved_bytes > 0 for t in timings):
        raise ValueError(f"saved_bytes must be > 0, got {[t.saved_bytes for t in timings]}")
    values = sorted({t.saved_bytes for t in timings})
    candidates = [values[0] / 2]
    candidates += [(a * b) ** 0.5 for a, b in zip(values, values[1:])]
    candidates.append(values[-1] * 2)

    def loss(threshold: float) -> float:
        lost = 0.0
        for t in timings:
            if t.saved_bytes > threshold:
                lost += max(0.0, -t.gain_ms)
            else:
                lost += max(0.0, t.gain_ms)
        return lost

    losses = [loss(c) for c in candidates]
    best = min(losses)
    tied = [c for c, x in zip(candidates, losses) if x <= best + 1e-12]
    threshold = (tied[0] * tied[-1]) ** 0.5
    wins = [t.gain_ms > 0 for t in timings]
    return threshold, any(wins) and not all(wins)


# ---- the store -------------------------------------------------------------------------------


def calibration_path() -> Path:
    """`$CASCADE_RAG_CALIBRATION`, else calibration.json in the cache dir."""
    env = os.environ.get(CALIBRATION_ENV)
    if env:
        return Path(env).expanduser()
    from cascade_rag.models.loader import default_cache_dir

    return default_cache_dir() / CALIBRATION_FILE


def store_key(device_name: str, flashinfer_version: str) -> str:
    """The store's key for a GPU name and FlashInfer version."""
    return f"{device_name} | flashinfer {flashinfer_version}"


def load_calibrations(path: str | Path | None = None) -> dict[str, CalibrationResult]:
    """Every stored result by `store_key`; {} when the file is missing or unreadable (logged)."""
    path = Path(path) if path is not None else calibration_path()
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        return {k: CalibrationResult.from_json(v) for k, v in entries.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable calibration file %s (%s)", path, exc)
        return {}


def save_calibration(result: CalibrationResult, path: str | Path | None = None) -> Path:
    """Add or replace `result`'s entry in the store; returns the file's path.

    The read-modify-write holds a lock file beside the store, and the new file is renamed into
    place, so concurrent calibrations of different GPUs keep both and a reader never sees half
    a file. An unreadable store is replaced (its entries are lost, logged).
    """
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    path = Path(path) if path is not None else calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        entries = {k: v.to_json() for k, v in load_calibrations(path).items()}
        entries[store_key(result.device_name, result.flashinfer_version)] = result.to_json()
        text = json.dumps({"version": _STORE_VERSION, "entries": entries}, indent=2)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def installed_flashinfer_version() -> str | None:
    """The installed flashinfer-python release, without importing it; None if absent."""
    from importlib import metadata

    for dist in ("flashinfer-python", "flashinfer"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def level_overhead_bytes(
    device_name: str,
    flashinfer_version: str | None = None,
    path: str | Path | None = None,
) -> float:
    """Break-even saved KV bytes per layer and step of a shared level on `device_name`.

    Args:
        device_name: `torch.cuda.get_device_name(device)`.
        flashinfer_version: default: the installed release.
        path: the store (default `calibration_path()`).

    Returns:
        The stored calibration for this GPU and FlashInfer release; else
        `DEFAULT_LEVEL_OVERHEAD_BYTES` (for a GPU whose name contains H100 or H200 silently,
        for others with a warning, once per process, suggesting `cascade-rag calibrate`).
    """
    version = flashinfer_version or installed_flashinfer_version()
    if version is not None:
        stored = load_calibrations(path).get(store_key(device_name, version))
        if stored is not None:
            return float(stored.level_overhead_bytes)
    if not any(name in device_name.upper() for name in _DEFAULT_DEVICES):
        if (device_name, version) in _NOTED:
            return DEFAULT_LEVEL_OVERHEAD_BYTES
        _NOTED.add((device_name, version))
        logger.warning(
            "no cascade calibration for %s (flashinfer %s); using the H100 default of %.0f MB "
            "saved per level (run `cascade-rag calibrate` on this GPU to measure it)",
            device_name,
            version,
            DEFAULT_LEVEL_OVERHEAD_BYTES / 1e6,
        )
    return DEFAULT_LEVEL_OVERHEAD_BYTES


# ---- measuring -------------------------------------------------------------------------------


def decode_step_metadata(batch: int, shared: int, unique_tokens: int, page_size: int, device):
    """Plain and 2-level cascade `AttentionMetadata` of the measured decode step.

    `batch` requests whose page tables start with the same `shared // page_size` pages (pages
    0..) and go on with `ceil(unique_tokens / page_size)` pages of their own; each adds one
    token, the last of its own ones. Needs `shared % page_size == 0` and batch >= 2.

    Returns:
        (plain, cascade): one causal level; a shared level over the prefix plus the causal one.
    """
    from cascade_rag.attention.metadata import AttentionMetadata
    from cascade_rag.engine.cascade_plan import SeqView, plan_levels

    own_pages = -(-unique_tokens // page_size)
    shared_pages = list(range(shared // page_size))
    views = []
    for i in range(batch):
        first = len(shared_pages) + i * own_pages
        own = list(range(first, first + own_pages))
        views.append(SeqView(shared_pages + own, shared + unique_tokens, 1))
    # the new token's slot: the last of each request's own tokens
    slots = [view.page_table[-1] * page_size + (unique_tokens - 1) % page_size for view in views]
    slot_mapping = _int64(slots, device)
    empty = _int64([], device)
    out = []
    for levels in (1, 2):
        plan = plan_levels(views, page_size, levels, min_shared_tokens=0)
        assert len(plan) == levels, "the grid point must plan as asked"
        out.append(AttentionMetadata(page_size, slot_mapping, empty, empty, plan))
    return out[0], out[1]


def _int64(values: list[int], device):
    import torch

    return torch.tensor(values, dtype=torch.int64, device=device)


def measure(
    device=None,
    *,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    shared_tokens: tuple[int, ...] = DEFAULT_SHARED_TOKENS,
    unique_tokens: int = DEFAULT_UNIQUE_TOKENS,
    iters: int = 30,
    progress=None,
) -> CalibrationResult:
    """Time plain vs 2-level cascade decode attention on a GPU and fit the threshold.

    One decode step of one attention layer (Llama-3.2-1B shape, bf16, page size 16): `batch`
    requests share a `shared`-token prefix and each has `unique_tokens` of its own, for every
    batch x shared in the grid. Each system is planned once and run `iters` times (after a
    warm-up); the median of CUDA-event times counts.

    Args:
        device: a CUDA device (default: the current one).
        batches, shared_tokens: the grid (shared lengths should be page multiples).
        unique_tokens: each request's own tokens.
        iters: timed runs per point and system.
        progress: called with each `Timing` as it is measured (e.g. to print it).

    Returns:
        The `CalibrationResult` (not stored: see `save_calibration`).

    Raises:
        CalibrationError: no CUDA device, or FlashInfer is not installed.
    """
    import torch

    page = DEFAULT_SHAPE["page_size"]
    if not batches or min(batches) < 2:
        raise ValueError(f"batches={batches!r}: every batch needs >= 2 requests to share")
    if not shared_tokens or any(n <= 0 or n % page for n in shared_tokens):
        raise ValueError(f"shared_tokens={shared_tokens!r} must be positive multiples of {page}")
    if unique_tokens < 1 or iters < 1:
        raise ValueError(f"unique_tokens={unique_tokens} and iters={iters} must be >= 1")
    if not torch.cuda.is_available():
        raise CalibrationError("calibration needs a CUDA GPU, and none is visible here")
    try:
        import flashinfer
    except ImportError as exc:
        raise CalibrationError(
            f"calibration needs FlashInfer ({exc}); install the gpu extra: "
            "pip install 'cascade-rag[gpu]'"
        ) from exc
    from cascade_rag.attention.flashinfer_backend import FlashInferAttention

    device = torch.device(device if device is not None else "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    qo, kv, hd = (DEFAULT_SHAPE[k] for k in ("num_qo_heads", "num_kv_heads", "head_dim"))
    dtype = torch.bfloat16
    kv_bytes_per_token = 2 * kv * hd * torch.finfo(dtype).bits // 8
    backend = FlashInferAttention(qo, kv, hd, page, dtype, device, max_levels=2)
    max_pages = max(shared_tokens) // page + max(batches) * -(-unique_tokens // page)
    k_cache = torch.randn(max_pages, page, kv, hd, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)

    def time_ms(metadata, q, k, v) -> float:
        backend.plan(metadata)
        for _ in range(3):
            backend.forward(q, k, v, k_cache, v_cache)
        times = []
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            backend.forward(q, k, v, k_cache, v_cache)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    timings = []
    with torch.cuda.device(device):
        for batch in batches:
            for shared in shared_tokens:
                plain, cascade = decode_step_metadata(batch, shared, unique_tokens, page, device)
                q = torch.randn(batch, qo, hd, device=device, dtype=dtype)
                k = torch.randn(batch, kv, hd, device=device, dtype=dtype)
                v = torch.randn_like(k)
                timing = Timing(
                    batch=batch,
                    shared_tokens=shared,
                    saved_bytes=float((batch - 1) * shared * kv_bytes_per_token),
                    plain_ms=time_ms(plain, q, k, v),
                    cascade_ms=time_ms(cascade, q, k, v),
                )
                timings.append(timing)
                if progress is not None:
                    progress(timing)
    threshold, bracketed = fit_level_overhead(timings)
    return CalibrationResult(
        device_name=torch.cuda.get_device_name(device),
        # the same source as level_overhead_bytes' default, so the lookup finds this entry
        flashinfer_version=installed_flashinfer_version()
        or getattr(flashinfer, "__version__", "unknown"),
        level_overhead_bytes=threshold,
        bracketed=bracketed,
        timings=tuple(timings),
        shape=dict(DEFAULT_SHAPE, dtype="bfloat16", unique_tokens=unique_tokens),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
