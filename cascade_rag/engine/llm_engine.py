"""The synchronous engine core: add requests, run steps, get per-step updates.

`LLMEngine` owns the model, the page pool, the chunk KV cache, the scheduler and the model
runner. It is driven by exactly one thread (the public `CascadeEngine` runs it on a worker
thread); it validates nothing the caller typed (the front end does) but keeps serving when a
step fails: the failed step's requests end with the error and the cache keeps every node that
was complete before the step.

Overlap (`EngineConfig.overlap`): one step of lookahead. `step()` schedules, prepares and
launches step t before it reads step t-1's sampled tokens, so the host work of one step runs
while the device computes the previous one. A launched step whose tokens are not read yet is
the "flight": every sequence in it carries a placeholder token (`PENDING`) at its end, so
lengths, positions and page growth are right for the next step, whose input ids for those
rows are gathered on the device from the flight's sampled-ids tensor (`ModelRunner.run`'s
`pending`). After launching step t, the flight of step t-1 is resolved: its event waited for,
placeholders replaced by the real ids and the per-token logic run as before (constraints, stop
tokens, stop strings, max_tokens, detokenizing, updates). A sequence that ended when step t-1
resolved still has a row in step t; that row's token is discarded when step t resolves. Its
pages are released at once: the in-flight kernels read them, but every later write to them is
queued after those kernels on the one device stream. A sequence whose pending token reaches
`max_tokens` gets no row (its pages are released before scheduling, as they would be without
overlap). A step with a row whose sampling needs the host state of its tokens (a constraint,
penalties, logprobs) is sampled on the host and resolved in the same call, so the next step
finds nothing pending (no overlap for it); an isolated request (a failed batch being retried)
makes the flight resolve before scheduling. On the CPU every device call is synchronous, so
overlap changes the order of work but nothing else.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from cascade_rag.chunks import ChunkRegistry
from cascade_rag.config import EngineConfig
from cascade_rag.engine.cuda_graph import make_decode_graphs
from cascade_rag.engine.detokenizer import TextStream
from cascade_rag.engine.kv_cache import ChunkKVCache, OutOfPagesError, PagePool
from cascade_rag.engine.kv_store import ChunkKVStore, StoreIdentity, load_node, save_node
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler
from cascade_rag.engine.segments import RecomputePolicy
from cascade_rag.engine.sequence import PreparedPrompt, Sequence, SequenceStatus
from cascade_rag.outputs import EngineStats, GenerationOutput, Usage
from cascade_rag.sampling import (
    ConstraintState,
    GrammarCompiler,
    Sampler,
    SamplerOutput,
    SamplingParams,
    TokenLogprob,
    make_generator,
)

logger = logging.getLogger(__name__)

PENDING = -1  # placeholder of a sampled token not read back yet (never reaches the model)


def default_overlap(device: torch.device) -> bool:
    """`EngineConfig.overlap=None`: whether steps overlap on this device: on for CUDA (on the
    H200 it brings a cascade decode step at batch 32-128 over 8K cached tokens from 1.45-1.49x
    its GPU kernel time to 1.02-1.05x, same tokens, bench/bench_gpu_overlap.py), off on the CPU,
    where host and "device" are the same cores and there is nothing to overlap."""
    return device.type == "cuda"


@dataclass
class SeqUpdate:
    """What one step did to one request: new tokens/text, and the end if it ended."""

    seq: Sequence
    token_ids: list[int]
    text: str
    output: GenerationOutput | None = None
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class _Flight:
    """A launched step: its sequences (batch order) and their sampled tokens, read on demand.

    Exactly one of `ids` (a device tensor, with its pinned host copy and event on CUDA) and
    `results` ((token, logprob) or the row's exception, already on the host) is set.
    """

    seqs: list[Sequence]
    ids: torch.Tensor | None = None
    host: torch.Tensor | None = None
    event: object | None = None
    results: list | None = None
    # its sequences whose placeholder reaches max_tokens (they get no row in the next step)
    length_ends: list[Sequence] = field(default_factory=list)

    @functools.cached_property
    def index(self) -> dict[int, int]:
        return {seq.seq_id: i for i, seq in enumerate(self.seqs)}

    def wait(self) -> list:
        """(token, logprob) per row, or the row's exception."""
        if self.results is None:
            self.results = [(t, None) for t in self.tokens()]
        return self.results

    def tokens(self) -> list[int]:
        """The sampled ids of a step sampled on the device (waits for them)."""
        if self.event is not None:
            self.event.synchronize()
            return self.host.tolist()
        return self.ids.tolist()


def _needs_host_state(params: SamplingParams) -> bool:
    """A row whose sampling reads its previous tokens (or returns logprobs) on the host."""
    return params.constraint is not None or params._penalised or params.logprobs is not None


@dataclass
class _BatchRows:
    """What sampling needs to know of a step's rows. Kept while the steps run the same
    sequences in the same order (steady decode), so it is worked out once per batch, not per
    step: a sequence's params and generator never change.

    Attributes:
        seqs: the step's sequences, batch order.
        host_state: a row needs the host state of its tokens (`_needs_host_state`).
        generators: each row's generator (None: torch's global RNG).
        greedy: every row is plain greedy (argmax of the raw logits, no logprobs).
    """

    seqs: list[Sequence]
    host_state: bool
    generators: list[torch.Generator | None]
    greedy: bool

    @classmethod
    def of(cls, seqs: list[Sequence], generators: dict[int, torch.Generator | None]):
        params = {id(s.params): s.params for s in seqs}.values()  # often one object for all
        return cls(
            list(seqs),
            any(_needs_host_state(p) for p in params),
            [generators[s.seq_id] for s in seqs],
            all(p._plain_greedy for p in params),
        )


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
        dtype = model.model.dtype
        config.check_kv_pool_fits(
            2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype.itemsize
        )
        self.pool = PagePool(
            config.num_pages,
            config.page_size,
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            dtype=dtype,
            device=config.device,
        )
        anywhere = config.chunk_reuse == "anywhere"
        self.kv = ChunkKVCache(self.pool, registry, segment_layout=anywhere)
        recompute = (
            RecomputePolicy(config.recompute_tokens, config.recompute_mode) if anywhere else None
        )
        self.store = None  # chunk KV on disk (reuse anywhere only)
        if config.kv_store_dir is not None:
            identity = StoreIdentity(
                model.digest, str(dtype).removeprefix("torch."), mc.num_layers,
                mc.num_kv_heads, mc.head_dim,
            )  # fmt: skip
            self.store = ChunkKVStore(config.kv_store_dir, identity, config.kv_store_bytes)
        load = None if self.store is None else lambda node: load_node(self.store, self.kv, node)
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            recompute,
            load,
            split_segments=anywhere and config.cascade,
        )
        attn = make_attention_backend(config, mc)
        if getattr(attn, "fused_model_ops", False):
            model.model.fuse_for_speed()  # GPU: fewer, larger kernels (bf16 tolerance)
        self.runner = ModelRunner(
            model.model,
            self.pool,
            attn,
            config.levels,
            config.cascade_min_shared_tokens,
            block_table=self.scheduler.block_table,
        )
        self.runner.graphs = make_decode_graphs(config, self.runner)  # None on the CPU
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.sampler = Sampler(self.eos_token_ids)
        on_cuda = torch.device(config.device).type == "cuda"
        overlap = config.overlap
        self.overlap = default_overlap(torch.device(config.device)) if overlap is None else overlap
        self._cuda = on_cuda
        self._flight: _Flight | None = None  # the launched step whose tokens are not read yet
        self._batch: _BatchRows | None = None  # what the last step's sampling knew of its rows
        # output constraints: compiled per distinct constraint, one matcher per request
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        self._constraints: dict[int, ConstraintState] = {}
        self._streams: dict[int, TextStream] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self.num_steps = 0
        self.prompt_tokens = 0
        self.computed_prompt_tokens = 0
        self.generated_tokens = 0
        self.num_preemptions = 0
        self.recomputed_tokens = 0  # prompt positions computed again (preemption, retries)

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
        if params.constraint is not None:  # first: a constraint that fails leaves nothing
            self._constraints[seq.seq_id] = self.grammars.start(
                params.constraint, params.stop_token_ids
            )
        if stream_text or params.stop:
            self._streams[seq.seq_id] = TextStream(
                self.tokenizer, params.stop, params.include_stop_str_in_output
            )
        self._generators[seq.seq_id] = make_generator(params.seed, self.config.device)
        self.scheduler.add(seq)
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
        """Requests to run, or a launched step whose tokens are not delivered yet."""
        return self._flight is not None or self.scheduler.has_work()

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[SeqUpdate]:
        """Schedule and run one forward pass; returns an update per request it touched.

        Never raises for a request's failure: a request that fails (admission, pages, its own
        sampling or stop handling) ends with its error in its update, and the others go on.
        When the forward pass of several requests fails, they are recomputed one per step
        (`Scheduler.requeue_isolated`) so only the request that fails alone gets the error.
        With overlap the updates are those of the previous step's tokens (this step's are
        delivered by the next call; see the module docstring).
        """
        updates: list[SeqUpdate] = []
        flight, self._flight = self._flight, None
        if flight is not None and not self._may_overlap():
            updates += self._resolve(flight)
            flight = None
        if flight is not None:  # no row for a sequence its pending token ends by length
            for seq in flight.length_ends:
                if seq.status is SequenceStatus.RUNNING and seq.num_pending:
                    self.scheduler.release(seq)
        try:
            plan = self.scheduler.schedule()
        except Exception as exc:  # noqa: BLE001 - not attributable: the running requests end
            logger.exception("scheduling failed; ending the running requests")
            updates += self._resolve(flight)
            return updates + [self._fail(seq, exc) for seq in self._drop_running()]
        self.num_preemptions += len(plan.preempted)
        updates += [self._fail(seq, exc) for seq, exc in plan.failed]
        if not plan.scheduled:
            updates += self._resolve(flight)
            if flight is None and self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting.popleft()
                updates.append(self._fail(seq, OutOfPagesError(self.too_big(seq))))
            return updates
        seqs = [e.seq for e in plan.scheduled]
        pending = None
        if flight is not None:
            if flight.seqs == seqs:  # the same sequences (by identity) in the same order
                pending = (flight.ids, None)
            else:
                index = flight.index
                rows = [(j, index[s.seq_id]) for j, s in enumerate(seqs) if s.num_pending]
                pending = (flight.ids, rows) if rows else None
        self.runner.pending = pending
        try:
            logits = self.runner.run(plan.scheduled, plan.all_decode_rows)
        except Exception as exc:  # noqa: BLE001 - the step's requests get the error
            self.scheduler.finish_step(plan, failed=True)
            updates += self._resolve(flight)  # the previous step's tokens are not lost
            seqs = [s for s in seqs if s.status is not SequenceStatus.FINISHED]
            if len(seqs) == 1:
                logger.warning("request %d failed in the model: %r", seqs[0].seq_id, exc)
                return updates + [self._fail(seqs[0], exc)]
            if seqs:
                logger.warning(
                    "a step of %d requests failed in the model (%r); rerunning each alone",
                    len(seqs),
                    exc,
                )
                self.scheduler.requeue_isolated(seqs)
            return updates
        finally:
            self.runner.pending = None
        self.scheduler.finish_step(plan, failed=False)
        self.num_steps += 1
        if self.store is not None:
            self._save_to_store(plan.created)
        for e in plan.scheduled[plan.num_decode :]:  # decode entries compute no prompt token
            seq = e.seq
            done = min(e.kv_len, seq.num_prompt_tokens)
            if seq.num_prompt_computed == 0:  # first computation: count the prompt once
                self.prompt_tokens += seq.num_prompt_tokens
            first = max(e.q_start, seq.num_prompt_computed)
            self.computed_prompt_tokens += max(0, done - first)
            self.recomputed_tokens += max(0, min(done, seq.num_prompt_computed) - e.q_start)
            if e.num_extra_rows:  # reuse anywhere: chunk nodes created, chunk tokens recomputed
                if seq.num_prompt_computed == 0:
                    self.computed_prompt_tokens += e.num_extra_rows
                else:
                    self.recomputed_tokens += e.num_extra_rows
            seq.num_prompt_computed = max(seq.num_prompt_computed, done)
        launched = self._launch_sampling(logits, seqs)
        ends = launched.length_ends
        for seq in seqs:  # this step's tokens: placeholders until it resolves
            ids = seq.token_ids
            ids.append(PENDING)
            seq.num_pending += 1
            if len(ids) - seq.num_prompt_tokens >= seq.max_tokens:
                ends.append(seq)
        updates += self._resolve(flight)
        if launched.results is not None or not self.overlap:
            updates += self._resolve(launched)
        else:
            self._flight = launched
        return updates

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled before the flight resolves.

        A flight never holds a row that needs the host state of its token (a constraint,
        penalties, logprobs): a step with such a row is sampled on the host and resolved at
        once (`_launch_sampling`). An isolated request (a failed batch being retried) runs
        after the flight resolves, so the scheduler sees every request that still runs.
        """
        waiting = self.scheduler.waiting
        return self.overlap and not (waiting and waiting[0].isolate)

    def _launch_sampling(self, logits: torch.Tensor, seqs: list[Sequence]) -> _Flight:
        """Sample the step: on the device without reading the ids back where every row allows
        it (overlap), else on the host with per-row isolation (`_sample`)."""
        rows = self._batch
        if rows is None or rows.seqs != seqs:  # new sequences in the batch: look at them once
            rows = self._batch = _BatchRows.of(seqs, self._generators)
        if self.overlap and not rows.host_state:
            gens = rows.generators
            states = [g.get_state() if g is not None else None for g in gens]
            try:
                if rows.greedy:
                    ids = self.sampler.greedy_ids(logits)
                else:
                    ids = self._sample_ids(logits, seqs, gens)
            except Exception as exc:  # noqa: BLE001 - `_sample` finds the row(s) that fail
                logger.warning("sampling on the device failed (%r); sampling on the host", exc)
                for g, state in zip(gens, states):
                    if g is not None:
                        g.set_state(state)
            else:
                if not self._cuda:
                    return _Flight(seqs, ids=ids)
                host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
                host.copy_(ids, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                return _Flight(seqs, ids=ids, host=host, event=event)
        return _Flight(seqs, results=self._sample(logits, seqs))

    def _resolve(self, flight: _Flight | None) -> list[SeqUpdate]:
        """Read a launched step's tokens and run the per-token logic; rows of requests that
        ended since it launched are dropped."""
        if flight is None:
            return []
        updates: list[SeqUpdate] = []
        if flight.results is None:  # sampled on the device: a token per row, no logprobs
            finished = SequenceStatus.FINISHED
            for seq, token in zip(flight.seqs, flight.tokens()):
                if seq.status is finished:
                    continue  # ended (stop, abort, failure) while this step ran: token dropped
                try:
                    updates.append(self._append(seq, token, None))
                except Exception as exc:  # noqa: BLE001 - e.g. detokenizing failed
                    updates += self._failed_after_sampling(seq, exc)
            return updates
        for seq, sampled in zip(flight.seqs, flight.results):
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended (stop, abort, failure) while this step ran: token dropped
            if isinstance(sampled, BaseException):
                self.scheduler.release(seq)
                updates.append(self._fail(seq, sampled))
                continue
            try:
                updates.append(self._append(seq, *sampled))
            except Exception as exc:  # noqa: BLE001 - e.g. detokenizing failed: this one ends
                updates += self._failed_after_sampling(seq, exc)
        return updates

    def _failed_after_sampling(self, seq: Sequence, exc: BaseException) -> list[SeqUpdate]:
        logger.warning("request %d failed after sampling: %r", seq.seq_id, exc)
        if seq.status is SequenceStatus.FINISHED:
            return []
        self.scheduler.release(seq)
        return [self._fail(seq, exc)]

    def _save_to_store(self, nodes) -> None:
        """Write the chunk nodes a step computed to the disk store; failures are logged."""
        for node in nodes:
            try:
                save_node(self.store, self.kv, node)
            except Exception as exc:  # noqa: BLE001 - the request goes on; the KV stays cached
                logger.warning("chunk %s: not saved to the KV store: %s", node.chunk.id, exc)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list:
        """(token, logprob) per row, or the row's own exception.

        One batched call; if it raises, each row is sampled alone (with its generator state
        restored), so a row whose options fail does not take the batch down.
        """
        gens = [self._generators[s.seq_id] for s in seqs]
        states = [g.get_state() if g is not None else None for g in gens]
        try:
            out = self._sample_rows(logits, seqs, gens)
            return list(zip(out.token_ids, out.logprobs))
        except Exception as exc:  # noqa: BLE001 - find the row(s) that fail
            logger.warning("batched sampling failed (%r); sampling rows one by one", exc)
        results: list = []
        for i, (seq, gen, state) in enumerate(zip(seqs, gens, states)):
            if gen is not None:
                gen.set_state(state)
            try:
                out = self._sample_rows(logits[i : i + 1], [seq], [gen])
                results.append((out.token_ids[0], out.logprobs[0]))
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                results.append(exc)
        return results

    def _sample_rows(self, logits, seqs, gens) -> SamplerOutput:
        return self.sampler.sample_step(logits, *self._sampling_args(seqs, gens))

    def _sample_ids(self, logits, seqs, gens) -> torch.Tensor:
        return self.sampler.sample_step(logits, *self._sampling_args(seqs, gens), to_host=False)

    def _sampling_args(self, seqs, gens) -> tuple:
        """The sampler's per-row arguments. A pending placeholder in `generated_ids` only
        counts (for `min_tokens`): rows whose penalties read the ids never have one."""
        return (
            [s.params for s in seqs],
            gens,
            [
                s.token_ids[: s.num_prompt_tokens] if s.params.repetition_penalty != 1.0 else ()
                for s in seqs
            ],
            [s.generated_ids if s.params.needs_token_history else () for s in seqs],
            [self._constraints.get(s.seq_id) for s in seqs] if self._constraints else None,
        )

    def _drop_running(self) -> list[Sequence]:
        seqs = list(self.scheduler.running)
        for seq in seqs:
            self.scheduler.release(seq)
        return seqs

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> SeqUpdate:
        constraint = self._constraints.get(seq.seq_id) if self._constraints else None
        if constraint is not None:
            constraint.advance(token)  # raises for a token the constraint does not allow
        pending = seq.num_pending
        ids = seq.token_ids
        if pending:  # overlap: the oldest placeholder is this token
            pos = len(ids) - pending
            ids[pos] = token
            seq.num_pending = pending - 1
        else:
            ids.append(token)
            pos = len(ids) - 1
        num_generated = pos + 1 - seq.num_prompt_tokens
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.generated_tokens += 1
        params = seq.params
        may_stop = num_generated >= params.min_tokens
        is_stop_token = may_stop and (
            token in params.stop_token_ids
            or (token in self.eos_token_ids and not params.ignore_eos)
        )
        stream = self._streams.get(seq.seq_id) if self._streams else None
        text, stopped = "", False
        if stream is not None and (not is_stop_token or params.include_stop_str_in_output):
            # stop strings never cut constrained output (only free text, Constraint.stop_after)
            check_stop = may_stop and (constraint is None or constraint.stop_allowed)
            text, stopped = stream.add(token, check_stop=check_stop)
        reason, stop_reason = None, None
        if stopped:
            reason, stop_reason = "stop", stream.stop_str
        elif is_stop_token:
            reason, stop_reason = "stop", token
        elif num_generated >= seq.max_tokens:
            reason = "length"
        lp = [logprob] if logprob is not None else None
        if reason is None:
            return SeqUpdate(seq, [token], text, logprobs=lp)
        if not stopped and stream is not None:
            text += stream.finish()
        self.scheduler.release(seq)
        output = self._end(seq, reason, stop_reason)
        return SeqUpdate(seq, [token], text, output=output, logprobs=lp)

    def _end(self, seq: Sequence, reason: str, stop_reason=None) -> GenerationOutput:
        pending, seq.num_pending = seq.num_pending, 0
        if pending:  # tokens of launched steps that will not be delivered
            del seq.token_ids[-pending:]
        if seq.status is SequenceStatus.WAITING and seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)  # preempted while its last token was pending
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        stream = self._streams.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)
        self._constraints.pop(seq.seq_id, None)
        if stream is None:
            ids = seq.generated_ids
            if isinstance(stop_reason, int) and not seq.params.include_stop_str_in_output:
                ids = ids[:-1]  # a stop token's text is not part of the output (as in vLLM)
            text = self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
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
                recomputed_tokens=seq.num_recomputed_tokens,
                completion_tokens=seq.num_generated,
            ),
            stop_reason=stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
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
            recomputed_tokens=self.recomputed_tokens,
        )
