"""LlamaIndex integration for cascade-rag: the `CascadeRAG` LLM and the `CascadeEmbedding`
embedding model (which registers embedded documents with the LLM's engine)."""

from llama_index.llms.cascade_rag.base import SAMPLING_KWARGS, CascadeRAG
from llama_index.llms.cascade_rag.embeddings import CascadeEmbedding

__all__ = ["SAMPLING_KWARGS", "CascadeEmbedding", "CascadeRAG"]
