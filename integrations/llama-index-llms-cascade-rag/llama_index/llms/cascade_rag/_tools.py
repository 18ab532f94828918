"""Function calling for `CascadeRAG`: LlamaIndex tools and messages to the engine's
OpenAI-shaped chat (`cascade_rag.openai_tools`), the answer back to `ToolCallBlock`s.

Tool calls are decoded under the engine's grammar of the tools' schemas; this module only
translates. It does not run tools (LlamaIndex's agents and `predict_and_call` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection

# per-call arguments about tools (set by `_prepare_chat_with_tools`), not sampling
TOOL_KWARGS = ("tools", "tool_choice", "parallel_tool_calls")


def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool dicts of LlamaIndex tools (their `metadata.to_openai_tool()`)."""
    return [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]


def message_calls(message: ChatMessage) -> list[dict[str, Any]]:
    """The tool calls an assistant message made, as OpenAI dicts (arguments as dicts)."""
    calls = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            calls.append(
                {
                    "id": block.tool_call_id or f"call_{len(calls)}",
                    "type": "function",
                    "function": {"name": block.tool_name, "arguments": block.tool_kwargs},
                }
            )
    for c in message.additional_kwargs.get("tool_calls") or ():
        if isinstance(c, dict):
            calls.append(c)
    return calls


def tool_message_fields(message: ChatMessage) -> dict[str, Any]:
    """`tool_call_id` / `name` of a tool result message."""
    kw = message.additional_kwargs
    out = {"tool_call_id": kw.get("tool_call_id") or kw.get("tool_id") or ""}
    if kw.get("name"):
        out["name"] = kw["name"]
    return out


def is_tool_turn(message: ChatMessage) -> bool:
    return message.role == MessageRole.TOOL or bool(message_calls(message))


def reply_message(chat_plan, text: str, finish_reason: str | None) -> ChatMessage:
    """The assistant `ChatMessage`: text content and a `ToolCallBlock` per call."""
    parsed = chat_plan.parse(text)
    if not parsed.tool_calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    blocks: list[Any] = [TextBlock(text=parsed.content)] if parsed.content else []
    blocks += [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
        for c in parsed.tool_calls
    ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    return [
        ToolSelection(
            tool_id=b.tool_call_id or "",
            tool_name=b.tool_name,
            tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {},
        )
        for b in message.blocks
        if isinstance(b, ToolCallBlock)
    ]
