"""`CascadeRAGRetriever`: cascade-rag retrieval as a LangChain retriever.

Wraps `cascade_rag.retrieval.Retriever`: every retrieved passage is registered with the
engine as a chunk, and the returned `Document`s carry its `chunk_id`, so handing them to
`ChatCascadeRAG(..., chunks=docs)` reuses those exact chunks. Passages come in canonical
(chunk id) order by default, so questions that retrieve the same passages build the same
prompt prefix and share its KV even when they are stuffed into a prompt template as text.

It does not index documents (see `cascade_rag.retrieval.DocumentIndex`).
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_cascade_rag._arguments import reject_unknown

SERVER_HINT = (
    "Pass index= (e.g. a cascade_rag.retrieval.DocumentIndex) or retriever= (a "
    "cascade_rag.retrieval.Retriever); to search a remote vector store, use that store's "
    "LangChain retriever."
)


class CascadeRAGRetriever(BaseRetriever):
    """Retrieve passages from a cascade-rag index as LangChain `Document`s.

    Args:
        index: a `cascade_rag.retrieval.DocumentIndex` (or any source
            `cascade_rag.retrieval.Retriever` accepts: a LangChain vector store or retriever,
            a LlamaIndex retriever).
        engine: the `CascadeEngine` chunks are registered with; defaults to `index.engine`.
        retriever: instead of `index`/`engine`, an existing `cascade_rag.retrieval.Retriever`
            (its `k` and `canonical_order` apply unless given here).
        k: passages per query; `invoke(query, k=2)` overrides it for one call.
        canonical_order: order passages by chunk id (shared prefixes across questions, see
            `cascade_rag.retrieval.retriever`); False keeps best-first order.

    Each `Document` has `page_content` = the passage text, `id` = its chunk id, and metadata
    "source", "score" (similarity; None if the index gives none), "rank" (0 = best),
    "chunk_id", plus the passage's own metadata.

    Example:
        ```python
        from cascade_rag.retrieval import DocumentIndex
        from langchain_cascade_rag import CascadeRAGRetriever

        index = DocumentIndex.from_folder("handbook/", engine)
        retriever = CascadeRAGRetriever(index=index, k=3)
        docs = retriever.invoke("When does the library open?")
        docs = await retriever.ainvoke("When does the library open?", k=1)
        ```
    """

    model_config = ConfigDict(extra="forbid")

    index: Any = Field(default=None, exclude=True)
    engine: Any = Field(default=None, exclude=True)
    retriever: Any = Field(default=None, exclude=True)
    k: int = 4
    canonical_order: bool = True

    _retriever: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        reject_unknown(cls, values, "searches its index", SERVER_HINT)
        return values

    @model_validator(mode="after")
    def _build_retriever(self) -> CascadeRAGRetriever:
        from cascade_rag.retrieval import Retriever

        if self.retriever is not None:
            if not isinstance(self.retriever, Retriever):
                raise TypeError(
                    "retriever must be a cascade_rag.retrieval.Retriever, got "
                    f"{type(self.retriever).__name__}"
                )
            if self.index is not None or self.engine is not None:
                raise ValueError("pass either retriever= or index= (and engine=), not both")
            self.index, self.engine = self.retriever.source, self.retriever.engine
            if "k" not in self.model_fields_set:
                self.k = self.retriever.k
            if "canonical_order" not in self.model_fields_set:
                self.canonical_order = self.retriever.canonical_order
        if self.index is None:
            raise ValueError("pass index= (e.g. a DocumentIndex) or retriever=")
        if self.engine is None:
            self.engine = getattr(self.index, "engine", None)
            if self.engine is None:
                raise ValueError(
                    f"a {type(self.index).__name__} has no engine; pass engine= as well"
                )
        self._retriever = self._make(self.k)
        return self

    def _make(self, k: int):
        from cascade_rag.retrieval import Retriever

        return Retriever(self.engine, self.index, k=k, canonical_order=self.canonical_order)

    def _for_call(self, k: int | None):
        return self._retriever if k is None or k == self.k else self._make(k)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return [_document(c) for c in self._for_call(k).retrieve(query)]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
    ) -> list[Document]:
        return [_document(c) for c in await self._for_call(k).aretrieve(query)]


def _document(chunk) -> Document:
    return Document(
        page_content=chunk.text,
        metadata={**chunk.metadata, "chunk_id": chunk.id},
        id=chunk.id,
    )
