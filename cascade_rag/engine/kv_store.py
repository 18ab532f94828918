"""A disk store of chunk KV, so computed chunks survive restarts.

With reuse anywhere (engine/segments.py) a chunk node's KV depends only on the model, the dtype,
the anchor it was computed after (the system prompt chunk, or none) and its own tokens, so it can
be kept on disk and loaded into any later engine of the same model. `ChunkKVStore` keeps one
entry per (context, chunk):

    <root>/store.json                      the store's identity (model digest, dtype, shape)
    <root>/entries/<key>.safetensors       tensors k, v [num_layers, num_tokens, kv_heads, dim]
                                           and token_ids [num_tokens] (safetensors: no pickle)
    <root>/entries/<key>.json              manifest: identity, context, chunk id, start position,
                                           shapes, byte size and sha256 of the tensor file

`key` hashes the identity, the context chunk ids and the chunk id. Writes are atomic (temporary
file, fsync, rename; the manifest is written last, so an entry exists only once complete). A
load verifies the manifest's identity, context, chunk and start, the tensor file's size and
sha256, the tensors' shapes and dtype, and the token ids against the chunk's, and refuses any
mismatch with `KVStoreError` naming it. A byte budget evicts the least recently used entries
(a load touches its manifest). A store folder made for another model or dtype is refused when
opened (ValueError), so entries are never mixed.

`save_node` / `load_node` move a node's KV between the page pool and the store. This module does
not decide when to save or load (the engine saves the nodes a step computed; the scheduler loads
a missing node before computing it) and never raises into a request: the engine logs store
errors and computes instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cascade_rag.chunks import Chunk
from cascade_rag.engine.kv_cache import ChunkKVCache, ChunkNode

FORMAT_VERSION = 1
LAYOUT = "chunk-after-anchor/v1"  # KV of a chunk's own tokens, rotated at start..start+n-1


class KVStoreError(RuntimeError):
    """A chunk KV entry could not be saved or loaded; the message says why."""


@dataclass(frozen=True)
class StoreIdentity:
    """What the KV in a store depends on besides the chunk and its context.

    Attributes:
        model_digest: content digest of the model (`LoadedModel.digest`).
        dtype: KV dtype name ("float32", "bfloat16", ...).
        num_layers, num_kv_heads, head_dim: KV shape per token.
        layout: what an entry holds (`LAYOUT`).
    """

    model_digest: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = LAYOUT


@dataclass(frozen=True)
class KVStoreStats:
    """Counters of a `ChunkKVStore` since it was opened (entries and bytes: now, on disk)."""

    entries: int
    bytes: int
    max_bytes: int
    loads: int
    misses: int
    saves: int
    evictions: int
    errors: int


class ChunkKVStore:
    """Chunk KV on disk, keyed by identity, context and chunk (see the module docstring).

    Args:
        root: the store folder (created if missing).
        identity: the engine's model, dtype and KV shape.
        max_bytes: disk budget; least recently used entries are deleted beyond it.

    Raises:
        ValueError: the folder holds a store of another identity, or max_bytes < 1.
        OSError: the folder cannot be created or read.

    Example:
        >>> store = ChunkKVStore("kv", identity, max_bytes=2**30)
        >>> store.save((system.id,), chunk, start=40, k=k, v=v)  # k, v: [layers, n, heads, dim]
        >>> k, v = store.load((system.id,), chunk, start=40)
    """

    def __init__(self, root: str | Path, identity: StoreIdentity, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.root = Path(root)
        self.identity = identity
        self.max_bytes = max_bytes
        self.entries_dir = self.root / "entries"
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self._check_identity()
        self._loads = self._misses = self._saves = self._evictions = self._errors = 0

    # ---- identity ------------------------------------------------------------------------

    def _check_identity(self) -> None:
        path = self.root / "store.json"
        mine = {"format": FORMAT_VERSION, "identity": asdict(self.identity)}
        try:
            found = json.loads(path.read_text())
        except FileNotFoundError:
            _atomic_write(path, json.dumps(mine, indent=1).encode())
            return
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{path} is not a readable chunk KV store manifest ({exc}); remove the folder "
                "or pass another kv_store_dir"
            ) from exc
        if found != mine:
            theirs = found.get("identity", {}) if isinstance(found, dict) else {}
            diff = [k for k, v in asdict(self.identity).items() if theirs.get(k) != v]
            theirs_text = ", ".join(f"{k}={theirs.get(k)!r}" for k in diff)
            mine_text = ", ".join(f"{k}={getattr(self.identity, k)!r}" for k in diff)
            raise ValueError(
                f"the chunk KV store at {self.root} was made for another "
                f"{', '.join(diff) or 'format'} ({theirs_text}; this engine has {mine_text}); "
                "use another kv_store_dir for this model"
            )

    def key(self, context: tuple[str, ...], chunk_id: str) -> str:
        """The entry name of `chunk_id` computed after the chunks `context` (root first)."""
        h = hashlib.sha256(json.dumps([asdict(self.identity), list(context), chunk_id]).encode())
        return h.hexdigest()[:40]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.entries_dir / f"{key}.safetensors", self.entries_dir / f"{key}.json"

    def contains(self, context: tuple[str, ...], chunk: Chunk) -> bool:
        return self._paths(self.key(context, chunk.id))[1].exists()

    # ---- save ----------------------------------------------------------------------------

    def save(
        self,
        context: tuple[str, ...],
        chunk: Chunk,
        start: int,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> int:
        """Write one entry atomically; returns its size in bytes. An existing entry is kept.

        Args:
            context: chunk ids the KV was computed after (the anchor; () for none).
            chunk: the chunk.
            start: position of its first token when it was computed.
            k, v: [num_layers, num_tokens, num_kv_heads, head_dim] in the store's dtype.

        Raises:
            KVStoreError: wrong shapes or dtype, an entry larger than the whole budget, or the
                write failed (a full disk...); nothing partial is left behind.
        """
        ident = self.identity
        shape = (ident.num_layers, len(chunk.token_ids), ident.num_kv_heads, ident.head_dim)
        if tuple(k.shape) != shape or tuple(v.shape) != shape:
            raise KVStoreError(
                f"chunk {chunk.id}: k {tuple(k.shape)} and v {tuple(v.shape)} must be {shape}"
            )
        if str(k.dtype).removeprefix("torch.") != ident.dtype or v.dtype != k.dtype:
            raise KVStoreError(f"chunk {chunk.id}: KV is {k.dtype}, the store holds {ident.dtype}")
        key = self.key(context, chunk.id)
        data_path, manifest_path = self._paths(key)
        if manifest_path.exists():
            return manifest_path.stat().st_size + _size(data_path)
        from safetensors.torch import save

        tensors = {
            "k": k.detach().to("cpu").contiguous(),
            "v": v.detach().to("cpu").contiguous(),
            "token_ids": torch.tensor(chunk.token_ids, dtype=torch.int64),
        }
        data = save(tensors)
        manifest = {
            "format": FORMAT_VERSION,
            "identity": asdict(ident),
            "context": list(context),
            "chunk_id": chunk.id,
            "start": start,
            "num_tokens": len(chunk.token_ids),
            "shape": list(shape),
            "data_bytes": len(data),
            "data_sha256": hashlib.sha256(data).hexdigest(),
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        size = len(data) + len(manifest_bytes)
        if size > self.max_bytes:
            raise KVStoreError(
                f"chunk {chunk.id}: its KV takes {size} bytes, more than the store's whole "
                f"budget of {self.max_bytes} bytes; raise kv_store_bytes"
            )
        self._make_room(size, keep=key)
        try:
            _atomic_write(data_path, data)
            _atomic_write(manifest_path, manifest_bytes)  # last: the entry is complete
        except OSError as exc:
            self._errors += 1
            for path in (manifest_path, data_path):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise KVStoreError(
                f"chunk {chunk.id}: writing its KV to {self.root} failed: {exc}"
            ) from exc
        self._saves += 1
        return size

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of every complete entry."""
        out = []
        for manifest in self.entries_dir.glob("*.json"):
            key = manifest.stem
            try:
                stat = manifest.stat()
                out.append((stat.st_mtime, stat.st_size + _size(self._paths(key)[0]), key))
            except OSError:
                continue  # deleted meanwhile
        return out

    def _make_room(self, need: int, keep: str) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, key in entries:
            if total + need <= self.max_bytes:
                break
            if key != keep:
                self._delete(key)
                self._evictions += 1
                total -= size

    def _delete(self, key: str) -> None:
        data_path, manifest_path = self._paths(key)
        for path in (manifest_path, data_path):  # manifest first: the entry stops existing
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- load ----------------------------------------------------------------------------

    def load(
        self, context: tuple[str, ...], chunk: Chunk, start: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (k, v) of an entry, each [num_layers, num_tokens, num_kv_heads, head_dim] on the
        CPU, or None when the store has none.

        Raises:
            KVStoreError: the entry exists but does not verify (another identity, context,
                chunk or start, a truncated or altered file, other token ids).
        """
        key = self.key(context, chunk.id)
        data_path, manifest_path = self._paths(key)
        try:
            manifest_bytes = manifest_path.read_bytes()
        except FileNotFoundError:
            self._misses += 1
            return None
        except OSError as exc:
            self._errors += 1
            raise KVStoreError(f"chunk {chunk.id}: cannot read {manifest_path}: {exc}") from exc
        try:
            k, v = self._verified(manifest_bytes, data_path, context, chunk, start)
        except KVStoreError:
            self._errors += 1
            raise
        with contextlib.suppress(OSError):
            os.utime(manifest_path)  # most recently used
        self._loads += 1
        return k, v

    def _verified(self, manifest_bytes, data_path, context, chunk: Chunk, start: int):
        where = f"chunk KV entry {data_path.stem} in {self.root}"
        try:
            m = json.loads(manifest_bytes)
        except ValueError as exc:
            raise KVStoreError(f"{where}: the manifest is not valid JSON ({exc})") from exc
        ident = self.identity
        n = len(chunk.token_ids)
        shape = [ident.num_layers, n, ident.num_kv_heads, ident.head_dim]
        expected = {
            "format": FORMAT_VERSION,
            "identity": asdict(ident),
            "context": list(context),
            "chunk_id": chunk.id,
            "start": start,
            "num_tokens": n,
            "shape": shape,
        }
        if not isinstance(m, dict):
            raise KVStoreError(f"{where}: the manifest is not a JSON object")
        for field, want in expected.items():
            if m.get(field) != want:
                raise KVStoreError(
                    f"{where}: manifest {field} is {m.get(field)!r}, expected {want!r}"
                )
        try:
            data = data_path.read_bytes()
        except OSError as exc:
            raise KVStoreError(f"{where}: cannot read the tensor file: {exc}") from exc
        if len(data) != m.get("data_bytes"):
            raise KVStoreError(
                f"{where}: the tensor file has {len(data)} bytes, the manifest says "
                f"{m.get('data_bytes')} (truncated or replaced)"
            )
        if hashlib.sha256(data).hexdigest() != m.get("data_sha256"):
            raise KVStoreError(f"{where}: the tensor file's sha256 does not match (altered)")
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise KVStoreError(f"{where}: the tensor file does not parse: {exc}") from exc
        k, v, ids = tensors.get("k"), tensors.get("v"), tensors.get("token_ids")
        dtype = getattr(torch, ident.dtype)
        for name, t in (("k", k), ("v", v)):
            if t is None or list(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (list(t.shape), str(t.dtype))
                raise KVStoreError(f"{where}: tensor {name} is {got}, expected {shape} {dtype}")
        if ids is None or ids.tolist() != list(chunk.token_ids):
            raise KVStoreError(f"{where}: its token ids are not the chunk's")
        return k, v

    # ---- bookkeeping -----------------------------------------------------------------------

    def stats(self) -> KVStoreStats:
        entries = self._entries()
        return KVStoreStats(
            entries=len(entries),
            bytes=sum(size for _, size, _ in entries),
            max_bytes=self.max_bytes,
            loads=self._loads,
            misses=self._misses,
            saves=self._saves,
            evictions=self._evictions,
            errors=self._errors,
        )

    def remove(self, context: tuple[str, ...], chunk: Chunk) -> bool:
        """Delete an entry; True if there was one."""
        key = self.key(context, chunk.id)
        existed = self._paths(key)[1].exists()
        self._delete(key)
        return existed


# ---- the page pool side ------------------------------------------------------------------


def node_context(node: ChunkNode) -> tuple[str, ...]:
    """Chunk ids of a node's ancestors, root first: what its KV was computed after."""
    ids: list[str] = []
    parent = node.parent
    while parent is not None and parent.chunk is not None:
        ids.append(parent.chunk.id)
        parent = parent.parent
    return tuple(reversed(ids))


def _node_slots(kv: ChunkKVCache, node: ChunkNode) -> torch.Tensor:
    return torch.tensor([kv.slot_of(node, p) for p in range(node.start, node.end)])


def save_node(store: ChunkKVStore, kv: ChunkKVCache, node: ChunkNode) -> int:
    """Copy a ready node's KV from the page pool into the store; returns the entry's bytes."""
    assert node.ready and node.chunk is not None
    slots = _node_slots(kv, node).to(kv.pool.kv_caches[0][0].device)
    ks, vs = [], []
    for k_cache, v_cache in kv.pool.kv_caches:
        ks.append(k_cache.view(-1, *k_cache.shape[2:]).index_select(0, slots))
        vs.append(v_cache.view(-1, *v_cache.shape[2:]).index_select(0, slots))
    return store.save(node_context(node), node.chunk, node.start, torch.stack(ks), torch.stack(vs))


def load_node(store: ChunkKVStore, kv: ChunkKVCache, node: ChunkNode) -> bool:
    """Fill a new node's pages from the store; False (pages untouched) when it has no entry.

    Raises:
        KVStoreError: the entry does not verify (the pages are untouched then too).
    """
    assert node.chunk is not None
    found = store.load(node_context(node), node.chunk, node.start)
    if found is None:
        return False
    k, v = found
    device = kv.pool.kv_caches[0][0].device
    slots = _node_slots(kv, node).to(device)
    for layer, (k_cache, v_cache) in enumerate(kv.pool.kv_caches):
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[layer].to(device))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[layer].to(device))
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder (fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
