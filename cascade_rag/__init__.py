"""cascade-rag: RAG with chunk-cached KV and multi-level cascade attention."""
