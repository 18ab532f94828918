"""A FAISS index of passages, keyed by the content hash of the engine chunk holding each one.

Every passage is registered with the engine as a RAG_RESULT chunk; its FAISS id is the first
60 bits of the chunk's hex id, so the same text is stored once however often it is added, and
a search result names the chunk whose KV the engine can reuse. Vectors are L2-normalised and
searched by inner product (cosine) in an `IndexIDMap2` over an `IndexFlatIP` (exact search).

Adding embeds outside the index's lock and inserts under it, so searches run while an ingest
embeds. Passage metadata must be JSON-serialisable (checked when added, since the index is
saved as JSON). On disk an index is a folder written atomically and checked in full when read
(`store.py`: paths, schema, sha256 of the vectors, a digest per passage, the embedder's content
identity); loading takes no lock, so read-only indexes load.

This module does not decide chunk order in prompts or talk to other frameworks (see
`retriever.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from cascade_rag.chunks import ChunkType
from cascade_rag.retrieval import store
from cascade_rag.retrieval.embedder import Embedder, embedder_identity
from cascade_rag.retrieval.files import normalise_extensions
from cascade_rag.retrieval.ingest import (
    DEFAULT_EXTENSIONS,
    IngestReport,
    Passage,
    SkippedFile,
    list_document_files,
    load_documents,
    split_documents,
)
from cascade_rag.retrieval.store import DamagedIndexError, faiss_id

if TYPE_CHECKING:
    from cascade_rag.llm import CascadeEngine

logger = logging.getLogger(__name__)

__all__ = ["DamagedIndexError", "DocumentIndex", "faiss_id"]


class DocumentIndex:
    """Passages searchable by meaning, each one a registered engine chunk.

    Args:
        engine: the `CascadeEngine` whose chunk registry names the passages.
        embedder: the `Embedder` for passages and queries; None loads the default one.

    Adding is all or nothing: if embedding fails half way, the index is as it was. The
    embedding of an add runs outside the index's lock, so searches from other threads go on
    meanwhile (with the real `Embedder` a query waits for at most one embedding batch).

    Attributes:
        skipped: files `from_folder` asked for but could not read.
        ingest_report: the `IngestReport` of `from_folder` (every file not read, and why).

    Example:
        >>> index = DocumentIndex.from_folder("handbook/", engine)
        >>> for passage, score in index.search("When does the library open?", k=3):
        ...     print(f"{score:.2f} {passage.source}")
        >>> index.save("handbook.index")
        >>> index = DocumentIndex.load("handbook.index", engine)
    """

    def __init__(self, engine: CascadeEngine, embedder: Embedder | None = None) -> None:
        import faiss

        self.engine = engine
        self.embedder = embedder if embedder is not None else Embedder()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))
        self._passages: dict[int, Passage] = {}  # FAISS id -> passage (chunk_id set)
        self._lock = threading.RLock()  # guards _index and _passages; never held to embed
        self.skipped: list[SkippedFile] = []
        self.ingest_report: IngestReport | None = None
        self._fingerprint: str | None = None  # what a cached index was built from
        # loaded passages whose chunk id was not yet recomputed from the engine's tokens
        self._unverified: set[int] = set()
        self._loaded_from: Path | None = None

    # ---- building ----------------------------------------------------------------------

    def add_passages(self, passages: Iterable[Passage], show_progress: bool = True) -> int:
        """Register, embed and index passages; passages already indexed are skipped.

        The passages are embedded without holding the index's lock (searches go on), then
        inserted under it; a passage another thread added meanwhile is not added twice.

        Args:
            passages: `Passage`s (e.g. from `split_documents`).
            show_progress: show a tqdm bar while embedding.
        Returns:
            the number of passages added (duplicates of indexed text are not counted).
        Raises:
            TypeError: a passage that is not a `Passage`, a source that is not a str, or
                metadata that is not a dict of str keys to JSON-serialisable values (the
                message names the key); nothing is added then.
            ValueError: a passage without text; nothing is added then.
        """
        passages = list(passages)
        for p in passages:
            _check_passage(p)
        new: dict[int, Passage] = {}
        for p in passages:  # the engine's registry has its own lock
            metadata = {**p.metadata, "source": p.source}
            chunk = self.engine.register_chunk(p.text, ChunkType.RAG_RESULT, metadata)
            fid = faiss_id(chunk.id)
            held = new.get(fid)
            if held is None:
                with self._lock:
                    held = self._passages.get(fid)
            if held is not None:
                _check_no_collision(held, chunk.id)
                continue
            new[fid] = replace(p, metadata=dict(p.metadata), chunk_id=chunk.id)
        if not new:
            return 0
        vectors = self._embed([p.text for p in new.values()], show_progress)  # no lock held
        with self._lock:
            keep = []
            for row, (fid, p) in enumerate(new.items()):
                held = self._passages.get(fid)
                if held is None:
                    keep.append(row)
                else:  # added by another thread while this one embedded
                    _check_no_collision(held, p.chunk_id)
            if not keep:
                return 0
            items = list(new.items())
            ids = np.array([items[row][0] for row in keep], dtype=np.int64)
            try:
                self._index.add_with_ids(np.ascontiguousarray(vectors[keep]), ids)
            except BaseException:
                self._index.remove_ids(ids)  # no-op for ids that did not get in
                raise
            self._passages.update(items[row] for row in keep)
            return len(keep)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        engine: CascadeEngine,
        embedder: Embedder | None = None,
        chunk_size: int = 800,
        chunk_overlap: int = 80,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        show_progress: bool = True,
        *,
        follow_symlinks: bool = False,
        include_extensionless: bool = False,
    ) -> DocumentIndex:
        """Read, split and index every document under `folder` (see `load_documents`).

        Every file not read is in `index.ingest_report` with its reason; the unusable ones are
        also in `index.skipped` and logged.

        Raises:
            FileNotFoundError: the folder does not exist.
            ValueError: it has no usable documents, or bad chunk sizes.
        """
        docs = load_documents(
            folder,
            extensions=extensions,
            show_progress=show_progress,
            follow_symlinks=follow_symlinks,
            include_extensionless=include_extensionless,
        )
        passages = split_documents(docs, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
        index = cls(engine, embedder)
        index.add_passages(passages, show_progress=show_progress)
        index.skipped = list(docs.skipped)
        index.ingest_report = docs.report
        return index

    @classmethod
    def cached(
        cls,
        folder: str | Path,
        engine: CascadeEngine,
        embedder: Embedder | None = None,
        cache_dir: str | Path | None = None,
        chunk_size: int = 800,
        chunk_overlap: int = 80,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        show_progress: bool = True,
        *,
        follow_symlinks: bool = False,
        include_extensionless: bool = False,
    ) -> DocumentIndex:
        """The index of `folder`, loaded from the cache, or built and saved there.

        The cache entry is `<cache_dir>/indexes/<folder name>-<hash of its path>`; it is
        rebuilt when any document's path, size or modification time, the embedder's identity,
        the chunk sizes or the file options change. A damaged entry (anything `load` refuses)
        is deleted and rebuilt, with a warning. `cache_dir` defaults to the engine's
        (`$CASCADE_RAG_CACHE` or ~/.cache/cascade_rag).
        """
        root = Path(folder).expanduser()
        options = dict(follow_symlinks=follow_symlinks, include_extensionless=include_extensionless)
        files = list_document_files(root, extensions, **options)  # names a missing folder
        embedder = embedder if embedder is not None else Embedder()
        settings = [chunk_size, chunk_overlap, normalise_extensions(extensions), options]
        fingerprint = _fingerprint(root, files, embedder, settings)
        if cache_dir is None:
            from cascade_rag.models.loader import default_cache_dir

            cache_dir = engine.config.cache_dir or default_cache_dir()
        resolved = str(root.resolve())
        key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
        path = Path(cache_dir).expanduser() / "indexes" / f"{root.resolve().name}-{key}"
        if path.is_symlink() or path.is_file():  # not ours: an entry is a real folder
            logger.warning("replacing %s, which is not a cached index folder", path)
            path.unlink()
        elif os.path.lexists(path / store.MANIFEST):
            try:
                saved = store.read_index(path)
                if saved.fingerprint == fingerprint:
                    return cls._from_saved(saved, engine, embedder)
            except ValueError as exc:  # damaged, edited or of an old format
                logger.warning("rebuilding the cached index at %s: %s", path, exc)
                shutil.rmtree(path)
        index = cls.from_folder(
            root,
            engine,
            embedder,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            extensions=extensions,
            show_progress=show_progress,
            **options,
        )
        index._fingerprint = fingerprint
        index.save(path)
        return index

    # ---- searching ---------------------------------------------------------------------

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The `k` passages most similar to `query`, best first, with cosine similarities.

        Asking for more passages than the index holds returns all of them. The query is
        embedded without holding the index's lock. The first time a passage loaded from disk is
        returned, its chunk id is recomputed from the engine's tokens of its text and compared
        with the stored one (the retriever registers the text right after anyway).

        Raises:
            ValueError: an empty query, k <= 0, or an empty index.
            DamagedIndexError (a ValueError): a loaded passage whose text does not give its
                chunk id (the saved index was edited).
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if len(self) == 0:
            raise ValueError("the index is empty; ingest documents first")
        vector = self.embedder.embed([query])  # [1, dim]
        with self._lock:
            scores, ids = self._index.search(vector, min(k, self._index.ntotal))
            hits = [
                (int(i), _copy(self._passages[int(i)]), float(s))
                for i, s in zip(ids[0], scores[0])
                if i >= 0
            ]
        for fid, p, _ in hits:
            if fid in self._unverified:
                self._verify_chunk_id(fid, p)
        return [(p, score) for _, p, score in hits]

    def passages(self) -> list[Passage]:
        """Every indexed passage (copies), in insertion order."""
        with self._lock:
            return [_copy(p) for p in self._passages.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._passages)

    def __repr__(self) -> str:
        return f"DocumentIndex(num_passages={len(self)}, embedder={self.embedder.name!r})"

    # ---- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Save the index to the folder `path` (created if needed), atomically.

        A crash or error while saving leaves whatever index was at `path` loadable. Writers
        take `<path>/.lock`; readers take no lock.

        Raises:
            ValueError: `path` is an existing file.
        """
        import faiss
        from filelock import FileLock

        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"index path {str(path)!r} is a file; pass a folder path")
        folder.mkdir(parents=True, exist_ok=True)
        identity = embedder_identity(self.embedder)
        with FileLock(str(folder / ".lock")):
            with self._lock:  # a consistent copy; written without blocking searches
                passages = list(self._passages.values())
                vectors = faiss.clone_index(self._index)
            store.write_index(
                folder,
                embedder_name=self.embedder.name,
                embedder_dim=self.embedder.dim,
                embedder_identity=identity,
                namespace=self.engine.registry.namespace,
                fingerprint=self._fingerprint,
                passages=passages,
                faiss_index=vectors,
            )

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether `path` holds a saved index (cheap: reads nothing)."""
        return (Path(path).expanduser() / store.MANIFEST).is_file()

    @classmethod
    def load(
        cls, path: str | Path, engine: CascadeEngine, embedder: Embedder | None = None
    ) -> DocumentIndex:
        """Load an index saved by `save`, checking everything in it (see `store.py`).

        If `engine` names chunks differently from the engine the index was built with (another
        model or tokenizer), the passages are registered again under new ids. Only
        `<path>/index.json` and the vectors file it names are opened, read-only.

        Raises:
            FileNotFoundError: no index at `path`.
            DamagedIndexError (a ValueError): a damaged or edited index; rebuild it.
            ValueError: an embedder other than the one it was built with (compared by the
                content identity of the model files, not the name).
        """
        saved = store.read_index(path)
        return cls._from_saved(saved, engine, embedder)

    @classmethod
    def _from_saved(
        cls, saved: store.SavedIndex, engine: CascadeEngine, embedder: Embedder | None
    ) -> DocumentIndex:
        embedder = embedder if embedder is not None else Embedder()
        identity = embedder_identity(embedder)
        if (saved.embedder_identity, saved.embedder_dim) != (identity, embedder.dim):
            same_name = " (another model under the same name)" * (
                saved.embedder_name == embedder.name
            )
            raise ValueError(
                f"the index at {str(saved.folder)!r} was built with embedder "
                f"{saved.embedder_name!r} ({saved.embedder_identity}, dim {saved.embedder_dim}), "
                f"not {embedder.name!r} ({identity}, dim {embedder.dim}){same_name}; pass "
                f"embedder=Embedder(<the {saved.embedder_name} model it was built with>) or "
                "rebuild the index with `cascade-rag ingest`"
            )
        index = cls(engine, embedder)
        index._fingerprint = saved.fingerprint
        index._loaded_from = saved.folder
        passages = {faiss_id(p.chunk_id): p for p in saved.passages}
        if saved.namespace == engine.registry.namespace:
            index._index = saved.faiss_index
            index._passages = passages
            index._unverified = set(passages)
            return index
        # other model or tokenizer: other chunk ids; move the vectors to the new ids
        old_ids = list(passages)
        vectors = np.stack([saved.faiss_index.reconstruct(i) for i in old_ids]).astype(np.float32)
        for fid in old_ids:
            p = passages[fid]
            chunk = engine.register_chunk(
                p.text, ChunkType.RAG_RESULT, {**p.metadata, "source": p.source}
            )
            p.chunk_id = chunk.id
        new_ids = np.array([faiss_id(passages[i].chunk_id) for i in old_ids], np.int64)
        _, first = np.unique(new_ids, return_index=True)
        first.sort()
        index._index.add_with_ids(vectors[first], new_ids[first])
        index._passages = {int(new_ids[j]): passages[old_ids[j]] for j in first}
        return index

    # ---- internals ---------------------------------------------------------------------

    def _verify_chunk_id(self, fid: int, p: Passage) -> None:
        """Recompute a loaded passage's chunk id from its tokens; DamagedIndexError if it
        differs (the text was replaced and its digest forged)."""
        chunk = self.engine.register_chunk(
            p.text, ChunkType.RAG_RESULT, {**p.metadata, "source": p.source}
        )
        if chunk.id != p.chunk_id:
            raise DamagedIndexError(
                self._loaded_from or "?",
                f"the passage from {p.source!r:.60} does not hash to its chunk id "
                f"{p.chunk_id} (its text was replaced)",
            )
        with self._lock:
            self._unverified.discard(fid)

    def _embed(self, texts: list[str], show_progress: bool) -> np.ndarray:
        """[len(texts), dim] float32, embedded in batches under a progress bar."""
        step = self.embedder.batch_size
        parts = []
        with tqdm(
            total=len(texts), desc="Embedding passages", unit="passage", disable=not show_progress
        ) as bar:
            for start in range(0, len(texts), step):
                parts.append(self.embedder.embed(texts[start : start + step]))
                bar.update(len(parts[-1]))
        vectors = np.concatenate(parts).astype(np.float32, copy=False)
        if vectors.shape != (len(texts), self.embedder.dim):
            raise ValueError(
                f"the embedder returned vectors of shape {vectors.shape} for {len(texts)} "
                f"texts; expected ({len(texts)}, {self.embedder.dim})"
            )
        return vectors


def _check_passage(p: Passage) -> None:
    """TypeError/ValueError for a passage `add_passages` cannot index or `save` cannot write."""
    if not isinstance(p, Passage):
        raise TypeError(f"add_passages takes Passages, got {type(p).__name__}")
    if not isinstance(p.text, str) or not p.text.strip():
        raise ValueError(f"passage from {p.source!r} has no text; drop it before adding")
    if not isinstance(p.source, str):
        raise TypeError(f"passage source must be a str, got {type(p.source).__name__}")
    if not isinstance(p.metadata, dict):
        raise TypeError(
            f"metadata of the passage from {p.source!r} must be a dict, got "
            f"{type(p.metadata).__name__}"
        )
    for key, value in p.metadata.items():
        if not isinstance(key, str):
            raise TypeError(
                f"metadata key {key!r} of the passage from {p.source!r} is a "
                f"{type(key).__name__}; JSON keys are strings: use str({key!r})"
            )
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"metadata key {key!r} of the passage from {p.source!r} holds a "
                f"{type(value).__name__} that JSON cannot store ({exc}); convert it to str, "
                "int, float, bool, None, list or dict before adding"
            ) from None


def _check_no_collision(held: Passage, chunk_id: str) -> None:
    if held.chunk_id != chunk_id:
        raise RuntimeError(f"FAISS id collision between chunks {held.chunk_id} and {chunk_id}")


def _copy(p: Passage) -> Passage:
    return replace(p, metadata=dict(p.metadata))


def _fingerprint(root: Path, files: list[Path], embedder: Embedder, settings: list) -> str:
    """Hash of what a cached index depends on: the files' names, sizes and times, settings."""
    h = hashlib.sha256()
    head = [store.INDEX_VERSION, embedder_identity(embedder), embedder.dim, settings]
    h.update(json.dumps(head).encode())
    for f in files:
        st = f.stat()
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
