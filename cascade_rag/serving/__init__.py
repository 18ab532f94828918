"""An OpenAI-compatible HTTP server over `CascadeEngine` (`cascade-rag serve`).

    app.py             routes, API key and body-size guard, bounded queue, OpenAI errors
    generation.py      /v1/chat/completions and /v1/completions (JSON or server-sent events)
    request_fields.py  OpenAI request fields -> SamplingParams and engine prompts
    chunk_store.py     /v1/chunks: register, list, get, delete, pin, unpin, precompute
    metrics.py         /metrics in Prometheus' text format
    protocol.py        request models, the error format, response shapes
    config.py          ServerConfig
    server.py          uvicorn, SIGTERM drain, BackgroundServer

A client of the public engine, like the LangChain and LlamaIndex integrations: it adds no
engine internals. Needs the `server` extra (starlette, uvicorn, sse-starlette, pydantic,
prometheus-client).
"""

from cascade_rag.serving.app import create_app
from cascade_rag.serving.config import API_KEY_ENV, ServerConfig
from cascade_rag.serving.server import BackgroundServer, run_server

__all__ = ["API_KEY_ENV", "BackgroundServer", "ServerConfig", "create_app", "run_server"]
