"""Retrieval: documents -> passages -> embeddings -> FAISS index -> engine chunks.

load_documents / split_documents   (ingest.py)
Embedder                           (embedder.py)
DocumentIndex                      (index.py)
Retriever                          (retriever.py)
"""

from cascade_rag.retrieval.embedder import Embedder
from cascade_rag.retrieval.index import DocumentIndex
from cascade_rag.retrieval.ingest import Document, Passage, load_documents, split_documents
from cascade_rag.retrieval.retriever import Retriever

__all__ = [
    "Document",
    "DocumentIndex",
    "Embedder",
    "Passage",
    "Retriever",
    "load_documents",
    "split_documents",
]
