"""The OpenAI wire format: request models, the error format, and response builders.

Requests are pydantic models validated strictly from the JSON body (a string is not a number,
`true` is not an integer), so a bad field gets a 400 whose message and `param` name it, in
OpenAI's error format `{"error": {"message", "type", "param", "code"}}`. Unknown fields are
ignored, as vLLM and llama.cpp do. Besides OpenAI's fields, completions and chat take vLLM's
sampling extras (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `include_stop_str_in_output`), and chat takes `chunk_ids`: ids of chunks
registered with `POST /v1/chunks`, placed between the system message and the user message.

Responses are plain dicts in OpenAI's shapes (cheaper than models for a stream of chunks).
This module does not talk to the engine (generation.py does).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade_rag.outputs import GenerationOutput, StreamDelta, Usage
from cascade_rag.sampling import TokenLogprob

# ---- errors ----------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered in OpenAI's format.

    Args:
        status: HTTP status code.
        message: what went wrong and how to fix it.
        param: the request field at fault, if one is.
        code: a machine-readable code such as "model_not_found".
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def parse_request(model: type[_Request], body: bytes) -> Any:
    """Validate a JSON body into `model`; raises `APIError(400)` naming the field at fault."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    param = _param(first["loc"])
    # a union field fails once per member: say every way it could have been right
    msgs = [e["msg"] for e in errors if _param(e["loc"]) == param]
    detail = " or ".join(dict.fromkeys(msgs))
    value = first.get("input")
    shown = "" if first["type"] == "missing" else f" (got {json.dumps(value)[:60]})"
    return APIError(400, f"{param}: {detail}{shown}", param=param)


def _param(loc: tuple) -> str:
    """`messages[0].role` from pydantic's ('messages', 0, 'role'); union tags are dropped."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _FIELD_NAMES:
            out += f".{item}" if out else item
        else:
            break
    return out or "body"


# ---- requests ---------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chunk_ids: list[str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChunkCreateRequest(_Request):
    text: str | None = None
    token_ids: list[int] | None = None
    type: str = "rag_result"
    metadata: dict[str, Any] | None = None


class ChainRequest(_Request):
    system: str | None = None
    prefix: list[str] = Field(default_factory=list)


_FIELD_NAMES = frozenset(
    name
    for model in (
        ChatCompletionRequest,
        CompletionRequest,
        ChatMessage,
        TextPart,
        StreamOptions,
        ChunkCreateRequest,
        ChainRequest,
    )
    for name in model.model_fields
)


# ---- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage_dict(usage: Usage) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is always filled."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def chat_logprobs(items: list[TokenLogprob], decode) -> dict:
    """Chat `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""

    def entry(token_id: int, logprob: float) -> dict:
        text = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(lp.token_id, lp.logprob),
                "top_logprobs": [entry(t, v) for t, v in lp.top],
            }
            for lp in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob], decode, text_offset: int) -> dict:
    """Completions `logprobs`: parallel lists of tokens, log-probabilities and offsets."""
    tokens, offsets = [], []
    for lp in items:
        tokens.append(decode(lp.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{decode(t): v for t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


def chat_response(
    rid: str,
    model: str,
    created: int,
    out: GenerationOutput,
    logprobs: dict | None,
    message: dict | None = None,
    finish_reason: str | None = None,
) -> dict:
    """A chat.completion; `message` / `finish_reason` replace the plain text answer's (a
    tool-calling answer: `tool_calls` and finish_reason "tool_calls")."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message or {"role": "assistant", "content": out.text},
                "logprobs": logprobs,
                "finish_reason": finish_reason or out.finish_reason,
            }
        ],
        "usage": usage_dict(out.usage),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict:
    chunk = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: Usage) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, usage."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_dict(usage),
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict | None
) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(
    rid: str, model: str, created: int, choices: list[dict], usage: Usage
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_dict(usage),
    }


def completion_chunk(
    rid: str, model: str, created: int, choice: dict, with_usage: bool = False
) -> dict:
    chunk = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def delta_has_content(delta: StreamDelta) -> bool:
    return bool(delta.text) or bool(delta.logprobs)
