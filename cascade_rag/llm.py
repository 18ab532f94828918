"""The public engine: thread-safe and asyncio front end over the engine core.

`CascadeEngine` validates and tokenizes requests in the caller's thread, then hands them to
one worker thread that drives the engine core step by step. Requests from any number of
threads and asyncio tasks join the same running batch (continuous batching), so concurrent
callers are served together. Streaming delivers text as it is generated.

It does not retrieve documents (cascade_rag.retrieval) or speak LangChain / LlamaIndex
(integrations/).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, fields, replace

from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType
from cascade_rag.composition import Composition, PromptComposer
from cascade_rag.config import EngineConfig
from cascade_rag.engine.kv_cache import ChunkNodeInfo, OutOfPagesError
from cascade_rag.engine.kv_store import KVStoreStats
from cascade_rag.engine.llm_engine import LLMEngine, SeqUpdate
from cascade_rag.engine.sequence import PreparedPrompt, SequenceStatus
from cascade_rag.outputs import EngineStats, GenerationOutput, StreamDelta
from cascade_rag.sampling import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Mapping[str, str]] | Composition | PreparedPrompt


class EngineClosedError(RuntimeError):
    """The engine was closed (or dropped); create a new one."""


_POLL_S = 0.25  # how often a waiting caller checks that the worker is still alive
_PIN_ATTEMPTS = 3  # compute-then-pin rounds before giving up (eviction between the two)


@dataclass(frozen=True)
class ChainInfo:
    """A chain of chunks as a request composes it, after `pin`, `unpin` or `precompute`.

    Attributes:
        chunk_ids: the chain, the system prompt chunk first, then the chunks in order.
        num_tokens: tokens over the chain.
        computed_tokens: chain tokens whose KV this call computed (0 when all were cached).
        pins: how many times this exact chain is pinned now.
    """

    chunk_ids: tuple[str, ...]
    num_tokens: int
    computed_tokens: int
    pins: int


class _Request:
    """A submitted request: the worker pushes `SeqUpdate`s (or an exception) to `deliver`."""

    def __init__(
        self,
        prepared: PreparedPrompt,
        params: SamplingParams,
        max_tokens: int,
        deliver: Callable[[SeqUpdate | BaseException], None],
        stream_text: bool,
    ) -> None:
        self.prepared = prepared
        self.params = params
        self.max_tokens = max_tokens
        self.deliver = deliver
        self.stream_text = stream_text  # False: text decoded, and delivered, once at the end
        self.seq = None
        self.aborted = False


class _Worker:
    """The worker thread and everything it touches; holds no reference to `CascadeEngine`.

    So an engine that nobody references any more can be collected: its finalizer closes the
    worker, which ends its requests, exits, and lets the model and the KV pool go.
    Locks: `wake` (a condition) guards the inbox, the abort list and `closed` and is only held
    for list operations; `core_lock` is held by the worker for one step at a time. Callers
    never wait for `core_lock` to abort or read statistics.
    """

    def __init__(self, core: LLMEngine, registry: ChunkRegistry) -> None:
        self.core = core
        self.registry = registry
        self.core_lock = threading.Lock()
        self.wake = threading.Condition()
        self.inbox: list[_Request] = []
        self.aborts: list[_Request] = []
        self.closed = False
        self.thread: threading.Thread | None = None
        self.snapshot: EngineStats | None = None
        self.by_seq: dict[int, _Request] = {}
        # (fn, future): fn(core) runs on the worker thread between steps, under core_lock
        self.controls: list[tuple[Callable[[LLMEngine], object], Future]] = []

    # ---- called from any thread --------------------------------------------------------

    def submit(self, requests: list[_Request]) -> None:
        with self.wake:
            if self.closed:
                raise EngineClosedError("the engine is closed")
            self.inbox.extend(requests)
            self._start_locked()
            self.wake.notify_all()

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run `fn(core)` on the worker thread before its next step; returns its future.

        The engine core is only touched by the worker thread, so this is how the front end
        reads or changes the KV cache (pins, removals) without racing a step.
        """
        future: Future = Future()
        with self.wake:
            if self.closed:
                raise EngineClosedError("the engine is closed")
            self.controls.append((fn, future))
            self._start_locked()
            self.wake.notify_all()
        return future

    def _start_locked(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="cascade-rag-engine", daemon=True)
            self.thread.start()

    def abort(self, request: _Request) -> None:
        """Stop a request; returns at once (the worker drops it before its next step)."""
        request.deliver = _ignore  # the caller stopped listening
        with self.wake:
            request.aborted = True
            if request in self.inbox:
                self.inbox.remove(request)
                return
            self.aborts.append(request)
            self.wake.notify_all()

    def stats(self) -> EngineStats:
        """Current counters, or those of the last finished step while a step runs."""
        if self.core_lock.acquire(blocking=False):
            try:
                return self.core.stats(self.registry)
            finally:
                self.core_lock.release()
        snapshot = self.snapshot
        if snapshot is not None:
            return snapshot
        with self.core_lock:  # only before the first step has finished
            return self.core.stats(self.registry)

    def close(self, join: bool = True) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify_all()
        thread = self.thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()

    def alive(self) -> bool:
        thread = self.thread
        return not self.closed or (thread is not None and thread.is_alive())

    # ---- the worker thread -------------------------------------------------------------

    def run(self) -> None:
        try:
            while self._one_step():
                pass
        finally:
            with self.core_lock:
                self._end_all(EngineClosedError("the engine was closed"))
            with self.wake:
                controls, self.controls = self.controls, []
            for _, future in controls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineClosedError("the engine was closed"))

    def _one_step(self) -> bool:
        with self.wake:
            while (
                not self.inbox
                and not self.aborts
                and not self.controls
                and not self.closed
                and not self.core.has_work()
            ):
                self.wake.wait()
            if self.closed:
                return False
            new, self.inbox = self.inbox, []
            aborts, self.aborts = self.aborts, []
            controls, self.controls = self.controls, []
        updates = []
        with self.core_lock:
            for fn, future in controls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.core))
                    except Exception as exc:  # noqa: BLE001 - the caller gets its own error
                        future.set_exception(exc)
            try:
                for req in new:
                    self._admit(req)
                for req in aborts:
                    self._drop(req)
                if self.core.has_work():
                    updates = self.core.step()
            except Exception as exc:  # noqa: BLE001 - a bug in the core: its requests end
                logger.exception("engine step failed; ending its requests")
                self._end_all(exc)
            self.snapshot = self.core.stats(self.registry)
        for update in updates:
            req = self.by_seq.get(update.seq.seq_id)
            if req is None:
                continue
            if update.output is not None or update.error is not None:
                del self.by_seq[update.seq.seq_id]
            elif not req.stream_text:
                continue  # generate / agenerate read only the end: no wake-up per token
            _deliver(req, update.error if update.error is not None else update)
        return True

    def _admit(self, req: _Request) -> None:
        if req.aborted:
            return
        try:
            req.seq = self.core.add_request(
                req.prepared, req.params, req.max_tokens, req.stream_text
            )
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            logger.warning("request could not be admitted: %r", exc)
            _deliver(req, exc)
            return
        self.by_seq[req.seq.seq_id] = req

    def _drop(self, req: _Request) -> None:
        if req.seq is None:
            return
        self.by_seq.pop(req.seq.seq_id, None)
        if req.seq.status is not SequenceStatus.FINISHED:
            self.core.abort(req.seq)

    def _end_all(self, exc: BaseException) -> None:
        """End every request the worker knows with `exc`, releasing their pages."""
        with self.wake:
            pending, self.inbox = self.inbox, []
            self.aborts = []
        requests = list(self.by_seq.values())
        self.by_seq = {}
        for req in requests:
            if req.seq is not None and req.seq.status is not SequenceStatus.FINISHED:
                try:
                    self.core.abort(req.seq)
                except Exception:  # noqa: BLE001 - keep ending the others
                    logger.exception("could not release request %d", req.seq.seq_id)
        for req in requests + pending:
            _deliver(req, exc)


