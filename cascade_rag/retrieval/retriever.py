"""Query -> retrieved passages as engine chunks, in an order that lets requests share KV.

A `Retriever` asks a source for the k best passages and registers each one with the engine as
a RAG_RESULT chunk (by the content hash of its tokens, so the same passage is the same chunk in
every request). The engine reuses KV along a prefix tree of chunks: two requests share the KV of
their chunks only up to the first chunk where they differ. Ranking order puts the same passages
in different orders for different questions; sorting the chunks by id (canonical order) makes
requests that retrieve overlapping sets start with the same chunks more often, so they share
longer prefixes. The model sees the passages unranked, which retrieval-augmented answers
rarely depend on; pass `canonical_order=False` to keep best-first order.

Sources are told apart by duck typing; neither LangChain nor LlamaIndex is imported:
  - `DocumentIndex` (this package);
  - a LangChain VectorStore: `.similarity_search_with_score(query, k=k)` -> [(Document, score)];
  - a LlamaIndex retriever: `.retrieve(query)` -> [NodeWithScore];
  - a LangChain retriever (any Runnable): `.invoke(query)` -> [Document].

This module does not generate (see `cascade_rag.rag`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cascade_rag.chunks import Chunk, ChunkType
from cascade_rag.composition import Composition
from cascade_rag.retrieval.index import DocumentIndex

if TYPE_CHECKING:
    from cascade_rag.llm import CascadeEngine


@dataclass(frozen=True)
class Hit:
    """One search result from any source, before it becomes a chunk."""

    text: str
    source: str
    score: float | None
    metadata: Mapping[str, Any]


class Retriever:
    """Retrieve passages for a query as engine chunks.

    Args:
        engine: the `CascadeEngine` the chunks are registered with.
        source: a `DocumentIndex`, a LangChain VectorStore or retriever, or a LlamaIndex
            retriever (see the module docstring).
        k: most passages per query (results past k from retrievers that return more are
            dropped).
        canonical_order: sort the chunks by chunk id, so that requests retrieving overlapping
            sets share longer chunk prefixes in the engine's KV cache; False keeps the
            source's ranking (best first).

    Each chunk's metadata carries "source", "score" (None where the source gives none) and
    "rank" (0 = best), plus the source's own metadata.

    Example:
        >>> retriever = Retriever(engine, DocumentIndex.from_folder("handbook/", engine), k=3)
        >>> out = engine.generate(retriever.compose("When does the library open?"))
    """

    def __init__(
        self, engine: CascadeEngine, source: Any, k: int = 4, canonical_order: bool = True
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.engine = engine
        self.source = source
        self.k = k
        self.canonical_order = canonical_order
        self._search = _search_function(source)

    def retrieve(self, query: str) -> list[Chunk]:
        """The chunks of the passages retrieved for `query` (at most k, duplicates dropped).

        Raises:
            ValueError: an empty query, or an empty `DocumentIndex`.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        chunks: list[Chunk] = []
        seen: set[str] = set()
        for rank, hit in enumerate(self._search(query, self.k)[: self.k]):
            if not hit.text.strip():
                continue
            metadata = {**hit.metadata, "source": hit.source}
            chunk = self.engine.register_chunk(hit.text, ChunkType.RAG_RESULT, metadata)
            if chunk.id in seen:
                continue
            seen.add(chunk.id)
            # the registry keeps a chunk's first metadata; this copy carries this query's score
            chunks.append(replace(chunk, metadata={**metadata, "score": hit.score, "rank": rank}))
        if self.canonical_order:
            chunks.sort(key=lambda c: c.id)
        return chunks

    async def aretrieve(self, query: str) -> list[Chunk]:
        """`retrieve` in a worker thread (embedding and search are blocking calls)."""
        return await asyncio.to_thread(self.retrieve, query)

    def compose(self, query: str, system: str | Chunk | None = None) -> Composition:
        """A `Composition` of [system | retrieved chunks | query] for `engine.generate`."""
        return Composition(query=query, chunks=self.retrieve(query), system=system)

    def __repr__(self) -> str:
        return (
            f"Retriever(source={type(self.source).__name__}, k={self.k}, "
            f"canonical_order={self.canonical_order})"
        )


def _search_function(source: Any) -> Callable[[str, int], list[Hit]]:
    """A `(query, k) -> [Hit]` function over whichever kind of source this is."""
    if isinstance(source, DocumentIndex):
        return lambda query, k: [
            Hit(p.text, p.source, score, p.metadata) for p, score in source.search(query, k)
        ]
    if callable(getattr(source, "similarity_search_with_score", None)):  # LangChain store
        return lambda query, k: [
            _langchain_hit(doc, score)
            for doc, score in source.similarity_search_with_score(query, k=k)
        ]
    if callable(getattr(source, "retrieve", None)):  # LlamaIndex retriever
        return lambda query, k: [_llama_index_hit(n) for n in source.retrieve(query)]
    if callable(getattr(source, "invoke", None)):  # LangChain retriever
        return lambda query, k: [_langchain_hit(doc, None) for doc in source.invoke(query)]
    raise TypeError(
        f"cannot retrieve from a {type(source).__name__}; pass a DocumentIndex, a LangChain "
        "VectorStore (similarity_search_with_score) or retriever (invoke), or a LlamaIndex "
        "retriever (retrieve)"
    )


def _langchain_hit(doc: Any, score: float | None) -> Hit:
    metadata = dict(getattr(doc, "metadata", None) or {})
    if score is None and isinstance(metadata.get("score"), (int, float)):
        score = metadata["score"]
    source = metadata.get("source") or metadata.get("file_path") or getattr(doc, "id", None)
    return Hit(doc.page_content, str(source or ""), _float(score), metadata)


def _llama_index_hit(node_with_score: Any) -> Hit:
    node = node_with_score.node
    metadata = dict(getattr(node, "metadata", None) or {})
    source = (
        metadata.get("source")
        or metadata.get("file_path")
        or metadata.get("file_name")
        or getattr(node, "node_id", None)
    )
    return Hit(node.get_content(), str(source or ""), _float(node_with_score.score), metadata)


def _float(score: Any) -> float | None:
    return None if score is None else float(score)
