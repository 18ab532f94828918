"""Tool calling and structured output for `ChatCascadeRAG`: LangChain's tool objects and
messages to the engine's OpenAI-shaped chat (`cascade_rag.openai_tools`), and the engine's
answer back to an `AIMessage` with `tool_calls`.

The grammar work is the engine's: this module only translates. It does not run tools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.utils.function_calling import convert_to_openai_tool

# Call arguments that are about tools and structured output, not sampling.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool dicts from LangChain tools, pydantic models, functions or dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def format_tool_choice(tool_choice: Any) -> Any:
    """LangChain's tool_choice spellings as the engine takes them ('any' is 'required')."""
    if tool_choice in ("any", True):
        return "required"
    if tool_choice is False:
        return "none"
    if isinstance(tool_choice, Mapping) and "name" in tool_choice and "function" not in tool_choice:
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    return tool_choice


def to_message(message: BaseMessage, text: str, role: str) -> dict[str, Any]:
    """An OpenAI-shaped chat message (tool calls and tool results included)."""
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = [
            {
                "id": c.get("id") or f"call_{i}",
                "type": "function",
                "function": {"name": c["name"], "arguments": c.get("args") or {}},
            }
            for i, c in enumerate(message.tool_calls)
        ]
        return {"role": "assistant", "content": text, "tool_calls": calls}
    if isinstance(message, ToolMessage):
        out = {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
        if message.name:
            out["name"] = message.name
        return out
    return {"role": role, "content": text}


def needs_plan(kwargs: Mapping[str, Any], messages: Sequence[BaseMessage]) -> bool:
    """Whether a call goes through `prepare_chat` (tools, a response format, or tool turns)."""
    if kwargs.get("tools") or kwargs.get("response_format"):
        return True
    return any(
        isinstance(m, ToolMessage) or (isinstance(m, AIMessage) and m.tool_calls) for m in messages
    )


def plan(engine, turns: list[dict[str, Any]], tool_kwargs: Mapping[str, Any]):
    """The `cascade_rag.openai_tools.ChatPlan` of one call."""
    from cascade_rag.openai_tools import prepare_chat

    tools = tool_kwargs.get("tools") or None
    parallel = tool_kwargs.get("parallel_tool_calls")
    return prepare_chat(
        engine,
        turns,
        tools=tools,
        tool_choice=format_tool_choice(tool_kwargs.get("tool_choice")) if tools else None,
        # a small model repeats a call when it may make several: one unless asked
        parallel_tool_calls=bool(parallel),
        response_format=tool_kwargs.get("response_format"),
    )


def ai_message(chat_plan, text: str, finish_reason: str | None, **extra: Any) -> AIMessage:
    """The `AIMessage` of a finished answer: content, `tool_calls`, `invalid_tool_calls`."""
    parsed = chat_plan.parse(text)
    _, reason = chat_plan.message(text, finish_reason)
    extra["response_metadata"] = {**extra.get("response_metadata", {}), "finish_reason": reason}
    if not parsed.tool_calls and not parsed.invalid_tool_calls:
        return AIMessage(content=text, **extra)
    return AIMessage(
        content=parsed.content,
        tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.tool_calls],
        invalid_tool_calls=[
            invalid_tool_call(name=c.name, args=c.text, id=None, error=c.error)
            for c in parsed.invalid_tool_calls
        ],
        **extra,
    )


def stream_end(parser, finish_reason: str | None, **extra: Any) -> AIMessageChunk:
    """The last streamed chunk: held-back text, and the calls as `tool_call_chunks`."""
    deltas, reason = parser.finish(finish_reason)
    extra["response_metadata"] = {**extra.get("response_metadata", {}), "finish_reason": reason}
    content = "".join(d.get("content") or "" for d in deltas)
    chunks = [
        tool_call_chunk(
            name=c["function"]["name"],
            args=c["function"]["arguments"],
            id=c["id"],
            index=c["index"],
        )
        for d in deltas
        for c in d.get("tool_calls", ())
    ]
    return AIMessageChunk(content=content, tool_call_chunks=chunks, **extra)
