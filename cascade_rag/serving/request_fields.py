"""OpenAI request fields -> engine inputs: `SamplingParams`, chat prompts, completion prompts.

Fields the engine cannot honour (n > 1, logit_bias, echo, suffix, best_of > 1) are refused with
a 400 naming them rather than ignored. `tools`, `tool_choice` and JSON `response_format`s are
served under constrained decoding (cascade_rag.openai_tools). Messages with role
"developer" are system messages; content given as a list of text parts is joined.

This module does not validate JSON (protocol.py) or run anything (generation.py).
"""

from __future__ import annotations

import re

from cascade_rag.composition import ChunkId, Composition
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.sampling import SamplingParams
from cascade_rag.serving import protocol as p
from cascade_rag.serving.protocol import APIError

_FIELD_RE = re.compile(r"^(?:stop string|(\w+))")


def sampling_params(req, chat: bool, max_tokens_limit: int, vocab_size: int) -> SamplingParams:
    """The engine's `SamplingParams` for a request's fields (OpenAI defaults where absent:
    temperature 1, top_p 1, max_tokens the server's limit); 400 naming the field at fault."""
    limit = max_tokens_limit
    name, max_tokens = "max_tokens", req.max_tokens
    if chat and req.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(
            400,
            f"{name}={max_tokens} is above this server's limit of {limit} "
            "(cascade-rag serve --max-tokens-limit)",
            param=name,
        )
    if chat:
        logprobs = None
        if req.logprobs:
            logprobs = req.top_logprobs or 0
        elif req.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    else:
        logprobs = req.logprobs
    kwargs = {
        "max_tokens": limit if max_tokens is None else max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": 0 if req.top_k is None else req.top_k,
        "min_p": 0.0 if req.min_p is None else req.min_p,
        "seed": req.seed,
        "stop": () if req.stop is None else req.stop,
        "stop_token_ids": req.stop_token_ids or (),
        "ignore_eos": req.ignore_eos,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "min_tokens": req.min_tokens or 0,
        "logprobs": logprobs,
    }
    try:
        params = SamplingParams(**kwargs)
        params.check_vocab(vocab_size)
    except (TypeError, ValueError) as exc:
        match = _FIELD_RE.match(str(exc))
        field_name = "stop" if match and match.group(1) is None else (match and match[1])
        message = str(exc)
        renames = {"max_tokens": name, "logprobs": "top_logprobs" if chat else "logprobs"}
        if field_name in renames:  # the engine's name for it -> the request's
            message = renames[field_name] + message[len(field_name) :]
            field_name = renames[field_name]
        raise APIError(400, message, param=field_name or None) from None
    return params


def chat_prompt(req: p.ChatCompletionRequest, store):
    """Chat messages for the engine, or with `chunk_ids` a `Composition` [system message,
    registered chunks from `store`, user message]."""
    messages = []
    for i, m in enumerate(req.messages):
        if m.role == "assistant" and m.content is None and not m.tool_calls:
            raise APIError(
                400,
                f"messages[{i}]: an assistant message needs content or tool_calls",
                param=f"messages[{i}].content",
            )
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": m.text() if m.content is not None else None}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    if req.chunk_ids is None:
        return messages
    system = None
    rest = messages
    if messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    if len(rest) != 1 or rest[0]["role"] != "user":
        raise APIError(
            400,
            "with chunk_ids, messages must be one user message, optionally after one "
            "system message; the chunks go between them (send earlier turns inside the "
            "user message, or leave chunk_ids out)",
            param="messages",
        )
    chunks = [ChunkId(store.get(cid, param="chunk_ids").id) for cid in req.chunk_ids]
    return Composition(query=rest[0]["content"], chunks=chunks, system=system)


def include_usage(req) -> bool:
    return bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)


def _check_supported(req) -> None:
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: this server returns one choice per prompt (n=1)", "n")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream=true", param="stream_options")


def check_supported_chat(req: p.ChatCompletionRequest) -> None:
    _check_supported(req)
    if req.chunk_ids is not None and (req.tools or uses_tool_turns(req)):
        raise APIError(
            400,
            "tools cannot be combined with chunk_ids; send the documents in the messages",
            param="tools",
        )
    if req.logprobs is False and req.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def check_supported_completion(req: p.CompletionRequest) -> None:
    _check_supported(req)
    if req.echo:
        raise APIError(400, "echo=true is not supported by this server", param="echo")
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of must be 1 on this server", param="best_of")


def completion_prompts(prompt) -> list:
    """The engine prompts of a completions `prompt`: text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty; pass text or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [_token_prompt(prompt, "prompt")]
    if isinstance(prompt[0], list):
        return [_token_prompt(ids, f"prompt[{i}]") for i, ids in enumerate(prompt)]
    return list(prompt)


def _token_prompt(ids: list[int], param: str) -> PreparedPrompt:
    if not ids:
        raise APIError(400, f"{param} has no token ids", param=param)
    return PreparedPrompt(chunks=(), tail_ids=tuple(ids))


def uses_tool_turns(req: p.ChatCompletionRequest) -> bool:
    """Whether the conversation holds tool calls or tool results (rendered as tool turns)."""
    return any(m.role == "tool" or m.tool_calls for m in req.messages)


def needs_chat_plan(req: p.ChatCompletionRequest) -> bool:
    """Whether the request needs `openai_tools.prepare_chat`: tools, tool turns, or a JSON
    response format."""
    fmt = req.response_format
    return (
        bool(req.tools)
        or req.tool_choice not in (None, "none", "auto")
        or uses_tool_turns(req)
        or (fmt is not None and fmt.get("type") != "text")
    )
