"""LlamaIndex retriever over cascade-rag's retrieval layer.

`CascadeRAGRetriever` runs a cascade-rag `Retriever` (which registers each retrieved passage as
an engine chunk, so its KV can be reused by every prompt that repeats it) and returns the chunks
as LlamaIndex nodes: `NodeWithScore(TextNode(text, id_=chunk id, metadata), score)`.

It does not embed, index or split documents itself (cascade_rag.retrieval does), and it does not
generate (see `llama-index-llms-cascade-rag`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from cascade_rag.arguments import unknown_arguments_error
from cascade_rag.chunks import Chunk

_FACTORY_HINTS = {
    name: "an argument of CascadeRAGRetriever.from_index / from_folder, or of the "
    "cascade_rag.retrieval.Retriever passed in"
    for name in ("k", "canonical_order", "index", "engine")
}


class ChunkRetriever(Protocol):
    """What `CascadeRAGRetriever` calls (`cascade_rag.retrieval.Retriever` has it).

    An `async aretrieve(query)` is used by `aretrieve` when the retriever has one.
    """

    def retrieve(self, query: str) -> list[Chunk]: ...


class CascadeRAGRetriever(BaseRetriever):
    """cascade-rag retrieval as a LlamaIndex retriever.

    Args:
        retriever: a `cascade_rag.retrieval.Retriever` (anything with
            `retrieve(query) -> list[Chunk]` whose chunks carry "source" and "score" metadata).
        callback_manager: LlamaIndex callbacks.
        verbose: print retrieval steps.

    Any other constructor argument raises `TypeError` naming it.

    Each node's id is the chunk id and its metadata is the chunk's metadata with "source" and
    "chunk_id"; the score moves to `NodeWithScore.score`. The metadata is hidden from the LLM
    and embedders (`excluded_*_metadata_keys`): the text that reaches a prompt is the passage
    alone, the same whenever the same chunk comes back, so the engine serves it from its KV
    cache. Nodes keep the retriever's order (canonical order by default, so the same set of
    passages makes the same context).

    Example:
        >>> engine = CascadeEngine(kv_cache_tokens=8192)
        >>> retriever = CascadeRAGRetriever.from_folder("docs/", engine, k=3)
        >>> for hit in retriever.retrieve("What is the capital of Zorbia?"):
        ...     print(hit.score, hit.node.metadata["source"], hit.node.id_)
    """

    def __init__(
        self,
        retriever: ChunkRetriever,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_arguments_error(
                "CascadeRAGRetriever",
                unknown,
                ["retriever", "callback_manager", "verbose"],
                "searches its cascade-rag index",
                "Build it with CascadeRAGRetriever.from_index(index, engine) or from_folder(...); "
                "to search a remote vector store, use that store's LlamaIndex retriever.",
                _FACTORY_HINTS,
            )
        if not callable(getattr(retriever, "retrieve", None)):
            raise TypeError(
                "retriever must have retrieve(query) -> list[Chunk], got "
                f"{type(retriever).__name__}; build one with CascadeRAGRetriever.from_index or "
                "from_folder"
            )
        self._retriever = retriever
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @classmethod
    def from_index(
        cls, index: Any, engine: Any, k: int = 4, canonical_order: bool = True, **kwargs: Any
    ) -> CascadeRAGRetriever:
        """Retrieve the top `k` passages of a `cascade_rag.retrieval.DocumentIndex`.

        Passages are registered as chunks of `engine`: use the same engine for generation.
        """
        from cascade_rag.retrieval import Retriever

        return cls(Retriever(engine, index, k=k, canonical_order=canonical_order), **kwargs)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        engine: Any,
        k: int = 4,
        canonical_order: bool = True,
        index_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> CascadeRAGRetriever:
        """Index the documents in `folder` and retrieve from them.

        `index_kwargs` go to `DocumentIndex.from_folder` (e.g. `chunk_size`, `embedder`,
        `show_progress`).
        """
        from cascade_rag.retrieval import DocumentIndex

        index = DocumentIndex.from_folder(folder, engine, **(index_kwargs or {}))
        return cls.from_index(index, engine, k=k, canonical_order=canonical_order, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [chunk_to_node(chunk) for chunk in self._retriever.retrieve(query_bundle.query_str)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        aretrieve = getattr(self._retriever, "aretrieve", None)
        if aretrieve is None:  # a retriever without an async path blocks, as LlamaIndex's do
            return self._retrieve(query_bundle)
        return [chunk_to_node(chunk) for chunk in await aretrieve(query_bundle.query_str)]


def chunk_to_node(chunk: Chunk) -> NodeWithScore:
    """A retrieved chunk as `NodeWithScore(TextNode(...), score)`."""
    if chunk.text is None:
        raise ValueError(f"chunk {chunk.id} has no text; retrieved chunks must keep their text")
    metadata = dict(chunk.metadata)
    score = metadata.pop("score", None)
    metadata.setdefault("source", None)
    metadata["chunk_id"] = chunk.id
    hidden = list(metadata)  # the prompt gets the passage text alone, as registered
    node = TextNode(
        id_=chunk.id,
        text=chunk.text,
        metadata=metadata,
        excluded_llm_metadata_keys=hidden,
        excluded_embed_metadata_keys=hidden,
    )
    return NodeWithScore(node=node, score=None if score is None else float(score))
