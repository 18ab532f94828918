"""Chunks over HTTP: register, list, get, delete, pin, unpin and precompute.

`ChunkStore` keeps the chunks clients registered with `POST /v1/chunks`. Each holds a
reference in the engine's chunk registry, so its id stays valid (the registry never forgets a
referenced chunk) until `DELETE /v1/chunks/{id}`, which also drops its KV. Chat requests name
these chunks in `chunk_ids`.

Pins are the engine's (`CascadeEngine.pin`): the KV cache is an exact-prefix tree, so what is
pinned is a chain as a chat request composes it, [system prompt, *prefix, chunk]; the body of
`POST /v1/chunks/{id}/pin` gives the system prompt text and the prefix chunk ids (both optional;
no system prompt means the chat template's default, as a request without a system message).

`ChunkRoutes` are the endpoints. Engine calls that wait for the worker (pins, precompute,
reading the KV cache) run in a thread so the event loop keeps serving. This module does not
generate text (generation.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from cascade_rag.chunks import Chunk, ChunkType, UnknownChunkError
from cascade_rag.composition import ChunkId
from cascade_rag.engine.kv_cache import ChunkInUseError, ChunkNodeInfo, OutOfPagesError
from cascade_rag.llm import ChainInfo, EngineClosedError
from cascade_rag.serving import protocol as p
from cascade_rag.serving.protocol import APIError

_TYPES = ", ".join(t.value for t in ChunkType)


class ChunkStore:
    """The chunks registered over HTTP, each held in the engine's registry until deleted.

    Args:
        engine: the `CascadeEngine`.
        max_chunks: most chunks held at once (400 beyond it).

    Thread-safe: registration runs in worker threads.
    """

    def __init__(self, engine, max_chunks: int) -> None:
        self.engine = engine
        self.max_chunks = max_chunks
        self._held: dict[str, Chunk] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def register(self, req: p.ChunkCreateRequest) -> Chunk:
        """Register a text or token-id chunk and hold it; the same content gives the same id."""
        if (req.text is None) == (req.token_ids is None):
            raise APIError(400, "send exactly one of text and token_ids", param="text")
        try:
            chunk_type = ChunkType(req.type)
        except ValueError:
            raise APIError(
                400, f"type {req.type!r} is not a chunk type; use one of: {_TYPES}", param="type"
            ) from None
        with self._lock:
            if len(self._held) >= self.max_chunks:
                raise APIError(
                    400,
                    f"{len(self._held)} chunks are registered, the most this server keeps "
                    "(cascade-rag serve --max-chunks); delete some first",
                    param="text" if req.text is not None else "token_ids",
                    code="too_many_chunks",
                )
        registry = self.engine.registry
        if req.text is not None:
            try:
                chunk = self.engine.register_chunk(req.text, chunk_type, req.metadata)
            except (TypeError, ValueError) as exc:
                raise APIError(400, f"text: {exc}", param="text") from None
            again = lambda: self.engine.register_chunk(req.text, chunk_type, req.metadata)  # noqa: E731
            held = _acquire(registry, chunk, again)
        else:
            ids = req.token_ids
            vocab = self.engine.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if not ids or bad is not None:
                raise APIError(
                    400,
                    "token_ids must be a non-empty list of ids in the model's vocabulary "
                    f"[0, {vocab})" + ("" if bad is None else f"; got {bad}"),
                    param="token_ids",
                )
            held = registry.register(ids, chunk_type, metadata=req.metadata, acquire=True)
        with self._lock:
            if held.id in self._held:
                registry.release(held.id)  # held once, however often it is registered
            else:
                self._held[held.id] = held
        return held

    def get(self, chunk_id: str, param: str | None = None) -> Chunk:
        """The held chunk; 404 (or 400 naming `param` when it comes from a request body)."""
        chunk = self._held.get(chunk_id)
        if chunk is None:
            message = (
                f"{param + ': ' if param else ''}no chunk {chunk_id!r} is registered on this "
                "server; register it with POST /v1/chunks (deleted chunks are gone)"
            )
            raise APIError(400 if param else 404, message, param=param, code="chunk_not_found")
        return chunk

    def all(self) -> list[Chunk]:
        with self._lock:
            return list(self._held.values())

    def delete(self, chunk_id: str) -> int:
        """Drop the chunk's KV and stop holding it; returns the KV pages freed."""
        self.get(chunk_id)
        try:
            freed = self.engine.delete_chunk(chunk_id)
        except ChunkInUseError as exc:
            raise APIError(409, str(exc), code="chunk_in_use") from None
        with self._lock:
            if self._held.pop(chunk_id, None) is not None:
                self.engine.registry.release(chunk_id)
        return freed


