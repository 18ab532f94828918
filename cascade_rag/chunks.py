"""Chunks: reusable runs of token ids, named by a content hash, kept in a registry.

A chunk is a run of token ids (a system prompt, a retrieved passage, a query) whose KV the
engine may compute once and reuse. Its id hashes the token ids together with a namespace that
names the model and the tokenizer, so the same tokens under the same model get the same id
whatever their text or chunk type was (correctness rule 1: hash token ids, not text). A hash hit
is confirmed by comparing the tokens.

`ChunkRegistry` dedups chunks by id, counts references (requests and KV-tree nodes hold one
while they use a chunk) and evicts least recently used unreferenced chunks past its capacity,
counted both in chunks and in (estimated) bytes. A chunk built elsewhere (by hand, or by another
engine's registry) is re-registered with `ChunkRegistry.adopt`, so an id never names two
different token runs.

This module does not hold KV and does not know positions: exact reuse also needs the chain of
chunks before a chunk, which the KV cache's chunk tree keys on (parent node, chunk id). It does
not tokenize either; callers pass token ids.
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import operator
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Bumped if the byte layout fed to the hash ever changes, so old ids cannot match new ones.
_HASH_PERSON = b"cascade-rag/ck1"
_MAX_TOKEN_ID = 2**63 - 1  # ids are packed as int64
# Estimated CPython cost of a held chunk beyond its tokens, text and metadata: the Chunk object
# and its __dict__, the metadata proxy and dict, and the registry's dict and LRU entries.
_CHUNK_OVERHEAD_BYTES = 600
# A token in a tuple: the 8-byte pointer plus its int object (ids above 256 are not shared).
_TOKEN_BYTES = 8 + 28
DEFAULT_CAPACITY = 100_000
DEFAULT_CAPACITY_BYTES = 256 * 2**20


class ChunkType(str, enum.Enum):
    """What a chunk is for. Not part of its identity: the same tokens have the same KV."""

    SYSTEM_PROMPT = "system_prompt"
    CONTEXT = "context"
    RAG_RESULT = "rag_result"
    CODE = "code"
    QUERY = "query"


@dataclass(frozen=True)
class Chunk:
    """A registered run of token ids.

    Attributes:
        id: hex content hash, `chunk_hash(token_ids, namespace)`.
        type: what the chunk is for (not part of the id).
        token_ids: the tokens, non-empty.
        text: the text the tokens came from, if the caller gave it (not part of the id).
        metadata: read-only extras such as the source path; excluded from equality and hash.

    `len(chunk)` is the number of tokens. Chunks are made by `ChunkRegistry.register`; one
    built by hand (or by another registry) is only used after `ChunkRegistry.adopt` has
    re-registered its tokens, so its `id` is never trusted.

    Example:
        >>> registry = ChunkRegistry(namespace="SmolLM2-135M|tok-v1")
        >>> chunk = registry.register([1, 2, 3], ChunkType.RAG_RESULT, metadata={"source": "a.md"})
        >>> len(chunk), chunk.type, chunk.metadata["source"]
        (3, <ChunkType.RAG_RESULT: 'rag_result'>, 'a.md')
    """

    id: str
    type: ChunkType
    token_ids: tuple[int, ...]
    text: str | None = None
    metadata: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise TypeError(f"Chunk.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.type, ChunkType):
            raise TypeError(f"Chunk.type must be a ChunkType, got {self.type!r}")
        if not isinstance(self.token_ids, tuple) or not self.token_ids:
            raise ValueError(
                f"Chunk.token_ids must be a non-empty tuple of ints, got {self.token_ids!r:.80}"
            )
        if not isinstance(self.metadata, MappingProxyType):
            object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __len__(self) -> int:
        return len(self.token_ids)

    def __hash__(self) -> int:
        # Equal chunks have equal ids and types; avoids hashing thousands of token ids.
        return hash((self.id, self.type))

    def __repr__(self) -> str:
        text = "" if self.text is None else f", text={self.text[:40]!r}"
        return f"Chunk(id={self.id!r}, type={self.type.name}, num_tokens={len(self)}{text})"


def chunk_nbytes(chunk: Chunk) -> int:
    """Estimated memory a registry spends holding `chunk`, in bytes.

    36 bytes per token (a tuple slot and an int object), the text's and the metadata's
    shallow sizes, and a fixed overhead for the objects around them. An estimate for the
    registry's byte cap, not an exact measurement.

    Example:
        >>> chunk_nbytes(Chunk("x", ChunkType.CONTEXT, tuple(range(1000, 1100))))
        4200
    """
    nbytes = _CHUNK_OVERHEAD_BYTES + _TOKEN_BYTES * len(chunk.token_ids)
    if chunk.text is not None:
        nbytes += sys.getsizeof(chunk.text)
    for key, value in chunk.metadata.items():
        nbytes += sys.getsizeof(key) + sys.getsizeof(value)
    return nbytes


def _as_token_ids(token_ids: Iterable[int]) -> tuple[int, ...]:
    """Token ids as a tuple of Python ints in [0, 2**63); accepts lists, tuples, numpy, torch."""
    if isinstance(token_ids, (str, bytes)):
        raise TypeError(
            f"token_ids must be integer token ids, got {type(token_ids).__name__} "
            f"{token_ids!r:.40}; tokenize the text first"
        )
    if hasattr(token_ids, "tolist"):  # numpy arrays and torch tensors
        token_ids = token_ids.tolist()
    ids = tuple(token_ids)
    if not all(type(t) is int for t in ids):
        converted = []
        for t in ids:
            if isinstance(t, bool) or not hasattr(type(t), "__index__"):
                raise TypeError(
                    f"token ids must be ints, got {t!r} of type {type(t).__name__}; "
                    "pass the tokenizer's integer ids"
                )
            converted.append(operator.index(t))
        ids = tuple(converted)
    if ids and (min(ids) < 0 or max(ids) > _MAX_TOKEN_ID):
        bad = next(t for t in ids if t < 0 or t > _MAX_TOKEN_ID)
        raise ValueError(f"token ids must be in [0, 2**63), got {bad}")
    return ids


def chunk_hash(token_ids: Iterable[int], namespace: str) -> str:
    """Stable content hash of token ids under a namespace (32 hex characters).

    blake2b with a 16-byte digest over the namespace (length-prefixed UTF-8) and the ids packed
    as little-endian int64. Text and chunk type are not hashed. The same inputs give the same
    id in every process and on every platform.

    Args:
        token_ids: integer token ids (list, tuple, numpy array or torch tensor).
        namespace: names what changes the KV of the same ids: model identity and tokenizer
            identity, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct@<rev>|tokenizer@<rev>".

    Example:
        >>> chunk_hash([1, 2, 3], "model-a") == chunk_hash((1, 2, 3), "model-a")
        True
        >>> chunk_hash([1, 2, 3], "model-a") == chunk_hash([1, 2, 3], "model-b")
        False
    """
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    packed = array("q", _as_token_ids(token_ids))
    assert packed.itemsize == 8
    if sys.byteorder == "big":
        packed.byteswap()
    ns = namespace.encode("utf-8")
    h = hashlib.blake2b(digest_size=16, person=_HASH_PERSON)
    h.update(len(ns).to_bytes(8, "little"))
    h.update(ns)
    h.update(packed.tobytes())
    return h.hexdigest()


class UnknownChunkError(KeyError):
    """A chunk id that is not (or no longer) in the registry."""

    def __init__(self, chunk_id: str) -> None:
        super().__init__(chunk_id)
        self.chunk_id = chunk_id

    def __str__(self) -> str:
        return (
            f"unknown chunk id {self.chunk_id!r}: register its token ids first with "
            "ChunkRegistry.register(token_ids) (an unreferenced chunk may also have been "
            "evicted; acquire() it to keep it)"
        )


@dataclass(frozen=True)
class ChunkStats:
    """A snapshot of `ChunkRegistry` counters.

    Attributes:
        num_chunks: chunks held now.
        num_tokens: tokens over the chunks held now.
        num_bytes: estimated bytes over the chunks held now (`chunk_nbytes`).
        hits: `register` calls that found the chunk already held.
        misses: `register` calls that added a chunk.
        evictions: chunks evicted so far (by capacity or `evict_unreferenced`).
        referenced: chunks held now with a reference count above zero.
    """

    num_chunks: int
    num_tokens: int
    num_bytes: int
    hits: int
    misses: int
    evictions: int
    referenced: int


class ChunkRegistry:
    """Thread-safe registry of chunks by content hash, with reference counts and LRU eviction.

    Args:
        namespace: model and tokenizer identity fed to `chunk_hash`; one registry per model.
        capacity: most chunks held after a `register`; least recently used unreferenced chunks
            are evicted past it. Referenced chunks are never evicted: if every chunk is
            referenced, the registry holds more than `capacity` rather than fail.
        capacity_bytes: most estimated bytes (`chunk_nbytes`) held after a `register`,
            enforced like `capacity`; the default, 256 MiB, is about 7M tokens. The chunk a
            `register` returns is never evicted by it, even if it alone is larger.
        on_evict: called with the id of each evicted chunk (the KV cache drops that chunk's
            KV). It runs while the registry's lock is held, after the chunk is removed, so no
            other thread can register the chunk again before it returns; it may call the
            registry from the same thread but must not wait on another thread that does.

    Recency: `register`, `get`, `acquire` and `release` mark a chunk used; a referenced chunk
    counts as used until its last `release`.

    Example:
        >>> evicted = []
        >>> registry = ChunkRegistry("model|tokenizer", capacity=2, on_evict=evicted.append)
        >>> a = registry.register([1, 2], ChunkType.SYSTEM_PROMPT)
        >>> b = registry.register([3, 4])
        >>> _ = registry.acquire(a.id)  # a request uses the system prompt
        >>> c = registry.register([5, 6])  # over capacity: evicts b, the LRU unreferenced chunk
        >>> evicted == [b.id], a.id in registry, registry.refcount(a.id)
        (True, True, 1)
        >>> registry.release(a.id)
    """

    def __init__(
        self,
        namespace: str,
        capacity: int = DEFAULT_CAPACITY,
        on_evict: Callable[[str], None] | None = None,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(
                f"namespace must be a non-empty str naming the model and tokenizer, "
                f"got {namespace!r}"
            )
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if (
            isinstance(capacity_bytes, bool)
            or not isinstance(capacity_bytes, int)
            or capacity_bytes < 1
        ):
            raise ValueError(
                f"capacity_bytes must be an int >= 1 (bytes of chunks held), got {capacity_bytes!r}"
            )
        self._namespace = namespace
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._on_evict = on_evict
        self._lock = threading.RLock()
        self._chunks: dict[str, Chunk] = {}
        # Unreferenced chunks only, least recently used first: the eviction order.
        self._lru: OrderedDict[str, None] = OrderedDict()
        # Referenced chunks only (count > 0).
        self._refcounts: dict[str, int] = {}
        self._num_tokens = 0
        self._num_bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def register(
        self,
        token_ids: Iterable[int],
        type: ChunkType = ChunkType.CONTEXT,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        acquire: bool = False,
    ) -> Chunk:
        """Return the chunk for these token ids, adding it if new (a miss) or reusing it (a hit).

        A hit returns the chunk as first registered: its type, text and metadata stay. Either
        way the chunk becomes the most recently used. Adding a chunk past `capacity` or
        `capacity_bytes` evicts least recently used unreferenced chunks, never the one being
        returned.

        Args:
            token_ids: non-empty integer token ids (list, tuple, numpy array, torch tensor).
            type: what the chunk is for; a `ChunkType` or its value string.
            text: the text the tokens came from, kept for display; not hashed.
            metadata: extras such as {"source": path}; copied, read-only, not hashed.
            acquire: also take a reference, atomically: with threads, a separate `acquire`
                after `register` can find the chunk already evicted by another registration.

        Raises:
            ValueError: empty token ids, an id outside [0, 2**63), or an unknown type.
            TypeError: token ids that are not ints, text that is not a str, metadata that is
                not a mapping.
            RuntimeError: a hash collision (same id, different tokens).

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> first = registry.register([7, 8, 9], ChunkType.CONTEXT, text="hello")
            >>> again = registry.register([7, 8, 9], ChunkType.QUERY)
            >>> again is first, registry.stats().hits, registry.stats().misses
            (True, 1, 1)
        """
        ids, chunk_type = self._check_args(token_ids, type, text, metadata)
        chunk_id = chunk_hash(ids, self._namespace)  # outside the lock: O(len) work
        with self._lock:
            return self._register(chunk_id, ids, chunk_type, text, metadata, acquire)

    def chunk_for(
        self,
        token_ids: Iterable[int],
        type: ChunkType = ChunkType.CONTEXT,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Chunk:
        """The chunk `register` would return for these arguments, without registering it.

        If the tokens are held, the held chunk is returned (recency and counters unchanged);
        otherwise a new `Chunk` with this registry's id for the tokens, which is not added.
        Used to build a prompt that may still be refused: `register` or `adopt` it later.

        Raises:
            the same errors as `register`.

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> chunk = registry.chunk_for([4, 5, 6])
            >>> chunk.id in registry, registry.register([4, 5, 6]).id == chunk.id
            (False, True)
        """
        ids, chunk_type = self._check_args(token_ids, type, text, metadata)
        chunk_id = chunk_hash(ids, self._namespace)
        with self._lock:
            held = self._chunks.get(chunk_id)
            if held is not None:
                _check_same_tokens(held, ids)
                return held
        return _new_chunk(chunk_id, ids, chunk_type, text, metadata)

    def adopt(self, chunk: Chunk, *, register: bool = True, acquire: bool = False) -> Chunk:
        """This registry's own chunk for `chunk`'s tokens; `chunk.id` is not trusted.

        A chunk built by hand, or taken from another engine (another namespace), is
        re-registered here under this registry's content hash of its tokens, keeping its
        type, text and metadata if the tokens are new (a held chunk keeps its own, as in
        `register`). Two hand-built chunks with one id and different tokens thus never share
        an id, hence never share KV.

        Args:
            chunk: any `Chunk`.
            register: False returns what `chunk_for` returns, adding nothing.
            acquire: also take a reference, atomically (only with register=True).

        Raises:
            TypeError: `chunk` is not a `Chunk`.
            ValueError: `chunk.id` is held here for different tokens: a forged or stale id
                that would otherwise alias another chunk.

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> mine = registry.adopt(Chunk("doc-42", ChunkType.RAG_RESULT, (1, 2, 3)))
            >>> mine.id == registry.register([1, 2, 3]).id != "doc-42", mine.type.name
            (True, 'RAG_RESULT')
        """
        if not isinstance(chunk, Chunk):
            raise TypeError(
                f"adopt() takes a Chunk, got {builtins.type(chunk).__name__}; register token "
                "ids with register()"
            )
        if acquire and not register:
            raise ValueError("adopt(acquire=True) needs register=True: nothing is held")
        with self._lock:
            if self._chunks.get(chunk.id) is chunk:
                # this registry's own object (chunks are immutable): its tokens were checked
                # and hashed when it was registered, so nothing is recomputed per request
                if not register:
                    return chunk
                return self._register(
                    chunk.id, chunk.token_ids, chunk.type, chunk.text, chunk.metadata, acquire
                )
        ids, chunk_type = self._check_args(chunk.token_ids, chunk.type, chunk.text, chunk.metadata)
        chunk_id = chunk_hash(ids, self._namespace)
        with self._lock:
            claimed = self._chunks.get(chunk.id)
            if claimed is not None and claimed.token_ids != ids:
                raise ValueError(
                    f"chunk id {chunk.id!r} is this registry's id for {len(claimed)} other "
                    f"tokens than the {len(ids)} tokens of the chunk given; build chunks with "
                    "register() / the engine's register_chunk() instead of reusing ids"
                )
            if register:
                return self._register(
                    chunk_id, ids, chunk_type, chunk.text, chunk.metadata, acquire
                )
            held = self._chunks.get(chunk_id)
            if held is not None:
                _check_same_tokens(held, ids)
                return held
        if chunk.id == chunk_id:
            return chunk
        return _new_chunk(chunk_id, ids, chunk_type, chunk.text, chunk.metadata)

    def get(self, chunk_id: str) -> Chunk:
        """Return the chunk with this id and mark it recently used.

        Raises:
            UnknownChunkError: (a KeyError) the id was never registered or was evicted.

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> chunk = registry.register([1, 2, 3])
            >>> registry.get(chunk.id) is chunk
            True
        """
        with self._lock:
            chunk = self._lookup(chunk_id)
            self._touch(chunk_id)
            return chunk

    def acquire(self, chunk_id: str) -> Chunk:
        """Add a reference to a chunk, so that it is not evicted until released; return it.

        Raises:
            UnknownChunkError: the id is not held.

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> chunk = registry.register([1, 2, 3])
            >>> registry.acquire(chunk.id) is chunk, registry.refcount(chunk.id)
            (True, 1)
        """
        with self._lock:
            chunk = self._lookup(chunk_id)
            self._add_ref(chunk_id)
            return chunk

    def release(self, chunk_id: str) -> None:
        """Drop a reference taken by `acquire`. The chunk stays held, now most recently used.

        Releasing does not evict: eviction happens in `register` and `evict_unreferenced`.

        Raises:
            UnknownChunkError: the id is not held.
            RuntimeError: the chunk holds no reference (a release without its acquire); the
                count stays 0.
        """
        with self._lock:
            self._lookup(chunk_id)
            count = self._refcounts.get(chunk_id, 0)
            if count <= 0:
                raise RuntimeError(
                    f"release of chunk {chunk_id} whose refcount is already 0: every release "
                    "needs an earlier acquire (or register(acquire=True))"
                )
            if count == 1:
                del self._refcounts[chunk_id]
                self._lru[chunk_id] = None
            else:
                self._refcounts[chunk_id] = count - 1

    def refcount(self, chunk_id: str) -> int:
        """Number of references held on a chunk.

        Raises:
            UnknownChunkError: the id is not held.
        """
        with self._lock:
            self._lookup(chunk_id)
            return self._refcounts.get(chunk_id, 0)

    def evict_unreferenced(self, max_count: int | None = None) -> list[str]:
        """Evict unreferenced chunks, least recently used first; return their ids in order.

        Args:
            max_count: evict at most this many; None evicts every unreferenced chunk.

        Example:
            >>> registry = ChunkRegistry("model|tokenizer")
            >>> a, b = registry.register([1]), registry.register([2])
            >>> _ = registry.acquire(b.id)
            >>> registry.evict_unreferenced() == [a.id], len(registry)
            (True, 1)
        """
        if max_count is not None and (
            isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0
        ):
            raise ValueError(f"max_count must be None or an int >= 0, got {max_count!r}")
        with self._lock:
            return self._evict(len(self._lru) if max_count is None else max_count)

    def stats(self) -> ChunkStats:
        """A consistent snapshot of the counters (see `ChunkStats`)."""
        with self._lock:
            return ChunkStats(
                num_chunks=len(self._chunks),
                num_tokens=self._num_tokens,
                num_bytes=self._num_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                referenced=len(self._refcounts),
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._chunks)

    def __contains__(self, chunk_id: object) -> bool:
        """Whether the id is held; does not change recency."""
        with self._lock:
            return chunk_id in self._chunks

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"ChunkRegistry(namespace={self._namespace!r}, capacity={self._capacity}, "
            f"capacity_bytes={self._capacity_bytes}, num_chunks={s.num_chunks}, "
            f"num_bytes={s.num_bytes}, referenced={s.referenced})"
        )

    # Internals; the caller holds self._lock unless said otherwise.

    @staticmethod
    def _check_args(
        token_ids: Iterable[int],
        chunk_type: ChunkType | str,
        text: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> tuple[tuple[int, ...], ChunkType]:
        """Validated token ids and chunk type (no lock needed)."""
        ids = _as_token_ids(token_ids)
        if not ids:
            raise ValueError("token_ids is empty; a chunk needs at least one token")
        try:
            checked_type = ChunkType(chunk_type)
        except ValueError:
            valid = ", ".join(t.value for t in ChunkType)
            raise ValueError(f"unknown chunk type {chunk_type!r}; use one of: {valid}") from None
        if text is not None and not isinstance(text, str):
            raise TypeError(f"chunk text must be a str or None, got {builtins.type(text).__name__}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"chunk metadata must be a mapping or None, got {builtins.type(metadata).__name__}"
            )
        return ids, checked_type

    def _register(
        self,
        chunk_id: str,
        ids: tuple[int, ...],
        chunk_type: ChunkType,
        text: str | None,
        metadata: Mapping[str, Any] | None,
        acquire: bool,
    ) -> Chunk:
        existing = self._chunks.get(chunk_id)
        if existing is not None:
            _check_same_tokens(existing, ids)
            self._hits += 1
            self._touch(chunk_id)
            if acquire:
                self._add_ref(chunk_id)
            return existing
        chunk = _new_chunk(chunk_id, ids, chunk_type, text, metadata)
        self._misses += 1
        self._chunks[chunk_id] = chunk
        self._num_tokens += len(ids)
        self._num_bytes += chunk_nbytes(chunk)
        try:
            # The new chunk joins the LRU order only after eviction, so it is never
            # evicted by its own registration.
            self._evict_over_capacity()
        finally:
            if chunk_id in self._chunks and chunk_id not in self._refcounts:
                self._lru[chunk_id] = None
        if acquire:
            self._add_ref(chunk_id)
        return chunk

    def _lookup(self, chunk_id: str) -> Chunk:
        chunk = self._chunks.get(chunk_id)
        if chunk is None:
            raise UnknownChunkError(chunk_id)
        return chunk

    def _add_ref(self, chunk_id: str) -> None:
        count = self._refcounts.get(chunk_id, 0)
        if count == 0:
            self._lru.pop(chunk_id, None)
        self._refcounts[chunk_id] = count + 1

    def _touch(self, chunk_id: str) -> None:
        if chunk_id in self._lru:  # referenced chunks count as used until released
            self._lru.move_to_end(chunk_id)

    def _over_capacity(self) -> bool:
        return len(self._chunks) > self._capacity or self._num_bytes > self._capacity_bytes

    def _evict_over_capacity(self) -> list[str]:
        evicted: list[str] = []
        while self._over_capacity() and self._lru:
            evicted.append(self._evict_lru())
        return evicted

    def _evict(self, count: int) -> list[str]:
        """Evict up to `count` LRU unreferenced chunks, calling on_evict after each removal."""
        evicted: list[str] = []
        while len(evicted) < count and self._lru:
            evicted.append(self._evict_lru())
        return evicted

    def _evict_lru(self) -> str:
        chunk_id, _ = self._lru.popitem(last=False)
        assert chunk_id not in self._refcounts, f"referenced chunk {chunk_id} in LRU order"
        chunk = self._chunks.pop(chunk_id)
        self._num_tokens -= len(chunk)
        self._num_bytes -= chunk_nbytes(chunk)
        self._evictions += 1
        if self._on_evict is not None:
            self._on_evict(chunk_id)
        return chunk_id


def _new_chunk(
    chunk_id: str,
    ids: tuple[int, ...],
    chunk_type: ChunkType,
    text: str | None,
    metadata: Mapping[str, Any] | None,
) -> Chunk:
    return Chunk(
        id=chunk_id,
        type=chunk_type,
        token_ids=ids,
        text=text,
        metadata=MappingProxyType(dict(metadata or {})),
    )


def _check_same_tokens(held: Chunk, ids: tuple[int, ...]) -> None:
    """A hash hit is confirmed by comparing the tokens (docs/design.md rule 1)."""
    if held.token_ids is not ids and held.token_ids != ids:
        raise RuntimeError(
            f"chunk hash collision: id {held.id} is held for {len(held)} tokens "
            f"{held.token_ids[:8]}... and was computed for different {len(ids)} tokens "
            f"{ids[:8]}..."
        )
