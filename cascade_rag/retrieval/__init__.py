"""Retrieval: documents -> passages -> embeddings -> FAISS index -> engine chunks.

scan_folder / SkippedFile / SkipKind          (files.py: which files are read, and why not)
load_documents / split_documents / IngestReport (ingest.py)
html_text                                     (html_text.py)
Embedder                                      (embedder.py)
DocumentIndex                                 (index.py)
DamagedIndexError                             (store.py: the checked on-disk format)
Retriever                                     (retriever.py)
"""

from cascade_rag.retrieval.embedder import Embedder
from cascade_rag.retrieval.files import FollowedSymlink, SkipKind, SkippedFile, scan_folder
from cascade_rag.retrieval.index import DocumentIndex
from cascade_rag.retrieval.ingest import (
    Document,
    IngestReport,
    LoadedDocuments,
    Passage,
    load_documents,
    split_documents,
)
from cascade_rag.retrieval.retriever import Retriever
from cascade_rag.retrieval.store import DamagedIndexError

__all__ = [
    "DamagedIndexError",
    "Document",
    "DocumentIndex",
    "Embedder",
    "FollowedSymlink",
    "IngestReport",
    "LoadedDocuments",
    "Passage",
    "Retriever",
    "SkipKind",
    "SkippedFile",
    "load_documents",
    "scan_folder",
    "split_documents",
]