def _acquire(registry, chunk: Chunk, register_again: Callable[[], Chunk]) -> Chunk:
    """Hold a just-registered chunk (registered again if it was evicted in between)."""
    for _ in range(3):
        try:
            return registry.acquire(chunk.id)
        except UnknownChunkError:
            chunk = register_again()
    raise APIError(503, "the chunk registry keeps evicting this chunk; retry later")


class ChunkRoutes:
    """The `/v1/chunks` endpoints.

    Args:
        state: the app's `ServerState`.
    """

    def __init__(self, state) -> None:
        self.state = state
        self.engine = state.engine
        self.store: ChunkStore = state.chunks

    async def create(self, request: Request) -> JSONResponse:
        req = p.parse_request(p.ChunkCreateRequest, await request.body())
        chunk = await _call(self.store.register, req)
        return JSONResponse(self._chunk_json(chunk, await _call(self.engine.cached_chunks)))

    async def list(self, request: Request) -> JSONResponse:
        nodes = await _call(self.engine.cached_chunks)
        data = [self._chunk_json(c, nodes) for c in self.store.all()]
        return JSONResponse({"object": "list", "data": data})

    async def get(self, request: Request) -> JSONResponse:
        chunk = self.store.get(request.path_params["chunk_id"])
        return JSONResponse(self._chunk_json(chunk, await _call(self.engine.cached_chunks)))

    async def delete(self, request: Request) -> JSONResponse:
        chunk_id = request.path_params["chunk_id"]
        freed = await _call(self.store.delete, chunk_id)
        return JSONResponse(
            {"id": chunk_id, "object": "chunk.deleted", "deleted": True, "freed_pages": freed}
        )

    async def pin(self, request: Request) -> JSONResponse:
        return await self._chain_call(request, self.engine.pin)

    async def unpin(self, request: Request) -> JSONResponse:
        return await self._chain_call(request, self.engine.unpin)

    async def precompute(self, request: Request) -> JSONResponse:
        return await self._chain_call(request, self.engine.precompute)

    async def pins(self, request: Request) -> JSONResponse:
        held = await _call(self.engine.pinned_chains)
        data = [{"object": "chunk.chain", "chunk_ids": list(k), "pins": n} for k, n in held.items()]
        return JSONResponse({"object": "list", "data": data})

    async def _chain_call(self, request: Request, method) -> JSONResponse:
        chunk = self.store.get(request.path_params["chunk_id"])
        body = await request.body()
        req = p.parse_request(p.ChainRequest, body) if body.strip() else p.ChainRequest()
        prefix = [self.store.get(cid, param="prefix") for cid in req.prefix]
        chain = [ChunkId(c.id) for c in (*prefix, chunk)]
        try:
            info: ChainInfo = await _call(method, chain, req.system)
        except ValueError as exc:
            raise APIError(400, str(exc), param="system" if req.system else None) from None
        except OutOfPagesError as exc:
            raise APIError(503, str(exc), code="out_of_kv_pages") from None
        return JSONResponse(
            {
                "object": "chunk.chain",
                "chunk_ids": list(info.chunk_ids),
                "num_tokens": info.num_tokens,
                "computed_tokens": info.computed_tokens,
                "pins": info.pins,
            }
        )

    @staticmethod
    def _chunk_json(chunk: Chunk, nodes: list[ChunkNodeInfo]) -> dict:
        return {
            "id": chunk.id,
            "object": "chunk",
            "type": chunk.type.value,
            "num_tokens": len(chunk),
            "text": chunk.text,
            "metadata": dict(chunk.metadata),
            "kv": [
                {
                    "chain": list(n.chain[:-1]),
                    "start": n.start,
                    "num_tokens": n.num_tokens,
                    "pins": n.pins,
                    "in_use": n.users,
                }
                for n in nodes
                if n.chunk_id == chunk.id and n.ready
            ],
        }


async def _call(fn, *args):
    """`fn(*args)` in a thread; engine errors become HTTP errors."""
    try:
        return await asyncio.to_thread(fn, *args)
    except EngineClosedError as exc:
        raise APIError(503, f"the engine is closed: {exc}") from None
    except UnknownChunkError as exc:
        raise APIError(404, str(exc), code="chunk_not_found") from None
