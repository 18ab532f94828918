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
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace

from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType
from cascade_rag.composition import Composition, PromptComposer
from cascade_rag.config import EngineConfig
from cascade_rag.engine.llm_engine import LLMEngine, SeqUpdate
from cascade_rag.engine.sequence import PreparedPrompt, SequenceStatus
from cascade_rag.outputs import EngineStats, GenerationOutput, StreamDelta
from cascade_rag.sampling import SamplingParams

Prompt = str | Sequence[Mapping[str, str]] | Composition | PreparedPrompt


class EngineClosedError(RuntimeError):
    """The engine was closed; create a new one."""


class _Request:
    """A submitted request: the worker pushes `SeqUpdate`s to `deliver`."""

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
        self.stream_text = stream_text  # False: text decoded once at the end
        self.seq = None


class CascadeEngine:
    """Local LLM engine with chunk-cached KV and cascade attention.

    Args:
        model: model folder / `.safetensors` / `.gguf` path, or a `LoadedModel` to share
            one loaded model between engines; None for the default SmolLM2-135M-Instruct.
            Overrides `config.model` when given.
        config: engine configuration; keyword arguments override its fields.

    Example:
        >>> engine = CascadeEngine(kv_cache_tokens=8192)
        >>> doc = engine.register_chunk("Plum is the capital of Zorbia.")
        >>> out = engine.generate(
        ...     Composition(query="What is the capital of Zorbia?", chunks=[doc]),
        ...     SamplingParams(max_tokens=16))
        >>> out.text, out.usage.cached_tokens
    """

    def __init__(self, model=None, *, config: EngineConfig | None = None, **overrides) -> None:
        import torch

        from cascade_rag.models.loader import LoadedModel, load_model

        config = config or EngineConfig()
        loaded = model if isinstance(model, LoadedModel) else None
        if model is not None and loaded is None:
            overrides["model"] = model
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        dtype = getattr(torch, config.dtype)
        if loaded is not None:
            if loaded.model.dtype != dtype:
                raise ValueError(
                    f"the loaded model is {loaded.model.dtype} but the config asks {config.dtype}"
                )
            self.model = loaded
        else:
            self.model = load_model(
                config.model, dtype=dtype, device=config.device, cache_dir=config.cache_dir
            )
        self.tokenizer = self.model.tokenizer
        self.model_config = self.model.config
        mc_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or mc_len, mc_len)
        namespace = f"{self.model.model_id}|{type(self.tokenizer).__name__}:{len(self.tokenizer)}"
        self.registry = ChunkRegistry(namespace, capacity=config.chunk_registry_capacity)
        self.composer = PromptComposer(
            self.tokenizer,
            self.registry,
            auto_chunk_min_tokens=config.auto_chunk_min_tokens,
            use_chunks=config.enable_chunk_cache,
        )
        self._core = LLMEngine(config, self.model, self.registry)
        self._compose_lock = threading.Lock()
        self._core_lock = threading.Lock()
        self._wake = threading.Condition()
        self._inbox: list[_Request] = []
        self._closed = False
        self._worker: threading.Thread | None = None

    @property
    def model_name(self) -> str:
        """The model's identity (name and a digest of its files)."""
        return self.model.model_id

    # ---- chunks ------------------------------------------------------------------------

    def register_chunk(
        self, text: str, type: ChunkType = ChunkType.RAG_RESULT, metadata: Mapping | None = None
    ) -> Chunk:
        """Register text as a chunk (by the content hash of its token ids) and return it.

        A SYSTEM_PROMPT chunk is wrapped in the chat template's system turn. Registering the
        same text again returns the same chunk.
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
        return self.registry.register(list(token_ids), type=type)

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        """Tokenize and chunk a prompt without running it (see `Composition`).

        A `PreparedPrompt` (chunks + private token ids) is returned as it is, so callers
        that tokenize themselves can pass one to `generate`.
        """
        if isinstance(prompt, PreparedPrompt):
            if not self.config.enable_chunk_cache and prompt.chunks:
                return PreparedPrompt(chunks=(), tail_ids=tuple(prompt.token_ids))
            return prompt
        with self._compose_lock:
            return self.composer.prepare(prompt)

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
        requests = [
            self._make_request(p, sp, sink.put, stream_text=False)
            for p, sp, sink in zip(batch, params, sinks)
        ]
        self._submit(requests)
        outputs = [_drain(sink) for sink in sinks]
        return outputs[0] if single else outputs

    def stream(
        self, prompt: Prompt, sampling: SamplingParams | None = None
    ) -> Iterator[StreamDelta]:
        """Yield `StreamDelta`s as text is generated; the last one carries the output."""
        sink: queue.SimpleQueue = queue.SimpleQueue()
        request = self._make_request(prompt, sampling, sink.put)
        self._submit([request])
        finished = False
        try:
            while True:
                delta = _to_delta(sink.get())
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._abort(request)

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
        """Async `stream`."""
        async for delta in self._astream(prompt, sampling, stream_text=True):
            yield delta

    async def _astream(
        self, prompt: Prompt, sampling: SamplingParams | None, stream_text: bool
    ) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        request = self._make_request(
            prompt,
            sampling,
            lambda item: loop.call_soon_threadsafe(sink.put_nowait, item),
            stream_text=stream_text,
        )
        self._submit([request])
        finished = False
        try:
            while True:
                delta = _to_delta(await sink.get())
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._abort(request)

    def stats(self) -> EngineStats:
        """Chunk registry, KV cache and scheduler counters."""
        with self._core_lock:
            return self._core.stats(self.registry)

    def clear_cache(self) -> int:
        """Evict every chunk KV node no running request uses; returns pages freed."""
        with self._core_lock:
            return self._core.kv.clear()

    def close(self) -> None:
        """Stop the worker; requests still running end with `EngineClosedError`."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> CascadeEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------

    def _make_request(
        self, prompt: Prompt, sampling: SamplingParams | None, deliver, stream_text: bool = True
    ) -> _Request:
        params = sampling if sampling is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(params).__name__}")
        prepared = self.prepare(prompt)
        n = len(prepared.token_ids)
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
        return _Request(prepared, params, max_tokens, deliver, stream_text)

    def _submit(self, requests: list[_Request]) -> None:
        with self._wake:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._inbox.extend(requests)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="cascade-rag-engine", daemon=True
                )
                self._worker.start()
            self._wake.notify_all()

    def _abort(self, request: _Request) -> None:
        request.deliver = _ignore  # the caller stopped listening
        with self._wake:
            if request in self._inbox:
                self._inbox.remove(request)
                return
        with self._core_lock:
            if request.seq is not None:
                self._core.abort(request.seq)

    def _run(self) -> None:
        by_seq: dict[int, _Request] = {}
        while True:
            with self._wake:
                while not self._inbox and not self._core.has_work() and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                new, self._inbox = self._inbox, []
            with self._core_lock:
                for req in new:
                    req.seq = self._core.add_request(
                        req.prepared, req.params, req.max_tokens, req.stream_text
                    )
                    by_seq[req.seq.seq_id] = req
                try:
                    updates = self._core.step()
                except BaseException as exc:  # noqa: BLE001 - keep the worker alive
                    updates = []
                    for seq_id, req in list(by_seq.items()):
                        if req.seq.status is not SequenceStatus.FINISHED:
                            self._core.abort(req.seq)
                        _deliver(req, exc)
                        del by_seq[seq_id]
            for update in updates:
                req = by_seq.get(update.seq.seq_id)
                if req is None:
                    continue
                _deliver(req, update.error if update.error is not None else update)
                if update.output is not None or update.error is not None:
                    del by_seq[update.seq.seq_id]
            for seq_id in [i for i, r in by_seq.items() if r.seq.status is SequenceStatus.FINISHED]:
                del by_seq[seq_id]  # aborted by their callers
        closed = EngineClosedError("the engine was closed")
        for req in list(by_seq.values()) + self._inbox:
            _deliver(req, closed)


def _ignore(item) -> None:
    pass


def _deliver(request: _Request, item) -> None:
    """Hand an update to its caller; a caller that went away must not stop the worker."""
    try:
        request.deliver(item)
    except Exception:  # noqa: BLE001 - e.g. the caller's event loop is already closed
        request.deliver = _ignore


def _is_batch(prompts) -> bool:
    if isinstance(prompts, (str, Composition, PreparedPrompt)):
        return False
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, Mapping) for p in prompts):
        return False  # one list of chat messages
    return isinstance(prompts, Sequence)


def _to_delta(item: SeqUpdate | BaseException) -> StreamDelta:
    if isinstance(item, BaseException):
        raise item
    return StreamDelta(
        request_id=item.seq.seq_id, text=item.text, token_ids=item.token_ids, output=item.output
    )


def _drain(sink: queue.SimpleQueue) -> GenerationOutput:
    while True:
        delta = _to_delta(sink.get())
        if delta.output is not None:
            return delta.output
