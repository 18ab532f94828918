"""Tools rendered into a chat: the model's chat template where it takes `tools`, otherwise
`DEFAULT_TOOL_PROMPT` in the system message; earlier calls and tool results as turns.

`prepare_tools` is the entry point (re-exported by `cascade_rag.tools`, which documents the
call formats and grammars). Message contents, tool results and, with the default prompt, the
tool definitions and earlier calls are tokenized as text, never as control tokens; with a
template that takes tools, definitions and calls are template text, so they are refused if
they hold control-token strings.

This module does not build grammars or parse answers (tools.py does).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cascade_rag.sampling import Constraint
from cascade_rag.tools import (
    HERMES,
    LLAMA_JSON,
    ParsedOutput,
    Tool,
    ToolCall,
    ToolCallFormat,
    check_tool_choice,
    check_tools,
    new_call_id,
    parse_tool_calls,
    tool_constraint,
)

DEFAULT_TOOL_PROMPT = """You can call functions. They are listed as JSON schemas in <tools></tools>:
<tools>
{tools}
</tools>
{instruction} To call a function, answer with nothing but one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""
"""The system-prompt text that presents tools to a model whose chat template takes none
(SmolLM2's, for one): `{tools}` is one JSON line per tool (OpenAI's function shape),
`{instruction}` depends on `tool_choice`."""

_INSTRUCTIONS = {
    "auto": "Call a function when it helps to answer; otherwise answer in plain text.",
    "required": "You must call one or more of the functions.",
    "function": "You must call the function {name}.",
}


