"""The synchronous engine core: add requests, run steps, get per-step updates.

`LLMEngine` owns the model, the page pool, the chunk KV cache, the scheduler and the model
runner. It is driven by exactly one thread (the public `CascadeEngine` runs it on a worker
thread); it validates nothing the caller typed (the front end does) but keeps serving when a
step fails: the failed step's requests end with the error and the cache keeps every node that
was complete before the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cascade_rag.chunks import ChunkRegistry
from cascade_rag.config import EngineConfig
from cascade_rag.engine.detokenizer import TextStream
from cascade_rag.engine.kv_cache import ChunkKVCache, OutOfPagesError, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler
from cascade_rag.engine.sequence import PreparedPrompt, Sequence, SequenceStatus
from cascade_rag.outputs import EngineStats, GenerationOutput, Usage
from cascade_rag.sampling import Sampler, SamplingParams, make_generator

logger = logging.getLogger(__name__)


@dataclass
class SeqUpdate:
    """What one step did to one request: new tokens/text, and the end if it ended."""

    seq: Sequence
    token_ids: list[int]
    text: str
    output: GenerationOutput | None = None
    error: BaseException | None = None


def make_attention_backend(config: EngineConfig, model_config):
    """The attention backend the config asks for (FlashInfer only where it can run)."""
    want = config.attention_backend
    on_cuda = torch.device(config.device).type == "cuda"
    if want == "flashinfer" or (want == "auto" and on_cuda):
        try:
            from cascade_rag.attention.flashinfer_backend import FlashInferAttention
        except ImportError as exc:
            if want == "flashinfer":
                raise ImportError(
                    "attention_backend='flashinfer' needs the gpu extra: "
                    "pip install 'cascade-rag[gpu]'"
                ) from exc
            logger.warning(
                "FlashInfer is not installed: attention runs in PyTorch on %s", config.device
            )
        else:
            return FlashInferAttention.for_model(model_config, config)
    from cascade_rag.attention.torch_backend import TorchAttention

    return TorchAttention(
        model_config.num_qo_heads, model_config.num_kv_heads, model_config.head_dim
    )


class LLMEngine:
    """Single-threaded engine core.

    Args:
        config: engine configuration.
        model: the loaded model (`cascade_rag.models.loader.LoadedModel`).
        registry: the chunk registry the prompts' chunks come from.
    """

    def __init__(self, config: EngineConfig, model, registry: ChunkRegistry) -> None:
        self.config = config
        self.model = model
        self.tokenizer = model.tokenizer
        mc = model.config
        self.pool = PagePool(
            config.num_pages,
            config.page_size,
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            dtype=model.model.dtype,
            device=config.device,
        )
        self.kv = ChunkKVCache(self.pool, registry)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        attn = make_attention_backend(config, mc)
        if getattr(attn, "fused_model_ops", False):
            model.model.fuse_for_speed()  # GPU: fewer, larger kernels (bf16 tolerance)
        self.runner = ModelRunner(
            model.model,
            self.pool,
            attn,
            config.levels,
            config.cascade_min_shared_tokens,
        )
        self.sampler = Sampler()
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._streams: dict[int, TextStream] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self.num_steps = 0
        self.prompt_tokens = 0
        self.computed_prompt_tokens = 0
        self.generated_tokens = 0
        self.num_preemptions = 0

    # ---- requests ----------------------------------------------------------------------

    def add_request(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        max_tokens: int,
        stream_text: bool = True,
    ) -> Sequence:
        """Queue a validated request; `max_tokens` is already clamped to the context.

        With `stream_text` False (and no stop strings) text is decoded once at the end
        instead of token by token: updates then carry token ids and an empty text.
        """
        seq = Sequence(prompt=prompt, params=params, max_tokens=max_tokens)
        if stream_text or params.stop:
            self._streams[seq.seq_id] = TextStream(
                self.tokenizer, params.stop, params.include_stop_str_in_output
            )
        self._generators[seq.seq_id] = make_generator(params.seed, self.config.device)
        self.scheduler.add(seq)
        self.prompt_tokens += seq.num_prompt_tokens
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (its chunk nodes stay cached)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        else:
            self.scheduler.release(seq)
        self._end(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[SeqUpdate]:
        """Schedule and run one forward pass; returns an update per request it touched."""
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        failed = [self._fail(seq, OutOfPagesError(self._too_big(seq))) for seq in plan.failed]
        if not plan.scheduled:
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting.popleft()
                failed.append(self._fail(seq, OutOfPagesError(self._too_big(seq))))
            return failed
        try:
            logits = self.runner.run(plan.scheduled)
        except Exception as exc:  # noqa: BLE001 - the step's requests get the error
            self.scheduler.finish_step(plan, failed=True)
            return failed + [self._fail(e.seq, exc) for e in plan.scheduled]
        self.scheduler.finish_step(plan, failed=False)
        self.num_steps += 1
        seqs = [e.seq for e in plan.scheduled]
        for e in plan.scheduled:
            self.computed_prompt_tokens += max(
                0, min(e.kv_len, e.seq.num_prompt_tokens) - e.q_start
            )
        tokens = self.sampler.sample(
            logits,
            [s.params for s in seqs],
            [self._generators[s.seq_id] for s in seqs],
        ).tolist()
        return failed + [self._append(seq, tok) for seq, tok in zip(seqs, tokens)]

    def _too_big(self, seq: Sequence) -> str:
        return (
            f"request {seq.seq_id} ({len(seq.token_ids)} tokens) does not fit in the KV pool "
            f"({self.pool.num_pages} pages of {self.pool.page_size} tokens); raise "
            "EngineConfig.kv_cache_tokens"
        )

    def _append(self, seq: Sequence, token: int) -> SeqUpdate:
        seq.token_ids.append(token)
        self.generated_tokens += 1
        stream = self._streams.get(seq.seq_id)
        text, stopped = stream.add(token) if stream is not None else ("", False)
        reason, stop_reason = None, None
        if stopped:
            reason, stop_reason = "stop", stream.stop_str
        elif token in seq.params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif token in self.eos_token_ids and not seq.params.ignore_eos:
            reason, stop_reason = "stop", token
        elif seq.num_generated >= seq.max_tokens:
            reason = "length"
        if reason is None:
            return SeqUpdate(seq, [token], text)
        if not stopped and stream is not None:
            text += stream.finish()
        self.scheduler.release(seq)
        return SeqUpdate(seq, [token], text, output=self._end(seq, reason, stop_reason))

    def _end(self, seq: Sequence, reason: str, stop_reason=None) -> GenerationOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        stream = self._streams.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)
        if stream is None:
            text = self.tokenizer.decode(
                seq.generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        else:
            if not stream.finished:
                stream.finish()
            text = stream.text
        return GenerationOutput(
            request_id=seq.seq_id,
            text=text,
            token_ids=seq.generated_ids,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=seq.num_prompt_tokens,
                cached_tokens=seq.num_cached_tokens or 0,
                completion_tokens=seq.num_generated,
            ),
            stop_reason=stop_reason,
        )

    def _fail(self, seq: Sequence, exc: BaseException) -> SeqUpdate:
        self._end(seq, "error")
        return SeqUpdate(seq, [], "", error=exc)

    def stats(self, registry: ChunkRegistry) -> EngineStats:
        return EngineStats(
            chunks=registry.stats(),
            kv_cache=self.kv.stats(),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_steps=self.num_steps,
            prompt_tokens=self.prompt_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens,
            generated_tokens=self.generated_tokens,
            num_preemptions=self.num_preemptions,
            num_cascade_steps=self.runner.num_cascade_steps,
        )
