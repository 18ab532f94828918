"""A saved `DocumentIndex` on disk: written atomically, read back trusting nothing.

A saved index is a folder with two files that matter (and `.lock`, which only writers take):

    index.json              the manifest: format and version; the embedder's name, dimension
                            and content identity; the chunk namespace; the cache fingerprint;
                            the vectors file's name and sha256; and every passage as
                            {chunk_id, source, text, metadata, sha256}
    vectors-<12 hex>.faiss  the FAISS IndexIDMap2(IndexFlatIP), ids = first 60 bits of the
                            chunk ids, one vector per passage

Saving writes a new vectors file, then replaces index.json atomically, then deletes the old
vectors file, so a crash at any point leaves the previous index loadable and no file is ever
changed in place. Readers therefore take no lock (read-only folders load): a reader sees the old
or the new manifest whole, and if the vectors file it names was deleted by a save in between, it
reads the manifest again.

Loading checks, before anything is used:
- Paths: only index.json and the vectors file it names are opened, read-only. The name must be
  `vectors-<12 hex>.faiss` (no absolute path, no "..", no separator); neither file may be a
  symlink that leads out of the folder, or anything but a regular file.
- The manifest, field by field: exactly the expected keys, each of the expected type and range.
- The vectors file: its sha256 must equal the manifest's before FAISS parses a byte of it; then
  its type, metric, dimension, count and ids must match the passages, and no vector may be NaN
  or infinite.
- Every passage: its record carries a sha256 over (chunk_id, source, text, metadata), checked on
  load, so replaced text, a record moved onto another passage's id, or an edited source is found.
  Why a stored digest and not chunk ids recomputed from the text: a chunk id hashes the
  passage's tokens, so recomputing it means tokenizing every passage with the engine's
  tokenizer at every load (seconds per 10,000 passages), and it is impossible when the index is
  loaded under another model, whose namespace differs. The digest costs microseconds and does
  not depend on the engine. A chunk id edited in the manifest no longer matches the ids in the
  vectors file. And since a digest can be recomputed by whoever edits the manifest, the
  `DocumentIndex` also recomputes each loaded passage's chunk id from the engine's tokens the
  first time a search returns it (the retriever registers that text right after anyway), so no
  replaced text reaches a prompt under the id of another.
Any failure raises one `DamagedIndexError` (a ValueError) that names the folder and says to
re-run the ingest.

What this does not protect against: someone who rewrites the manifest and the vectors file
together and consistently. Digests are not signatures (there is no key); keep indexes where
only you can write. This module does not embed, search or register chunks (see `index.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade_rag.retrieval.ingest import Passage

INDEX_FORMAT = "cascade-rag-index"
INDEX_VERSION = 2
MANIFEST = "index.json"
_VECTORS_NAME = re.compile(r"vectors-[0-9a-f]{12}\.faiss")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_DIM = 1 << 16
_KEYS = {
    "format",
    "version",
    "embedder",
    "namespace",
    "fingerprint",
    "vectors",
    "vectors_sha256",
    "passages",
}
_EMBEDDER_KEYS = {"name", "dim", "identity"}
_PASSAGE_KEYS = {"chunk_id", "source", "text", "metadata", "sha256"}
_READ_ATTEMPTS = 3  # manifest re-reads when a concurrent save replaced it


class DamagedIndexError(ValueError):
    """A saved index that cannot be trusted: damaged, edited, or of another format version."""

    def __init__(self, folder: str | Path, problem: str) -> None:
        self.folder, self.problem = str(folder), problem
        super().__init__(
            f"cannot read the index at {str(folder)!r}: {problem}. It is damaged or was changed "
            f"after it was saved; rebuild it: re-run `cascade-rag ingest <documents> --index "
            f"{folder}` (or DocumentIndex.from_folder(...).save(...))"
        )


@dataclass(frozen=True)
class SavedIndex:
    """A saved index that passed every check of `read_index`.

    Attributes:
        passages: the passages (chunk_id set) in the order of the manifest.
        faiss_index: the FAISS IndexIDMap2 holding one vector per passage under
            `faiss_id(passage.chunk_id)`.
    """

    folder: Path
    embedder_name: str
    embedder_dim: int
    embedder_identity: str
    namespace: str
    fingerprint: str | None
    passages: list[Passage]
    faiss_index: Any


def faiss_id(chunk_id: str) -> int:
    """The FAISS int64 id of a chunk: its first 15 hex digits (60 bits, never negative)."""
    return int(chunk_id[:15], 16)


def passage_digest(chunk_id: str, source: str, text: str, metadata: dict) -> str:
    """sha256 (hex) over a passage record, as stored in and checked against the manifest."""
    body = json.dumps(
        [chunk_id, source, text, metadata], ensure_ascii=True, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def write_index(
    folder: Path,
    *,
    embedder_name: str,
    embedder_dim: int,
    embedder_identity: str,
    namespace: str,
    fingerprint: str | None,
    passages: list[Passage],
    faiss_index: Any,
) -> None:
    """Write an index folder atomically (see the module docstring); the caller holds locks.

    Raises:
        TypeError: passage metadata that JSON cannot hold (before anything is written).
    """
    import faiss

    token = uuid.uuid4().hex[:12]
    vectors_name = f"vectors-{token}.faiss"
    vectors_path = folder / vectors_name
    records = [
        {
            "chunk_id": p.chunk_id,
            "source": p.source,
            "text": p.text,
            "metadata": p.metadata,
            "sha256": passage_digest(p.chunk_id, p.source, p.text, p.metadata),
        }
        for p in passages
    ]
    tmp_manifest = folder / f"{MANIFEST}.{token}.tmp"
    try:
        faiss.write_index(faiss_index, str(vectors_path))
        _fsync(vectors_path)
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "embedder": {"name": embedder_name, "dim": embedder_dim, "identity": embedder_identity},
            "namespace": namespace,
            "fingerprint": fingerprint,
            "vectors": vectors_name,
            "vectors_sha256": hashlib.sha256(vectors_path.read_bytes()).hexdigest(),
            "passages": records,
        }
        tmp_manifest.write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
        _fsync(tmp_manifest)
        os.replace(tmp_manifest, folder / MANIFEST)
    except BaseException:
        for leftover in (tmp_manifest, vectors_path):
            leftover.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for old in folder.glob("vectors-*.faiss"):
        if old.name != vectors_name:
            old.unlink(missing_ok=True)
    for old in folder.glob(f"{MANIFEST}.*.tmp"):
        old.unlink(missing_ok=True)


def read_index(path: str | Path) -> SavedIndex:
    """Read and check a saved index (every check of the module docstring).

    Raises:
        FileNotFoundError: no index.json at `path`.
        DamagedIndexError: anything wrong with it.
    """
    folder = Path(path).expanduser()
    if not os.path.lexists(folder / MANIFEST):
        raise FileNotFoundError(
            f"no saved index at {str(path)!r} (expected {folder / MANIFEST}); build one "
            "with DocumentIndex.from_folder(...).save(path) or `cascade-rag ingest`"
        )
    try:
        return _read_checked(folder)
    except _Bad as exc:
        raise DamagedIndexError(path, str(exc)) from None


# ---- checks ----------------------------------------------------------------------------------


class _Bad(Exception):
    """What is wrong with a saved index, for `DamagedIndexError`."""


def _read_checked(folder: Path) -> SavedIndex:
    import faiss

    folder_real = Path(os.path.realpath(folder))
    for _ in range(_READ_ATTEMPTS):
        try:
            manifest, raw = _manifest(folder, folder_real)
        except FileNotFoundError:
            raise _Bad(f"{MANIFEST} vanished or is a broken symlink") from None
        try:
            vectors = _read_file(folder, folder_real, manifest["vectors"])
            break
        except FileNotFoundError:
            try:
                replaced = _read_file(folder, folder_real, MANIFEST) != raw
            except FileNotFoundError:
                replaced = False
            if not replaced:
                raise _Bad(f"its vectors file {manifest['vectors']} is missing") from None
    else:
        raise _Bad("it kept changing while being read (a save in progress?); try again")

    if hashlib.sha256(vectors).hexdigest() != manifest["vectors_sha256"]:
        raise _Bad(
            f"{manifest['vectors']} does not match the sha256 in {MANIFEST} "
            f"(truncated or changed: {len(vectors)} bytes)"
        )
    try:
        index = faiss.deserialize_index(np.frombuffer(vectors, dtype=np.uint8))
    except (RuntimeError, MemoryError) as exc:
        raise _Bad(f"{manifest['vectors']} is not a FAISS index ({str(exc)[:120]})") from None
    # deserialize_index returns the concrete class and owns it (a downcast_index wrapper
    # would not own it, and the index would be freed under us)
    dim, passages = manifest["embedder"]["dim"], manifest["passages"]
    if not isinstance(index, faiss.IndexIDMap2):
        raise _Bad(f"{manifest['vectors']} holds a {type(index).__name__}, not an IndexIDMap2")
    flat = faiss.downcast_index(index.index)
    if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _Bad(f"{manifest['vectors']} is not an inner-product flat index")
    if index.d != dim:
        raise _Bad(f"its vectors have dimension {index.d}, the embedder {dim}")
    if index.ntotal != len(passages):
        raise _Bad(f"{index.ntotal} vectors for {len(passages)} passages")
    ids = np.sort(faiss.vector_to_array(index.id_map)) if passages else np.zeros(0, np.int64)
    expected = np.sort(np.array([faiss_id(p["chunk_id"]) for p in passages], dtype=np.int64))
    if not np.array_equal(ids, expected):
        raise _Bad("the vectors' ids do not match the passages' chunk ids")
    if passages and not np.isfinite(flat.reconstruct_n(0, index.ntotal)).all():
        raise _Bad("some vectors are NaN or infinite")
    return SavedIndex(
        folder=folder,
        embedder_name=manifest["embedder"]["name"],
        embedder_dim=dim,
        embedder_identity=manifest["embedder"]["identity"],
        namespace=manifest["namespace"],
        fingerprint=manifest["fingerprint"],
        passages=[Passage(p["text"], p["source"], p["metadata"], p["chunk_id"]) for p in passages],
        faiss_index=index,
    )


def _manifest(folder: Path, folder_real: Path) -> tuple[dict, bytes]:
    """(checked manifest, its bytes); FileNotFoundError if index.json is not there."""
    raw = _read_file(folder, folder_real, MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Bad(f"{MANIFEST} is not valid JSON ({exc})") from None
    _check_manifest(manifest)
    return manifest, raw


def _read_file(folder: Path, folder_real: Path, name: str) -> bytes:
    """The bytes of the regular file `name` directly in `folder`, read-only.

    A symlink is followed only to a file in the same folder.
    """
    path = folder / name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if target.parent != folder_real:
                raise _Bad(f"{name} is a symlink out of the index folder (to {target})")
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad(f"{name} is not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Bad(f"{name} cannot be read ({exc.strerror or exc})") from None


def _check_manifest(m: Any) -> None:
    """Raise `_Bad` unless `m` has exactly the manifest's keys, types and ranges."""
    if not isinstance(m, dict) or m.get("format") != INDEX_FORMAT:
        raise _Bad(f"{MANIFEST} is not a cascade-rag index manifest")
    if m.get("version") != INDEX_VERSION:
        raise _Bad(
            f"it has format version {m.get('version')!r}; this cascade-rag reads version "
            f"{INDEX_VERSION}"
        )
    _keys(m, _KEYS, MANIFEST)
    emb = m["embedder"]
    _expect(isinstance(emb, dict), "embedder", "an object")
    _keys(emb, _EMBEDDER_KEYS, "embedder")
    _expect(isinstance(emb["name"], str) and emb["name"], "embedder.name", "a non-empty string")
    _expect(_is_int(emb["dim"]) and 0 < emb["dim"] <= _MAX_DIM, "embedder.dim", "a dimension")
    _expect(isinstance(emb["identity"], str) and emb["identity"], "embedder.identity", "a string")
    _expect(isinstance(m["namespace"], str) and m["namespace"], "namespace", "a string")
    _expect(
        m["fingerprint"] is None or isinstance(m["fingerprint"], str),
        "fingerprint",
        "a string or null",
    )
    vectors = m["vectors"]
    if not isinstance(vectors, str) or not _VECTORS_NAME.fullmatch(vectors):
        raise _Bad(
            f"vectors must name a file vectors-<12 hex digits>.faiss in the index folder, got "
            f"{vectors!r:.80}"
        )
    sha = m["vectors_sha256"]
    _expect(isinstance(sha, str) and _HEX64.fullmatch(sha), "vectors_sha256", "64 hex digits")
    _expect(isinstance(m["passages"], list), "passages", "a list")
    seen: dict[int, int] = {}
    for i, p in enumerate(m["passages"]):
        where = f"passages[{i}]"
        _expect(isinstance(p, dict), where, "an object")
        _keys(p, _PASSAGE_KEYS, where)
        cid = p["chunk_id"]
        _expect(
            isinstance(cid, str) and _HEX32.fullmatch(cid), f"{where}.chunk_id", "32 hex digits"
        )
        _expect(isinstance(p["source"], str), f"{where}.source", "a string")
        _expect(isinstance(p["text"], str) and p["text"].strip(), f"{where}.text", "non-blank text")
        meta = p["metadata"]
        _expect(
            isinstance(meta, dict) and all(isinstance(k, str) for k in meta),
            f"{where}.metadata",
            "an object with string keys",
        )
        _expect(isinstance(p["sha256"], str), f"{where}.sha256", "a string")
        if p["sha256"] != passage_digest(cid, p["source"], p["text"], meta):
            raise _Bad(
                f"{where} (from {p['source']!r:.60}) does not match its sha256: its text, "
                "source, metadata or chunk id was changed"
            )
        fid = faiss_id(cid)
        if fid in seen:
            raise _Bad(f"{where} has the same id as passages[{seen[fid]}]")
        seen[fid] = i


def _keys(obj: dict, expected: set[str], where: str) -> None:
    missing, extra = expected - obj.keys(), obj.keys() - expected
    if missing:
        raise _Bad(f"{where} lacks {', '.join(sorted(missing))}")
    if extra:
        raise _Bad(f"{where} has unexpected keys {', '.join(sorted(map(str, extra)))[:120]}")


def _expect(ok: Any, field: str, what: str) -> None:
    if not ok:
        raise _Bad(f"{field} must be {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
