"""LangChain integration for cascade-rag: a chat model, a completion model, a retriever and
embeddings running on a local `cascade_rag.llm.CascadeEngine` with chunk-cached KV.

    ChatCascadeRAG       (chat_models.py)  BaseChatModel
    CascadeRAGLLM        (llms.py)         BaseLLM
    CascadeRAGRetriever  (retrievers.py)   BaseRetriever
    CascadeEmbeddings    (embeddings.py)   Embeddings
"""

from importlib import metadata

from langchain_cascade_rag.chat_models import ChatCascadeRAG
from langchain_cascade_rag.embeddings import CascadeEmbeddings
from langchain_cascade_rag.llms import CascadeRAGLLM
from langchain_cascade_rag.retrievers import CascadeRAGRetriever

try:
    __version__ = metadata.version(__package__)
except metadata.PackageNotFoundError:
    __version__ = ""  # imported from a source tree without installing
del metadata

__all__ = [
    "CascadeEmbeddings",
    "CascadeRAGLLM",
    "CascadeRAGRetriever",
    "ChatCascadeRAG",
    "__version__",
]
