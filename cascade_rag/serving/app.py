"""The ASGI app: routes, the API-key and body-size guard, the bounded queue, errors.

    GET  /health                       200 {"status": "ok"}; 503 while draining or closed
    GET  /metrics                      Prometheus text format (metrics.py)
    GET  /v1/models, /v1/models/{id}   the one served model
    POST /v1/chat/completions          OpenAI chat completions (streaming or not)
    POST /v1/completions               OpenAI completions (streaming or not)
    POST /v1/chunks                    register a chunk (text or token ids)
    GET  /v1/chunks, /v1/chunks/{id}   registered chunks and where their KV is cached
    DELETE /v1/chunks/{id}             forget a chunk and drop its KV
    POST /v1/chunks/{id}/pin|unpin|precompute
    GET  /v1/pins                      pinned chains

Every error is answered in OpenAI's format. The app is a client of the public engine: it
creates and closes no engine unless asked (`create_app(..., owns_engine=True)`), and it does
not bind sockets or handle signals (server.py does).
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cascade_rag.serving.chunk_store import ChunkRoutes, ChunkStore
from cascade_rag.serving.config import ServerConfig
from cascade_rag.serving.generation import GenerationRoutes
from cascade_rag.serving.metrics import ServerMetrics
from cascade_rag.serving.protocol import APIError

logger = logging.getLogger(__name__)


class AdmissionGate:
    """The bounded queue: at most `capacity` prompts running or waiting in the engine.

    Used from the event loop thread only. Over capacity a request gets 429 (retry later);
    while the server drains it gets 503.

    Args:
        capacity: the engine's `max_num_seqs` plus the queue bound.
        on_reject: called with the endpoint of each refused request (metrics).
    """

    def __init__(self, capacity: int, on_reject) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.draining = False
        self._on_reject = on_reject

    def enter(self, n: int, endpoint: str) -> None:
        if self.draining:
            self._on_reject(endpoint)
            raise APIError(503, "the server is shutting down; send the request elsewhere")
        if self.in_flight + n > self.capacity:
            self._on_reject(endpoint)
            raise APIError(
                429,
                f"the server is busy: {self.in_flight} requests are running or queued, the "
                f"most it accepts is {self.capacity}; retry later",
                code="queue_full",
            )
        self.in_flight += n

    def leave(self, n: int) -> None:
        assert self.in_flight >= n, "every request leaves the gate once"
        self.in_flight -= n


@dataclass
class ServerState:
    """What the routes share: the engine, the config and the server's own state."""

    engine: object
    config: ServerConfig
    metrics: ServerMetrics = field(init=False)
    chunks: ChunkStore = field(init=False)
    gate: AdmissionGate = field(init=False)
    model_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine)
        self.chunks = ChunkStore(self.engine, self.config.max_chunks)
        capacity = self.engine.config.max_num_seqs + self.config.max_queued_requests
        self.gate = AdmissionGate(
            capacity, lambda endpoint: self.metrics.requests.labels(endpoint, "rejected").inc()
        )
        self.model_name = self.config.served_model_name or default_model_name(self.engine)

    def check_model(self, model: str | None) -> str:
        """The served name for a request's `model` (None: the served model); 404 if unknown."""
        if model is None or model in (self.model_name, self.engine.model_name):
            return self.model_name
        raise APIError(
            404,
            f"the model {model!r} does not exist on this server; it serves {self.model_name!r}",
            param="model",
            code="model_not_found",
        )


def default_model_name(engine) -> str:
    """The model's name without its content digest ("SmolLM2-135M-Instruct.Q4_1")."""
    return engine.model_name.split("@", 1)[0]


def create_app(engine, config: ServerConfig | None = None, owns_engine: bool = False) -> Starlette:
    """The OpenAI-compatible ASGI app over `engine`.

    Args:
        engine: a `CascadeEngine`.
        config: server options (default `ServerConfig()`).
        owns_engine: close the engine when the app shuts down.

    Example:
        >>> import uvicorn
        >>> app = create_app(CascadeEngine(), ServerConfig(api_key="secret"))
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    config = config or ServerConfig()
    state = ServerState(engine, config)
    gen = GenerationRoutes(state)
    chunks = ChunkRoutes(state)

    async def health(request: Request) -> JSONResponse:
        if engine.closed:
            return JSONResponse({"status": "closed"}, status_code=503)
        if state.gate.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def metrics(request: Request) -> Response:  # sync: runs in a thread (reads the worker)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "cascade-rag",
            "root": engine.model_name,
            "max_model_len": engine.max_model_len,
        }

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> JSONResponse:
        state.check_model(request.path_params["model"])
        return JSONResponse(model_card())

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            if owns_engine:
                engine.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", gen.chat, methods=["POST"]),
        Route("/v1/completions", gen.completions, methods=["POST"]),
        Route("/v1/chunks", chunks.create, methods=["POST"]),
        Route("/v1/chunks", chunks.list, methods=["GET"]),
        Route("/v1/pins", chunks.pins, methods=["GET"]),
        Route("/v1/chunks/{chunk_id}", chunks.get, methods=["GET"]),
        Route("/v1/chunks/{chunk_id}", chunks.delete, methods=["DELETE"]),
        Route("/v1/chunks/{chunk_id}/pin", chunks.pin, methods=["POST"]),
        Route("/v1/chunks/{chunk_id}/unpin", chunks.unpin, methods=["POST"]),
        Route("/v1/chunks/{chunk_id}/precompute", chunks.precompute, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, config=config)],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.server = state
    return app


class _Guard:
    """ASGI middleware: the API key (everything but /health) and the body-size limit.

    A body over `max_request_bytes` is refused from its Content-Length (413) before it is
    read; a chunked body is counted as it arrives.
    """

    def __init__(self, app, config: ServerConfig) -> None:
        self.app = app
        self.limit = config.max_request_bytes
        key = config.api_key
        self._expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self._expected is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await _send_error(
                    scope,
                    receive,
                    send,
                    APIError(
                        401,
                        "missing or wrong API key: send the header 'Authorization: Bearer "
                        "<key>' with the server's key",
                        code="invalid_api_key",
                    ),
                )
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(scope, receive, send, _too_large(self.limit))
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _too_large(self.limit)
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(cascade-rag serve --max-request-bytes)",
        code="request_too_large",
    )


async def _send_error(scope, receive, send, error: APIError) -> None:
    response = JSONResponse(error.body(), status_code=error.status)
    await response(scope, receive, send)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    return JSONResponse(error.body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
    return JSONResponse(error.body(), status_code=500)
