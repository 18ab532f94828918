"""LlamaIndex retriever integration for cascade-rag: `CascadeRAGRetriever`."""

from llama_index.retrievers.cascade_rag.base import CascadeRAGRetriever, chunk_to_node

__all__ = ["CascadeRAGRetriever", "chunk_to_node"]
