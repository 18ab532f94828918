"""OpenAI chat-completions shapes for structured output and tools, as pure functions.

What an OpenAI-compatible server needs around the engine:

- `constraint_from_response_format(response_format)`: `{"type": "text" | "json_object" |
  "json_schema", ...}` to a `Constraint` (or None);
- `prepare_chat(engine, messages, tools=, tool_choice=, parallel_tool_calls=,
  response_format=)`: OpenAI messages (assistant `tool_calls` with JSON-text arguments, `tool`
  messages with `tool_call_id`) to a `ChatPlan`: the prompt for `engine.generate` /
  `astream`, the constraint for `SamplingParams`, and how to read the answer;
- `ChatPlan.message(text, finish_reason)`: the answer as OpenAI's assistant message
  (`content`, `tool_calls`) and finish reason (`"tool_calls"` when it called tools);
- `ChatPlan.stream_parser()`: a `ToolStreamParser` turning streamed text into OpenAI delta
  dicts: content deltas as they come while the answer is text, one `tool_calls` delta at the
  end when it is a call.

Errors are `ValueError` / `TypeError` whose message names the request field (`tools`,
`tool_choice`, `response_format`, `messages`), for a 400 response. This module holds no
server, HTTP or engine state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cascade_rag.sampling import Constraint
from cascade_rag.tools import (
    ParsedOutput,
    ToolPrompt,
    check_tool_choice,
    check_tools,
    close_objects,
    prepare_tools,
)


def response_format_schema(response_format: Mapping[str, Any] | None) -> dict | bool | None:
    """The JSON schema a `response_format` asks for: `{"type": "object"}` for json_object,
    the schema for json_schema, None for text (or None)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise TypeError("response_format must be an object such as {'type': 'json_object'}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec and "name" not in spec:
            raise ValueError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}"
            )
        schema = Constraint(json_schema=spec.get("schema", {})).json_schema  # a 400, not a 500
        # strict (OpenAI's structured outputs): no keys beyond the schema's properties
        return close_objects(schema) if spec.get("strict") else schema
    raise ValueError(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
        "'json_schema'"
    )


def constraint_from_response_format(response_format: Mapping[str, Any] | None) -> Constraint | None:
    """The `Constraint` of an OpenAI `response_format` (None for text).

    Example:
        >>> constraint_from_response_format({"type": "json_object"}).kind
        'json_object'
    """
    schema = response_format_schema(response_format)
    if schema is None:
        return None
    if schema == {"type": "object"} and response_format.get("type") == "json_object":
        return Constraint(json_object=True)
    return Constraint(json_schema=schema)


@dataclass(frozen=True)
class ChatPlan:
    """A chat request ready for the engine (see `prepare_chat`).

    Attributes:
        prompt: what to pass to `engine.generate` / `astream`.
        constraint: for `SamplingParams(constraint=...)`; None when nothing is constrained.
        tool_prompt: the `ToolPrompt` when tools are offered (tool_choice not 'none').
    """

    prompt: Any
    constraint: Constraint | None
    tool_prompt: ToolPrompt | None = None

    def parse(self, text: str) -> ParsedOutput:
        """Content and tool calls of an answer."""
        if self.tool_prompt is None:
            return ParsedOutput(text)
        return self.tool_prompt.parse(text)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(OpenAI assistant message, OpenAI finish_reason) of a finished answer.

        A call that was cut short (finish_reason "length") is returned as content text.
        """
        parsed = self.parse(text)
        if not parsed.tool_calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {
            "role": "assistant",
            "content": parsed.content or None,
            "tool_calls": [c.to_openai() for c in parsed.tool_calls],
        }
        return message, ("tool_calls" if finish_reason == "stop" else finish_reason)

    def stream_parser(self) -> ToolStreamParser:
        """A parser of this request's streamed text into OpenAI chunk deltas."""
        return ToolStreamParser(self)


class ToolStreamParser:
    """Streamed answer text to OpenAI `choices[0].delta` dicts.

    `feed(text)` returns the deltas to send now: `{"content": ...}` pieces while the answer is
    plain text (text that could still become a call's opening is held back); `finish(reason)`
    returns the remaining deltas and the finish reason: one `{"tool_calls": [...]}` delta
    (each call with its `index`) when the answer was a call.
    """

    def __init__(self, plan: ChatPlan) -> None:
        self._plan = plan
        fmt = plan.tool_prompt.format if plan.tool_prompt is not None else None
        self._opener = (fmt.open.strip() or "{") if fmt is not None else ""
        self._text = ""
        self._mode = "text" if not self._opener else "undecided"

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._text += text
        if self._mode == "undecided":
            head = self._text.lstrip()
            if head.startswith(self._opener):
                self._mode = "call"
            elif not self._opener.startswith(head):
                self._mode = "text"
                return [{"content": self._text}]
            return []
        if self._mode == "text" and text:
            return [{"content": text}]
        return []

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        message, reason = self._plan.message(self._text, finish_reason)
        if "tool_calls" in message:
            calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
            deltas: list[dict[str, Any]] = [{"tool_calls": calls}]
            if message["content"]:
                deltas.insert(0, {"content": message["content"]})
            return deltas, reason
        if self._mode != "text" and self._text:  # held-back text that never became a call
            return [{"content": self._text}], reason
        return [], reason


def prepare_chat(
    engine,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> ChatPlan:
    """An OpenAI chat request's prompt and constraint.

    Args:
        engine: the `CascadeEngine`.
        messages: OpenAI messages (`content` may be None for assistant tool calls; `tool`
            messages carry `tool_call_id`). Content parts must already be joined into text.
        tools, tool_choice, parallel_tool_calls: OpenAI's fields (tool_choice defaults to
            'auto' with tools; parallel_tool_calls to True).
        response_format: OpenAI's field; with tools it constrains the non-call answer.

    Raises:
        ValueError / TypeError: a bad field; the message starts with the field's name.

    Example:
        >>> plan = prepare_chat(engine, [{"role": "user", "content": "Weather in Plum?"}],
        ...                     tools=[weather], tool_choice="required")
        >>> out = engine.generate(plan.prompt, SamplingParams(constraint=plan.constraint))
        >>> plan.message(out.text, out.finish_reason)[1]
        'tool_calls'
    """
    try:
        text_schema = response_format_schema(response_format)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"response_format: {exc}") from None
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice: {tool_choice!r} needs tools")
        tools, tool_choice = (), "none"  # earlier calls and results still render as turns
    try:
        checked = check_tools(tools)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"tools: {exc}") from None
    try:
        mode, _ = check_tool_choice(tool_choice, checked)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"tool_choice: {exc}") from None
    try:
        tp = prepare_tools(
            engine,
            messages,
            checked,
            tool_choice,
            parallel_tool_calls=True if parallel_tool_calls is None else parallel_tool_calls,
            text_schema=text_schema,
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"messages: {exc}") from None
    return ChatPlan(tp.prompt, tp.constraint, tp if mode != "none" else None)
