"""LlamaIndex LLM integration for cascade-rag: `CascadeRAG`."""

from llama_index.llms.cascade_rag.base import SAMPLING_KWARGS, CascadeRAG

__all__ = ["CascadeRAG", "SAMPLING_KWARGS"]