class CascadeEngine:
    """Local LLM engine with chunk-cached KV and cascade attention.

    Args:
        model: model folder / `.safetensors` / `.gguf` path, or a `LoadedModel` to share
            one loaded model between engines; None for the default SmolLM2-135M-Instruct.
            Overrides `config.model` when given.
        config: engine configuration; keyword arguments override its fields.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: a configuration the machine cannot run (no CUDA, float32 with FlashInfer,
            a KV pool larger than free memory), with the fix.

    The engine never wedges: a request that fails (bad options, a failure while admitting,
    computing or sampling it) ends with its own error and the others go on; aborts and
    `stats()` never wait for more than one step; `close()` (or dropping the engine) ends
    running and queued requests with `EngineClosedError` and stops the worker thread.

    Example:
        >>> engine = CascadeEngine(kv_cache_tokens=8192)
        >>> doc = engine.register_chunk("Plum is the capital of Zorbia.")
        >>> out = engine.generate(
        ...     Composition(query="What is the capital of Zorbia?", chunks=[doc]),
        ...     SamplingParams(max_tokens=16))
        >>> out.text, out.usage.cached_tokens
    """

    def __init__(self, model=None, *, config: EngineConfig | None = None, **overrides) -> None:
        from cascade_rag.models.loader import LoadedModel, load_model

        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        config = config or EngineConfig()
        unknown = sorted(set(overrides) - {f.name for f in fields(EngineConfig)})
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {', '.join(unknown)}; the options are the fields "
                "of cascade_rag.config.EngineConfig"
            )
        loaded = model if isinstance(model, LoadedModel) else None
        if model is not None and loaded is None:
            overrides["model"] = model
        if overrides:
            config = replace(config, **overrides)
        config.check_runtime()
        self.config = config
        dtype = config.torch_dtype
        if loaded is not None:
            if loaded.model.dtype != dtype:
                raise ValueError(
                    f"the loaded model is {loaded.model.dtype} but the config asks "
                    f"{config.resolved_dtype}; pass dtype={str(loaded.model.dtype)[6:]!r}"
                )
            self.model = loaded
        else:
            self.model = load_model(
                config.model, dtype=dtype, device=config.device, cache_dir=config.cache_dir
            )
        self.tokenizer = self.model.tokenizer
        self.model_config = self.model.config
        self.vocab_size = self.model_config.vocab_size
        mc_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or mc_len, mc_len)
        # content digest of weights, config and tokenizer: the same model gives the same chunk
        # ids on every machine, whatever its folder is called
        namespace = f"{self.model.digest}|{type(self.tokenizer).__name__}:{len(self.tokenizer)}"
        # chunk objects whose token ids passed the vocabulary check (by identity)
        self._checked_chunks: weakref.WeakValueDictionary[str, Chunk] = (
            weakref.WeakValueDictionary()
        )
        self.registry = ChunkRegistry(
            namespace,
            capacity=config.chunk_registry_capacity,
            capacity_bytes=config.chunk_registry_bytes,
        )
        self.composer = PromptComposer(
            self.tokenizer,
            self.registry,
            auto_chunk_min_tokens=config.auto_chunk_min_tokens,
            use_chunks=config.enable_chunk_cache,
        )
        self._compose_lock = threading.Lock()
        self._worker = _Worker(LLMEngine(config, self.model, self.registry), self.registry)
        # dropping the engine stops its worker (which holds no reference back to it)
        self._finalizer = weakref.finalize(self, _Worker.close, self._worker, False)

    @property
    def _core(self) -> LLMEngine:
        return self._worker.core

    @property
    def model_name(self) -> str:
        """The model's identity (name and a digest of its content)."""
        return self.model.model_id

    # ---- chunks ------------------------------------------------------------------------

    def register_chunk(
        self, text: str, type: ChunkType = ChunkType.RAG_RESULT, metadata: Mapping | None = None
    ) -> Chunk:
        """Register text as a chunk (by the content hash of its token ids) and return it.

        A SYSTEM_PROMPT chunk is wrapped in the chat template's system turn. Registering the
        same text again returns the same chunk. The text is tokenized as plain text: strings
        that look like the model's control tokens stay text.
        """
        with self._compose_lock:
            return self.composer.register_text(text, type, metadata)

    def get_chunk(self, chunk_id: str) -> Chunk:
        """The registered chunk with this id; raises `UnknownChunkError` if there is none."""
        return self.registry.get(chunk_id)

    def register_token_chunk(
        self, token_ids: Sequence[int], type: ChunkType = ChunkType.RAG_RESULT
    ) -> Chunk:
        """Register already tokenized text as a chunk (no separator is added)."""
        ids = list(token_ids)
        self._check_token_ids(ids, "token_ids")
        chunk = self.registry.register(ids, type=type)
        self._checked_chunks[chunk.id] = chunk
        return chunk

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        """Tokenize and chunk a prompt without running it (see `Composition`).

        Its chunks are registered. A `PreparedPrompt` (chunks + private token ids) is
        checked and its chunks adopted by this engine's registry, so callers that tokenize
        themselves can pass one to `generate`.
        """
        prepared = self._prepare(prompt)
        with self._compose_lock:
            return self.composer.commit(prepared)

    def _prepare(self, prompt: Prompt) -> PreparedPrompt:
        """Tokenize and chunk without registering anything (see `prepare`)."""
        if isinstance(prompt, PreparedPrompt):
            self._check_prompt_ids(prompt)
        with self._compose_lock:
            prepared = self.composer.prepare(prompt, register=False)
        self._check_prompt_ids(prepared)
        return prepared

    def _check_prompt_ids(self, prepared: PreparedPrompt) -> None:
        """`_check_token_ids` over a prompt, skipping chunk objects already checked (chunks
        are immutable): a request that reuses registered chunks costs its private tokens,
        not a Python pass over every chunk token."""
        for chunk in prepared.chunks:
            if self._checked_chunks.get(chunk.id) is not chunk:
                self._check_token_ids(chunk.token_ids, "prompt")
                self._checked_chunks[chunk.id] = chunk
        self._check_token_ids(prepared.tail_ids, "prompt")

    def _check_token_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            raise TypeError(f"{what} token ids must be ints, got {bad[0]!r}")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            t = next(t for t in ids if t < 0 or t >= self.vocab_size)
            raise ValueError(
                f"{what} has token id {t}, outside the model's vocabulary [0, {self.vocab_size})"
            )

    # ---- generation --------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Generate for one prompt or a batch (all submitted together, served as one batch).

        Args:
            prompts: a prompt (str, chat messages, `Composition`) or a list of them.
            sampling: sampling parameters for every prompt, or a list with one per prompt
                (default greedy, 256 tokens).
        Returns:
            one `GenerationOutput` for one prompt, a list for a list.
        Raises:
            ValueError / TypeError: a bad prompt or parameter (nothing is submitted then).
            Whatever a request failed with while running (only that request's error).
            EngineClosedError: the engine was closed meanwhile.
            KeyboardInterrupt: the requests are aborted first.
        """
        single = not _is_batch(prompts)
        batch = [prompts] if single else list(prompts)
        if isinstance(sampling, Sequence):
            if len(sampling) != len(batch):
                raise ValueError(
                    f"{len(sampling)} SamplingParams for {len(batch)} prompts; pass one per "
                    "prompt or a single one for all"
                )
            params = list(sampling)
        else:
            params = [sampling] * len(batch)
        sinks = [queue.SimpleQueue() for _ in batch]
        requests = self._make_requests(
            [(p, sp, sink.put) for p, sp, sink in zip(batch, params, sinks)], stream_text=False
        )
        self._worker.submit(requests)
        try:
            outputs = [self._drain(sink) for sink in sinks]
        except BaseException:
            for request in requests:
                self._worker.abort(request)
            raise
        return outputs[0] if single else outputs

    def stream(
        self, prompt: Prompt, sampling: SamplingParams | None = None
    ) -> Iterator[StreamDelta]:
        """Yield `StreamDelta`s as text is generated; the last one carries the output.

        Leaving the loop early (break, an exception, Ctrl-C) aborts the request.
        """
        sink: queue.SimpleQueue = queue.SimpleQueue()
        (request,) = self._make_requests([(prompt, sampling, sink.put)], stream_text=True)
        self._worker.submit([request])
        finished = False
        try:
            while True:
                delta = _to_delta(self._get(sink))
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._worker.abort(request)

    async def agenerate(
        self, prompt: Prompt, sampling: SamplingParams | None = None
    ) -> GenerationOutput:
        """Async `generate` for one prompt; concurrent awaits are batched together."""
        output = None
        async for delta in self._astream(prompt, sampling, stream_text=False):
            output = delta.output
        return output

    async def astream(
        self, prompt: Prompt, sampling: SamplingParams | None = None
    ) -> AsyncIterator[StreamDelta]:
        """Async `stream`; cancelling the task or closing the iterator aborts the request
        without blocking the event loop."""
        async for delta in self._astream(prompt, sampling, stream_text=True):
            yield delta

    async def _astream(
        self, prompt: Prompt, sampling: SamplingParams | None, stream_text: bool
    ) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        (request,) = self._make_requests(
            [(prompt, sampling, lambda item: loop.call_soon_threadsafe(sink.put_nowait, item))],
            stream_text=stream_text,
        )
        self._worker.submit([request])
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(sink.get(), _POLL_S)
                except TimeoutError:
                    self._check_alive()
                    continue
                delta = _to_delta(item)
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._worker.abort(request)  # never blocks: the worker drops it

    def stats(self) -> EngineStats:
        """Chunk registry, KV cache and scheduler counters (at most one step old)."""
        return self._worker.stats()

    def clear_cache(self) -> int:
        """Evict every chunk KV node no running request uses; returns pages freed."""
        with self._worker.core_lock:
            return self._core.kv.clear()

    @property
    def closed(self) -> bool:
        return self._worker.closed

    def close(self) -> None:
        """Stop the engine: running and queued requests end with `EngineClosedError`, the
        worker thread is joined, and later calls raise `EngineClosedError` at once."""
        self._worker.close(join=True)
        self._finalizer.detach()

    def __enter__(self) -> CascadeEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------

    def _make_requests(self, items, stream_text: bool) -> list[_Request]:
        """Validate every request, then register their chunks; nothing is registered (and
        nothing submitted) if one of them is refused."""
        if self._worker.closed:
            raise EngineClosedError("the engine is closed")
        checked = [self._check_request(p, sp) for p, sp, _ in items]
        requests = []
        with self._compose_lock:
            for (prepared, params, max_tokens), (_, _, deliver) in zip(checked, items):
                prepared = self.composer.commit(prepared)
                for chunk in prepared.chunks:  # the same tokens as the chunks checked above
                    self._checked_chunks[chunk.id] = chunk
                requests.append(_Request(prepared, params, max_tokens, deliver, stream_text))
        return requests

    def _check_request(self, prompt: Prompt, sampling: SamplingParams | None):
        params = sampling if sampling is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.vocab_size)
        prepared = self._prepare(prompt)
        n = prepared.num_chunk_tokens + len(prepared.tail_ids)  # no list of every token
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens but the model's context is {self.max_model_len}; "
                "shorten the prompt or retrieve fewer chunks"
            )
        max_tokens = min(params.max_tokens, self.max_model_len - n)
        size = self.config.page_size
        worst = -(-(n + max_tokens) // size) + len(prepared.chunks) + 1
        if worst > self.config.num_pages:
            raise ValueError(
                f"a request of {n} prompt tokens + {max_tokens} new tokens needs up to {worst} "
                f"KV pages but the pool has {self.config.num_pages}; raise kv_cache_tokens or "
                "lower max_tokens"
            )
        return prepared, params, max_tokens

    def _check_alive(self) -> None:
        if not self._worker.alive():
            raise EngineClosedError("the engine was closed")

    def _get(self, sink: queue.SimpleQueue):
        while True:
            try:
                return sink.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive()

    def _drain(self, sink: queue.SimpleQueue) -> GenerationOutput:
        while True:
            delta = _to_delta(self._get(sink))
            if delta.output is not None:
                return delta.output

    # ---- chunk KV management -----------------------------------------------------------
    #
    # A chunk's KV is only valid after the exact chain of chunks before it (the KV cache is
    # a prefix tree), so these methods take a chain as a request composes it: the system
    # prompt chunk, then `chunks` in order, exactly as in `Composition(system=..., chunks=...)`.
    # They run on the worker thread between two steps (`_Worker.call`).

    def precompute(
        self, chunks: Sequence[Chunk | str], system: str | Chunk | None = None
    ) -> ChainInfo:
        """Compute the KV of a chain of chunks now, so later requests find it cached.

        Args:
            chunks: `Chunk`s, `ChunkId`s or text, in prompt order (as `Composition.chunks`).
            system: the system prompt (text or a SYSTEM_PROMPT chunk); None uses the chat
                template's default, as a `Composition` without one does.

        Returns:
            the chain; `computed_tokens` is 0 when its KV was already cached.

        A chain that is not cached is computed by a one-token request (the chain plus one
        private token), counted in `stats()` like any request. Cached KV may be evicted
        later under memory pressure unless the chain is pinned (`pin`).

        Example:
            >>> doc = engine.register_chunk("Plum is the capital of Zorbia.")
            >>> engine.precompute([doc], system="Answer briefly.").computed_tokens > 0
            True
        """
        chain = self._chain(chunks, system)
        computed = self._compute_chain(chain)
        ids = tuple(c.id for c in chain)
        pins = self._control(lambda core: core.kv.held_chains().get(ids, 0))
        return ChainInfo(ids, sum(len(c) for c in chain), computed, pins)

    def pin(self, chunks: Sequence[Chunk | str], system: str | Chunk | None = None) -> ChainInfo:
        """Keep a chain's KV cached until `unpin`: it is computed if needed, then never evicted.

        What is pinned is the chain [system prompt chunk, *chunks] as a request composes it,
        not a chunk alone: the KV of a chunk after another system prompt or other chunks is
        another cache entry. Requests whose composition starts with this chain reuse it.
        Pins are counted: each `pin` needs its own `unpin`. Pinned KV takes pages from the
        pool for good; `clear_cache()` does not free it.

        Args:
            chunks, system: the chain, as in `precompute`.

        Raises:
            ValueError: the chunk cache is off, or the chain does not fit the context.
            OutOfPagesError: the chain's KV was evicted again before it could be pinned (a
                pool too small for it and the running requests).

        Example:
            >>> engine.pin([doc], system="Answer briefly.").pins
            1
        """
        chain = self._chain(chunks, system)
        ids = tuple(c.id for c in chain)
        computed = 0
        for _ in range(_PIN_ATTEMPTS):
            pins = self._control(lambda core: core.kv.hold_chain(ids))
            if pins is not None:
                return ChainInfo(ids, sum(len(c) for c in chain), computed, pins)
            computed += self._compute_chain(chain)
        raise OutOfPagesError(
            f"the chain of {len(ids)} chunk(s) was evicted again before it could be pinned; "
            "raise kv_cache_tokens or run fewer requests at once"
        )

    def unpin(self, chunks: Sequence[Chunk | str], system: str | Chunk | None = None) -> ChainInfo:
        """Undo one `pin` of the same chain; its KV stays cached but may be evicted again.

        Raises:
            ValueError: the chain is not pinned.
        """
        chain = self._chain(chunks, system, register=False)
        ids = tuple(c.id for c in chain)
        pins = self._control(lambda core: core.kv.release_chain(ids))
        return ChainInfo(ids, sum(len(c) for c in chain), 0, pins)

    def pinned_chains(self) -> dict[tuple[str, ...], int]:
        """Every pinned chain (chunk ids, the system prompt chunk first) and its pin count."""
        return self._control(lambda core: core.kv.held_chains())

    def cached_chunks(self) -> list[ChunkNodeInfo]:
        """Every chunk KV entry in the cache: chunk, the chain it follows, pins and users."""
        return self._control(lambda core: core.kv.node_infos())

    def delete_chunk(self, chunk_id: str) -> int:
        """Drop the KV of a chunk after every chain, and of everything cached after it.

        The chunk itself stays registered (registering is a content-addressed lookup; the
        registry forgets unused chunks by itself). Returns the KV pages freed.

        Raises:
            ChunkInUseError: a pinned chain or a running request uses that KV (nothing is
                dropped then); unpin or retry.
        """
        if not isinstance(chunk_id, str):
            raise TypeError(f"chunk_id must be a str, got {type(chunk_id).__name__}")
        _, freed = self._control(lambda core: core.kv.remove_chunk(chunk_id))
        return freed

    def _chain(
        self, chunks: Sequence[Chunk | str], system: str | Chunk | None, register: bool = True
    ) -> tuple[Chunk, ...]:
        """The chunks a `Composition(system=system, chunks=chunks)` request starts with."""
        if isinstance(chunks, (str, bytes, Chunk)) or not isinstance(chunks, Sequence):
            raise TypeError(
                f"chunks must be a list of Chunk, ChunkId or str, got {type(chunks).__name__}"
            )
        if not self.config.enable_chunk_cache:
            raise ValueError(
                "the chunk cache is off (enable_chunk_cache=False): there is no chunk KV to "
                "pin or precompute"
            )
        probe = Composition(query=".", chunks=list(chunks), system=system)
        prepared = self.prepare(probe) if register else self._prepare(probe)
        if not prepared.chunks:
            raise ValueError("the chain is empty; pass at least one chunk or a system prompt")
        n = len(prepared.token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"the chain has {n - len(prepared.tail_ids)} tokens but the model's context is "
                f"{self.max_model_len}; pass fewer chunks"
            )
        return prepared.chunks

    def _compute_chain(self, chain: tuple[Chunk, ...]) -> int:
        """Compute the chain's KV if any of it is missing; returns the tokens computed."""
        ids = tuple(c.id for c in chain)
        if len(self._control(lambda core: core.kv.find_chain(ids))) == len(ids):
            return 0
        # one private token after the chain: a request's last prompt token is its own
        probe = PreparedPrompt(chunks=chain, tail_ids=(chain[-1].token_ids[-1],))
        out = self.generate(probe, SamplingParams(max_tokens=1))
        return out.usage.prompt_tokens - len(probe.tail_ids) - out.usage.cached_tokens

    def kv_store_stats(self) -> KVStoreStats | None:
        """Counters of the disk store of chunk KV (`EngineConfig.kv_store_dir`), or None
        when the engine has none."""
        return self._control(lambda core: None if core.store is None else core.store.stats())

    def _control(self, fn: Callable[[LLMEngine], object]):
        """`fn(core)` run by the worker thread; its result, or its exception raised here."""
        future = self._worker.call(fn)
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                self._check_alive()


def _ignore(item) -> None:
    pass


def _deliver(request: _Request, item) -> None:
    """Hand an update to its caller; a caller that went away must not stop the worker."""
    try:
        request.deliver(item)
    except Exception:  # noqa: BLE001 - e.g. the caller's event loop is already closed
        request.deliver = _ignore


def _is_batch(prompts) -> bool:
    if isinstance(prompts, (str, bytes, bytearray, Composition, PreparedPrompt)):
        return False
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, Mapping) for p in prompts):
        return False  # one list of chat messages
    return isinstance(prompts, Sequence)


def _to_delta(item: SeqUpdate | BaseException) -> StreamDelta:
    if isinstance(item, BaseException):
        raise item
    return StreamDelta(
        request_id=item.seq.seq_id,
        text=item.text,
        token_ids=item.token_ids,
        output=item.output,
        logprobs=item.logprobs,
    )