@dataclass(frozen=True)
class ToolPrompt:
    """What `prepare_tools` returns: the prompt, its constraint, and how to read the answer.

    Attributes:
        prompt: chat messages (default prompt) or a `PreparedPrompt` (the chat template
            rendered with `tools`), to pass to `engine.generate` / `stream`.
        constraint: put it in `SamplingParams(constraint=...)`; None for tool_choice 'none'.
        tools: the tools offered.
        format: how calls are written.
        tool_choice: 'auto', 'required', 'none' or 'function'.
        uses_template: whether the chat template rendered the tools.
    """

    prompt: Any
    constraint: Constraint | None
    tools: tuple[Tool, ...]
    format: ToolCallFormat
    tool_choice: str
    uses_template: bool

    def parse(self, text: str) -> ParsedOutput:
        """The answer's content and tool calls (none for tool_choice 'none')."""
        if self.tool_choice == "none":
            return ParsedOutput(text)
        return parse_tool_calls(text, self.tools, self.format)


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` argument."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = Tool("cascade_rag_probe_tool", "probe").to_openai()
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that fails on tools does not take them
        return False
    return "cascade_rag_probe_tool" in text


def call_format(tokenizer) -> ToolCallFormat:
    """`HERMES` unless the chat template takes tools and does not mention `<tool_call>`."""
    if template_supports_tools(tokenizer) and "<tool_call>" not in str(tokenizer.chat_template):
        return LLAMA_JSON
    return HERMES


def prepare_tools(
    engine,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any] | Tool],
    tool_choice: Any = "auto",
    parallel_tool_calls: bool = True,
    text_schema: Mapping[str, Any] | None = None,
) -> ToolPrompt:
    """Render `tools` into the chat and build the call grammar.

    Args:
        engine: the `CascadeEngine` (its tokenizer, chat template and chunk registry).
        messages: chat messages, `{"role", "content"}`; assistant messages may carry
            `tool_calls` (`ToolCall`s or OpenAI dicts, arguments as a dict or JSON text) and
            tool results are `{"role": "tool", "content", "tool_call_id"}` (optional `name`).
        tools: `Tool`s or OpenAI tool dicts.
        tool_choice: 'auto', 'required', 'none', a tool name or OpenAI's named form.
        parallel_tool_calls: allow several calls in one answer.
        text_schema: a JSON schema for a non-call answer (see `tool_constraint`).

    Returns:
        a `ToolPrompt`; generate from `.prompt` with `.constraint`, read the text with
        `.parse`.

    Raises:
        ValueError / TypeError: bad tools, tool_choice or messages; a tool definition or call
            that holds control-token strings where the chat template would parse them.

    Example:
        >>> tp = prepare_tools(engine, [{"role": "user", "content": "Weather in Plum?"}],
        ...                    [weather_tool], tool_choice="required")
        >>> out = engine.generate(tp.prompt, SamplingParams(constraint=tp.constraint))
        >>> tp.parse(out.text).tool_calls[0].name
        'get_weather'
    """
    tools = check_tools(tools)
    mode, name = check_tool_choice(tool_choice, tools)
    fmt = call_format(engine.tokenizer)
    constraint = tool_constraint(tools, tool_choice, fmt, parallel_tool_calls, text_schema)
    msgs = _check_messages(messages)
    use_template = mode != "none" and template_supports_tools(engine.tokenizer)
    if use_template:
        prompt = _render_with_template(engine, msgs, tools)
    else:
        prompt = _default_messages(msgs, tools if mode != "none" else (), mode, name, fmt)
    return ToolPrompt(prompt, constraint, tools, fmt, mode, use_template)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with `tool_calls` as OpenAI dicts (arguments as dicts) and str contents."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"message {i} must be a dict with a str 'role'")
        m = dict(m)
        m["content"] = m.get("content") or ""
        calls = []
        for c in m.get("tool_calls") or ():
            if isinstance(c, ToolCall):
                calls.append(c)
                continue
            fn = c.get("function", c) if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ValueError(f"message {i}: a tool call needs a function name, got {c!r:.80}")
            args = fn.get("arguments", fn.get("args", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise ValueError(
                        f"message {i}: the arguments of {fn['name']} are not JSON: {args!r:.80}"
                    ) from None
            calls.append(ToolCall(fn["name"], dict(args), c.get("id") or new_call_id()))
        if calls:
            m["tool_calls"] = calls
        else:
            m.pop("tool_calls", None)
        out.append(m)
    return out


def _call_text(call: ToolCall, fmt: ToolCallFormat) -> str:
    body = json.dumps({"name": call.name, fmt.arguments_key: call.arguments}, ensure_ascii=False)
    return fmt.open + body + fmt.close


def _default_messages(
    msgs: list[dict[str, Any]],
    tools: Sequence[Tool],
    mode: str,
    name: str | None,
    fmt: ToolCallFormat,
) -> list[dict[str, str]]:
    """Plain {"role", "content"} messages: tools in the system turn, calls and results as
    text, so every byte of them is tokenized as text."""
    names = {c.id: c.name for m in msgs for c in m.get("tool_calls", ())}
    out: list[dict[str, str]] = []
    for m in msgs:
        role, content = m["role"], m["content"]
        if role == "assistant" and m.get("tool_calls"):
            blocks = fmt.separator.join(_call_text(c, fmt) for c in m["tool_calls"])
            content = f"{content}\n{blocks}" if content else blocks
        if role == "tool":
            result = {
                "name": m.get("name") or names.get(m.get("tool_call_id"), ""),
                "content": content,
            }
            block = (
                "<tool_response>\n" + json.dumps(result, ensure_ascii=False) + "\n</tool_response>"
            )
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool": True})
            continue
        out.append({"role": role, "content": content})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        listing = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
        instruction = _INSTRUCTIONS[mode].format(name=name)
        block = DEFAULT_TOOL_PROMPT.format(tools=listing, instruction=instruction)
        if fmt is not HERMES:  # a template with its own format; the default asks for Hermes
            block = block.replace("<tool_call>\n", "").replace("\n</tool_call>", "")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _render_with_template(engine, msgs: list[dict[str, Any]], tools: Sequence[Tool]):
    """The chat template rendered with `tools`, tokenized as the composer tokenizes chats:
    message contents as text, control tokens only from template text. The part before the
    first non-system message (system prompt and tool definitions) becomes a cached chunk."""
    from cascade_rag.chunks import ChunkType
    from cascade_rag.composition import check_text
    from cascade_rag.engine.sequence import PreparedPrompt

    text_tok = engine.composer.text
    tool_dicts = [t.to_openai() for t in tools]
    for t in tool_dicts:
        if text_tok.contains_control(json.dumps(t, ensure_ascii=False)):
            raise ValueError(
                f"tool {t['function']['name']} holds a control-token string, which the chat "
                "template would turn into a control token; remove it"
            )
    template_msgs = []
    for i, m in enumerate(msgs):
        check_text(m["content"], f"message {i} content")
        m = dict(m)
        if m.get("tool_calls"):
            calls = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m["tool_calls"]
            ]
            if text_tok.contains_control(json.dumps(calls, ensure_ascii=False)):
                raise ValueError(f"message {i}: a tool call holds a control-token string")
            m["tool_calls"] = calls
        template_msgs.append(m)
    tok = engine.tokenizer
    nonce = secrets.token_hex(8)
    marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    placeholders = [
        {**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(template_msgs)
    ]
    kwargs = {"tools": tool_dicts, "tokenize": False, "add_generation_prompt": True}
    skeleton = tok.apply_chat_template(placeholders, **kwargs)
    rendered = tok.apply_chat_template(template_msgs, **kwargs)
    pieces = marker.split(skeleton)
    parts: list[tuple[str, bool]] = [(pieces[0], True)]
    pos, ok = len(pieces[0]), rendered.startswith(pieces[0])
    first_turn_end = None  # character offset where the first non-system content starts
    for k in range(1, len(pieces), 2):
        if not ok:
            break
        index = int(pieces[k])
        content, after = template_msgs[index]["content"], pieces[k + 1]
        if first_turn_end is None and template_msgs[index]["role"] != "system":
            first_turn_end = pos
        for shown in dict.fromkeys((content, content.strip())):
            if rendered.startswith(shown + after, pos):
                parts += [(shown, False), (after, True)]
                pos += len(shown) + len(after)
                break
        else:
            ok = False
    if not ok or pos != len(rendered):
        raise ValueError(
            "the chat template changes message contents in a way that cannot be followed, so "
            "template text cannot be told from contents; tools cannot be rendered with it"
        )
    ids, ends = text_tok.encode_parts([p for p in parts if p[0]])
    cut = 0
    if first_turn_end is not None and engine.config.enable_chunk_cache:
        # tokens that end before the first turn's content: the same for every later question
        cut = sum(1 for e in ends if e <= first_turn_end)
    if 0 < cut < len(ids):
        chunk = engine.registry.chunk_for(ids[:cut], ChunkType.CONTEXT)
        return PreparedPrompt(chunks=(chunk,), tail_ids=tuple(ids[cut:]))
    return PreparedPrompt(chunks=(), tail_ids=tuple(ids))
