"""`/v1/chat/completions` and `/v1/completions`: OpenAI requests in, engine streams out.

A request goes: admission (the app checked the API key and body size; here the model name,
the bounded queue, and the fields, which request_fields.py turns into `SamplingParams` and a
prompt) -> `engine.prepare` in a worker thread (tokenizing and chunking; chat requests with
`chunk_ids` become a `Composition` of registered chunks) -> `engine.astream`, whose first
token is awaited while watching for the client going away -> a JSON response, or a
server-sent event stream (sse-starlette) that ends with `data: [DONE]`.

A client that disconnects (before or during its stream) cancels the awaiting task, which closes
the engine stream and so aborts the request and frees its KV pages. Errors the caller can fix
are 400s naming the field; the engine closing is a 503.

Requests with `tools`, tool turns or a JSON `response_format` are planned by
`cascade_rag.openai_tools.prepare_chat` (prompt with the tools, and a grammar constraint); the
answer text then becomes an OpenAI message with `tool_calls` where the model called tools.

This module does not route or authenticate (app.py) and does not hold chunks (chunk_store.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cascade_rag.chunks import UnknownChunkError
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import EngineClosedError
from cascade_rag.openai_tools import ChatPlan, constraint_from_response_format, prepare_chat
from cascade_rag.outputs import GenerationOutput, StreamDelta, Usage
from cascade_rag.sampling import SamplingParams
from cascade_rag.serving import protocol as p
from cascade_rag.serving import request_fields as r
from cascade_rag.serving.protocol import APIError

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


@dataclass
class _Run:
    """One HTTP generation request: its prompts (one per choice), options and timings."""

    endpoint: str  # "chat" or "completions"
    model: str
    params: SamplingParams
    prepared: list[PreparedPrompt]
    include_usage: bool
    want_logprobs: bool
    t0: float = field(default_factory=time.perf_counter)
    rid: str = ""
    created: int = field(default_factory=p.now)
    first_at: list[float | None] = field(default_factory=list)
    outputs: list[GenerationOutput | None] = field(default_factory=list)
    ended: bool = False
    plan: ChatPlan | None = None  # tools / JSON format: how to turn the text into a message


class GenerationRoutes:
    """The two generation endpoints over one engine.

    Args:
        state: the app's `ServerState` (engine, config, metrics, chunk store, admission gate).
    """

    def __init__(self, state) -> None:
        self.state = state
        self.engine = state.engine

    # ---- endpoints ---------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = p.parse_request(p.ChatCompletionRequest, await request.body())
        model = self.state.check_model(req.model)
        r.check_supported_chat(req)
        params = self._sampling(req, chat=True)
        prompt = r.chat_prompt(req, self.state.chunks)
        plan = None
        if r.needs_chat_plan(req):
            prompt, plan, constraint = await self._plan_chat(req, prompt)
            if constraint is not None:
                try:
                    params = dataclasses.replace(params, constraint=constraint)
                except (TypeError, ValueError) as exc:
                    raise APIError(400, str(exc), param=_field_of(exc)) from None
        run = _Run(
            "chat",
            model,
            params,
            [],
            include_usage=r.include_usage(req),
            want_logprobs=req.logprobs,
            rid=p.new_id("chatcmpl"),
            plan=plan,
        )
        return await self._serve(request, run, [prompt], "messages", stream=req.stream)

    async def _plan_chat(self, req: p.ChatCompletionRequest, prompt):
        """(prompt, ChatPlan or None, constraint) for tools, tool turns or a JSON format.

        With `chunk_ids` only a `response_format` applies (tools were refused): the chunks'
        composition stays as it is and only the constraint is added.
        """
        try:
            if req.chunk_ids is not None:
                return prompt, None, constraint_from_response_format(req.response_format)
            plan = await asyncio.to_thread(
                prepare_chat,
                self.engine,
                prompt,
                tools=req.tools,
                tool_choice=req.tool_choice,
                parallel_tool_calls=req.parallel_tool_calls,
                response_format=req.response_format,
            )
        except (TypeError, ValueError) as exc:
            param = "response_format" if req.chunk_ids is not None else _field_of(exc)
            raise APIError(400, str(exc), param=param) from None
        return plan.prompt, plan, plan.constraint

    async def completions(self, request: Request) -> Response:
        req = p.parse_request(p.CompletionRequest, await request.body())
        model = self.state.check_model(req.model)
        r.check_supported_completion(req)
        params = self._sampling(req, chat=False)
        prompts = r.completion_prompts(req.prompt)
        run = _Run(
            "completions",
            model,
            params,
            [],
            include_usage=r.include_usage(req),
            want_logprobs=req.logprobs is not None,
            rid=p.new_id("cmpl"),
        )
        return await self._serve(request, run, prompts, "prompt", stream=req.stream)

    # ---- the request path --------------------------------------------------------------

    async def _serve(
        self, request: Request, run: _Run, prompts: list, param: str, stream: bool
    ) -> Response:
        gate = self.state.gate
        gate.enter(len(prompts), run.endpoint)
        streams: list[AsyncIterator[StreamDelta]] = []
        handed_over = False
        try:
            run.prepared = [await self._prepare(x, param) for x in prompts]
            run.first_at = [None] * len(prompts)
            run.outputs = [None] * len(prompts)
            streams = [self.engine.astream(x, run.params) for x in run.prepared]
            firsts = await _until_disconnect(self._firsts(run, streams, param), request)
            if stream:
                handed_over = True
                return _Stream(
                    self._events(run, firsts, streams),
                    on_close=lambda: self._end_async(run, streams, len(prompts)),
                    drain_s=self.state.config.drain_timeout_s,
                )
            outs = await _until_disconnect(
                asyncio.gather(*(_last(d, s) for d, s in zip(firsts, streams))), request
            )
            run.outputs = list(outs)
            return JSONResponse(self._response(run, outs))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not handed_over:
                await self._end_async(run, streams, len(prompts))

    async def _prepare(self, prompt, param: str) -> PreparedPrompt:
        try:
            return await asyncio.to_thread(self.engine.prepare, prompt)
        except UnknownChunkError as exc:
            raise APIError(400, str(exc), param="chunk_ids", code="chunk_not_found") from None
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        except EngineClosedError as exc:
            raise APIError(503, f"the engine is closed: {exc}") from None

    async def _firsts(self, run: _Run, streams, param: str) -> list[StreamDelta]:
        """Each prompt's first delta (its first token); a refused prompt refuses them all."""

        async def first(i: int, s) -> StreamDelta:
            delta = await anext(s)
            run.first_at[i] = time.perf_counter()
            return delta

        results = await asyncio.gather(
            *(first(i, s) for i, s in enumerate(streams)), return_exceptions=True
        )
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                where = param if len(streams) == 1 else f"{param}[{i}]"
                raise _engine_error(res, where)
        return list(results)

    async def _events(self, run: _Run, firsts: list[StreamDelta], streams) -> AsyncIterator:
        """The SSE stream: OpenAI chunks in the order deltas arrive, then usage, [DONE]."""
        if run.endpoint == "chat":
            role = {"role": "assistant", "content": ""}
            yield json.dumps(
                p.chat_chunk(run.rid, run.model, run.created, role, with_usage=run.include_usage)
            )
        offsets = [0] * len(streams)
        merged = _merge(firsts, streams)
        parser = run.plan.stream_parser() if run.plan is not None else None
        try:
            async for i, delta in merged:
                if delta.finished:
                    run.outputs[i] = delta.output
                if parser is not None:
                    for chunk in self._plan_chunks(run, parser, delta):
                        yield json.dumps(chunk)
                elif delta.text or delta.logprobs or delta.finished:
                    yield json.dumps(self._chunk(run, i, delta, offsets))
                    offsets[i] += len(delta.text)
            if run.include_usage:
                obj = "chat.completion.chunk" if run.endpoint == "chat" else "text_completion"
                usage = _sum_usage([o.usage for o in run.outputs])
                yield json.dumps(p.usage_chunk(run.rid, run.model, run.created, obj, usage))
            yield "[DONE]"
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in band
            error = _engine_error(exc, "messages" if run.endpoint == "chat" else "prompt")
            if error.status >= 500:
                logger.warning("request %s failed while streaming: %r", run.rid, exc)
            yield json.dumps(error.body())
        finally:
            await merged.aclose()

    # ---- building responses ------------------------------------------------------------

    def _plan_chunks(self, run: _Run, parser, delta: StreamDelta) -> list[dict]:
        """Chat chunks of one engine delta when the answer may be a tool call: text is held
        back while it could still open a call; a call arrives whole in one `tool_calls` delta
        (each call with its `index`), then the chunk with the finish reason."""
        pieces = parser.feed(delta.text) if delta.text else []
        reason = None
        if delta.finished:
            rest, reason = parser.finish(delta.output.finish_reason)
            pieces += rest
        logprobs = None
        if run.want_logprobs and delta.logprobs:
            logprobs = p.chat_logprobs(delta.logprobs, self._decode)
        chunks = []
        for j, piece in enumerate(pieces):
            lp = logprobs if j == 0 else None
            chunks.append(
                p.chat_chunk(run.rid, run.model, run.created, piece, None, lp, run.include_usage)
            )
        if delta.finished:
            lp = logprobs if not pieces else None
            chunks.append(
                p.chat_chunk(run.rid, run.model, run.created, {}, reason, lp, run.include_usage)
            )
        return chunks

    def _chunk(self, run: _Run, i: int, delta: StreamDelta, offsets: list[int]) -> dict:
        reason = delta.output.finish_reason if delta.finished else None
        if run.endpoint == "chat":
            logprobs = None
            if run.want_logprobs and delta.logprobs:
                logprobs = p.chat_logprobs(delta.logprobs, self._decode)
            content = {"content": delta.text} if delta.text else {}
            return p.chat_chunk(
                run.rid, run.model, run.created, content, reason, logprobs, run.include_usage
            )
        logprobs = None
        if run.want_logprobs and delta.logprobs:
            logprobs = p.completion_logprobs(delta.logprobs, self._decode, offsets[i])
        choice = p.completion_choice(i, delta.text, reason, logprobs)
        return p.completion_chunk(run.rid, run.model, run.created, choice, run.include_usage)

    def _response(self, run: _Run, outs: list[GenerationOutput]) -> dict:
        if run.endpoint == "chat":
            (out,) = outs
            logprobs = None
            if run.want_logprobs:
                logprobs = p.chat_logprobs(out.logprobs or [], self._decode)
            message, reason = None, None
            if run.plan is not None:
                message, reason = run.plan.message(out.text, out.finish_reason)
            return p.chat_response(run.rid, run.model, run.created, out, logprobs, message, reason)
        choices = []
        for i, out in enumerate(outs):
            logprobs = None
            if run.want_logprobs:
                logprobs = p.completion_logprobs(out.logprobs or [], self._decode, 0)
            choices.append(p.completion_choice(i, out.text, out.finish_reason, logprobs))
        usage = _sum_usage([o.usage for o in outs])
        return p.completion_response(run.rid, run.model, run.created, choices, usage)

    def _sampling(self, req, chat: bool) -> SamplingParams:
        limit = self.state.config.max_tokens_limit
        return r.sampling_params(req, chat, limit, self.engine.vocab_size)

    def _decode(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    # ---- the end of a request ----------------------------------------------------------

    async def _end_async(self, run: _Run, streams, slots: int) -> None:
        """Close the engine streams (one not finished aborts its request and frees its KV
        pages), release the admission slots and record the metrics, once."""
        for s in streams:
            try:
                await s.aclose()
            except RuntimeError:  # still running in a cancelled task, which aborts it
                pass
        if run.ended:
            return
        run.ended = True
        self.state.gate.leave(slots)
        now = time.perf_counter()
        for i in range(slots):
            out = run.outputs[i] if i < len(run.outputs) else None
            first = run.first_at[i] if i < len(run.first_at) else None
            self.state.metrics.observe(
                run.endpoint,
                out.finish_reason if out is not None else ("abort" if first else "error"),
                usage=out.usage if out is not None else None,
                chunks=run.prepared[i].chunks if i < len(run.prepared) else (),
                ttft_s=None if first is None else first - run.t0,
                e2e_s=now - run.t0 if out is not None else None,
            )


class _Stream(EventSourceResponse):
    """An SSE response that runs `on_close` however it ends (done, disconnect, cancel)."""

    def __init__(self, content, on_close, drain_s: float) -> None:
        super().__init__(content, sep="\n", shutdown_grace_period=drain_s)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._on_close()


# ---- helpers ------------------------------------------------------------------------------


async def _last(first: StreamDelta, stream) -> GenerationOutput:
    delta = first
    while not delta.finished:
        delta = await anext(stream)
    return delta.output


async def _merge(firsts: list[StreamDelta], streams) -> AsyncIterator[tuple[int, StreamDelta]]:
    """(prompt index, delta) from every stream as they arrive, each stream to its end."""
    if len(streams) == 1:  # the usual case, without tasks
        delta = firsts[0]
        yield 0, delta
        while not delta.finished:
            delta = await anext(streams[0])
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        delta = firsts[i]
        try:
            await queue.put((i, delta))
            while not delta.finished:
                delta = await anext(streams[i])
                await queue.put((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            left -= item.finished
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(awaitable, request: Request):
    """Await `awaitable`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled as asked
        pass
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _engine_error(exc: BaseException, param: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineClosedError):
        return APIError(503, f"the engine is closed: {exc}")
    if isinstance(exc, UnknownChunkError):
        return APIError(400, str(exc), param="chunk_ids", code="chunk_not_found")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, f"{param}: {exc}", param=param)
    logger.error("request failed: %r", exc, exc_info=exc)
    return APIError(500, f"the request failed in the engine: {type(exc).__name__}: {exc}")


def _field_of(exc: BaseException) -> str | None:
    """The request field an error names first ("tools: ..." -> "tools")."""
    match = re.match(r"([a-z_][a-z0-9_]*)(?=[=:])", str(exc))
    return match[1] if match else None


def _sum_usage(usages: list[Usage]) -> Usage:
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        recomputed_tokens=sum(u.recomputed_tokens for u in usages),
    )
