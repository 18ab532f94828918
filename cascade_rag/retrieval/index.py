"""A FAISS index of passages, keyed by the content hash of the engine chunk holding each one.

Every passage is registered with the engine as a RAG_RESULT chunk; its FAISS id is the first
60 bits of the chunk's hex id, so the same text is stored once however often it is added, and
a search result names the chunk whose KV the engine can reuse. Vectors are L2-normalised and
searched by inner product (cosine) in an `IndexIDMap2` over an `IndexFlatIP` (exact search).

On disk an index is a folder: `index.json` (embedder, chunk namespace, passages, and the name
of the vectors file) and `vectors-<token>.faiss`. Saving writes a new vectors file, then
replaces `index.json` atomically, then removes the old vectors file, so a crash at any point
leaves the previous index loadable.

This module does not decide chunk order in prompts or talk to other frameworks (see
`retriever.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from cascade_rag.chunks import ChunkType
from cascade_rag.retrieval.embedder import Embedder
from cascade_rag.retrieval.ingest import (
    DEFAULT_EXTENSIONS,
    Passage,
    SkippedFile,
    list_document_files,
    load_documents,
    split_documents,
)

if TYPE_CHECKING:
    from cascade_rag.llm import CascadeEngine

logger = logging.getLogger(__name__)

INDEX_FORMAT = "cascade-rag-index"
INDEX_VERSION = 1
_MANIFEST = "index.json"


def faiss_id(chunk_id: str) -> int:
    """The FAISS int64 id of a chunk: its first 15 hex digits (60 bits, never negative)."""
    return int(chunk_id[:15], 16)


class DocumentIndex:
    """Passages searchable by meaning, each one a registered engine chunk.

    Args:
        engine: the `CascadeEngine` whose chunk registry names the passages.
        embedder: the `Embedder` for passages and queries; None loads the default one.

    Adding is all or nothing: if embedding fails half way, the index is as it was. Searches
    and adds from several threads are serialised.

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
        self._lock = threading.RLock()
        self.skipped: list[SkippedFile] = []  # files from_folder could not read
        self._fingerprint: str | None = None  # what a cached index was built from

    # ---- building ----------------------------------------------------------------------

    def add_passages(self, passages: Iterable[Passage], show_progress: bool = True) -> int:
        """Register, embed and index passages; passages already indexed are skipped.

        Args:
            passages: `Passage`s (e.g. from `split_documents`).
            show_progress: show a tqdm bar while embedding.
        Returns:
            the number of passages added (duplicates of indexed text are not counted).
        Raises:
            TypeError / ValueError: a passage that is not a `Passage` or has no text; nothing
                is added then.
        """
        passages = list(passages)
        for p in passages:
            if not isinstance(p, Passage):
                raise TypeError(f"add_passages takes Passages, got {type(p).__name__}")
            if not isinstance(p.text, str) or not p.text.strip():
                raise ValueError(f"passage from {p.source!r} has no text; drop it before adding")
        with self._lock:
            new: dict[int, Passage] = {}
            for p in passages:
                metadata = {**p.metadata, "source": p.source}
                chunk = self.engine.register_chunk(p.text, ChunkType.RAG_RESULT, metadata)
                fid = faiss_id(chunk.id)
                held = self._passages.get(fid) or new.get(fid)
                if held is not None:
                    if held.chunk_id != chunk.id:
                        raise RuntimeError(
                            f"FAISS id collision between chunks {held.chunk_id} and {chunk.id}"
                        )
                    continue
                new[fid] = replace(p, metadata=dict(p.metadata), chunk_id=chunk.id)
            if not new:
                return 0
            ids = np.fromiter(new.keys(), dtype=np.int64, count=len(new))
            vectors = self._embed([p.text for p in new.values()], show_progress)
            try:
                self._index.add_with_ids(vectors, ids)
            except BaseException:
                self._index.remove_ids(ids)  # no-op for ids that did not get in
                raise
            self._passages.update(new)
            return len(new)

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
    ) -> DocumentIndex:
        """Read, split and index every document under `folder`.

        Unusable files are skipped with a warning and listed in `index.skipped`.

        Raises:
            FileNotFoundError: the folder does not exist.
            ValueError: it has no usable documents, or bad chunk sizes.
        """
        docs = load_documents(folder, extensions=extensions, show_progress=show_progress)
        passages = split_documents(docs, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
        index = cls(engine, embedder)
        index.add_passages(passages, show_progress=show_progress)
        index.skipped = list(docs.skipped)
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
    ) -> DocumentIndex:
        """The index of `folder`, loaded from the cache, or built and saved there.

        The cache entry is `<cache_dir>/indexes/<folder name>-<hash of its path>`; it is
        rebuilt when any document's path, size or modification time, the embedder or the
        chunk sizes change. `cache_dir` defaults to the engine's (`$CASCADE_RAG_CACHE` or
        ~/.cache/cascade_rag).
        """
        root = Path(folder).expanduser()
        files = list_document_files(root, extensions)  # FileNotFoundError names the folder
        embedder = embedder if embedder is not None else Embedder()
        fingerprint = _fingerprint(root, files, embedder, chunk_size, chunk_overlap)
        if cache_dir is None:
            from cascade_rag.models.loader import default_cache_dir

            cache_dir = engine.config.cache_dir or default_cache_dir()
        resolved = str(root.resolve())
        key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
        path = Path(cache_dir).expanduser() / "indexes" / f"{root.resolve().name}-{key}"
        if (path / _MANIFEST).is_file():
            try:
                if _read_manifest(path).get("fingerprint") == fingerprint:
                    return cls.load(path, engine, embedder)
            except ValueError as exc:  # damaged or old format: rebuilt below
                logger.warning("rebuilding the cached index at %s: %s", path, exc)
        index = cls.from_folder(
            root,
            engine,
            embedder,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            extensions=extensions,
            show_progress=show_progress,
        )
        index._fingerprint = fingerprint
        index.save(path)
        return index

    # ---- searching ---------------------------------------------------------------------

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The `k` passages most similar to `query`, best first, with cosine similarities.

        Asking for more passages than the index holds returns all of them.

        Raises:
            ValueError: an empty query, k <= 0, or an empty index.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        with self._lock:
            if self._index.ntotal == 0:
                raise ValueError("the index is empty; ingest documents first")
            vector = self.embedder.embed([query])  # [1, dim]
            scores, ids = self._index.search(vector, min(k, self._index.ntotal))
            return [
                (_copy(self._passages[int(i)]), float(s))
                for i, s in zip(ids[0], scores[0])
                if i >= 0
            ]

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

        A crash or error while saving leaves whatever index was at `path` loadable.

        Raises:
            ValueError: `path` is an existing file.
            TypeError: passage metadata that JSON cannot hold.
        """
        import faiss
        from filelock import FileLock

        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"index path {str(path)!r} is a file; pass a folder path")
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        vectors_name = f"vectors-{token}.faiss"
        with FileLock(str(folder / ".lock")), self._lock:
            manifest = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "embedder": {"name": self.embedder.name, "dim": self.embedder.dim},
                "namespace": self.engine.registry.namespace,
                "vectors": vectors_name,
                "fingerprint": self._fingerprint,
                "passages": [
                    {
                        "id": fid,
                        "chunk_id": p.chunk_id,
                        "source": p.source,
                        "text": p.text,
                        "metadata": p.metadata,
                    }
                    for fid, p in self._passages.items()
                ],
            }
            body = json.dumps(manifest, ensure_ascii=False)  # TypeError before any write
            tmp_manifest = folder / f"{_MANIFEST}.{token}.tmp"
            try:
                faiss.write_index(self._index, str(folder / vectors_name))
                _fsync(folder / vectors_name)
                tmp_manifest.write_text(body, encoding="utf-8")
                _fsync(tmp_manifest)
                os.replace(tmp_manifest, folder / _MANIFEST)
            except BaseException:
                for leftover in (tmp_manifest, folder / vectors_name):
                    leftover.unlink(missing_ok=True)
                raise
            _fsync_dir(folder)
            for old in folder.glob("vectors-*.faiss"):
                if old.name != vectors_name:
                    old.unlink(missing_ok=True)
            for old in folder.glob(f"{_MANIFEST}.*.tmp"):
                old.unlink(missing_ok=True)

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether `path` holds a saved index (cheap: reads nothing)."""
        return (Path(path).expanduser() / _MANIFEST).is_file()

    @classmethod
    def load(
        cls, path: str | Path, engine: CascadeEngine, embedder: Embedder | None = None
    ) -> DocumentIndex:
        """Load an index saved by `save`.

        If `engine` names chunks differently from the engine the index was built with (another
        model or tokenizer), the passages are registered again under new ids.

        Raises:
            FileNotFoundError: no index at `path`.
            ValueError: not an index, a damaged one, or an embedder other than the one it
                was built with.
        """
        import faiss
        from filelock import FileLock

        folder = Path(path).expanduser()
        if not (folder / _MANIFEST).is_file():
            raise FileNotFoundError(
                f"no saved index at {str(path)!r} (expected {folder / _MANIFEST}); build one "
                "with DocumentIndex.from_folder(...).save(path) or `cascade-rag ingest`"
            )
        with FileLock(str(folder / ".lock")):
            manifest = _read_manifest(folder)
            vectors_path = folder / str(manifest.get("vectors", ""))
            if not vectors_path.is_file():
                raise ValueError(f"index at {str(path)!r} is damaged: {vectors_path} is missing")
            faiss_index = faiss.read_index(str(vectors_path))
        saved = manifest["embedder"]
        embedder = embedder if embedder is not None else Embedder()
        if (saved["name"], saved["dim"]) != (embedder.name, embedder.dim):
            raise ValueError(
                f"the index at {str(path)!r} was built with embedder {saved['name']!r} "
                f"(dim {saved['dim']}), not {embedder.name!r} (dim {embedder.dim}); pass "
                f"embedder=Embedder(<the {saved['name']} model>) or rebuild the index"
            )
        records = manifest["passages"]
        stored_ids = faiss.vector_to_array(faiss_index.id_map) if records else np.zeros(0)
        if faiss_index.ntotal != len(records) or set(stored_ids.tolist()) != {
            r["id"] for r in records
        }:
            raise ValueError(
                f"index at {str(path)!r} is damaged: {faiss_index.ntotal} vectors for "
                f"{len(records)} passages; rebuild it"
            )
        index = cls(engine, embedder)
        index._fingerprint = manifest.get("fingerprint")
        passages = {
            r["id"]: Passage(r["text"], r["source"], dict(r["metadata"]), r["chunk_id"])
            for r in records
        }
        if manifest["namespace"] == engine.registry.namespace:
            index._index = faiss_index
            index._passages = passages
        else:  # other model or tokenizer: other chunk ids; move the vectors to the new ids
            old_ids = list(passages)
            vectors = np.stack([faiss_index.reconstruct(i) for i in old_ids]).astype(np.float32)
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
        assert vectors.shape == (len(texts), self.embedder.dim), vectors.shape
        return vectors


def _copy(p: Passage) -> Passage:
    return replace(p, metadata=dict(p.metadata))


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the index at {str(folder)!r}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{folder / _MANIFEST} is not a cascade-rag index")
    if manifest.get("version") != INDEX_VERSION:
        raise ValueError(
            f"index at {str(folder)!r} has format version {manifest.get('version')}; this "
            f"cascade-rag reads version {INDEX_VERSION}: rebuild the index"
        )
    return manifest


def _fingerprint(
    root: Path, files: list[Path], embedder: Embedder, chunk_size: int, chunk_overlap: int
) -> str:
    """Hash of what a cached index depends on: the files' names, sizes and times, settings."""
    h = hashlib.sha256()
    settings = [INDEX_VERSION, embedder.name, embedder.dim, chunk_size, chunk_overlap]
    h.update(json.dumps(settings).encode())
    for f in files:
        st = f.stat()
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
