"""Tool calling: tools in the prompt, a grammar that admits text or valid calls, parsed calls.

`prepare_tools(engine, messages, tools, tool_choice)` returns a `ToolPrompt`: the prompt to
generate from (the tools rendered with the model's chat template when the template takes
`tools`, otherwise with `DEFAULT_TOOL_PROMPT` in the system message), and a `Constraint` under
which the model writes either plain text or one or more calls of the given tools whose
arguments are valid against their JSON schemas:

- `tool_choice="auto"`: plain text, or calls (the output starts with a call);
- `"required"`: one or more calls; a tool's name (or `{"type": "function", "function":
  {"name": ...}}`): exactly one call of that tool;
- `"none"`: the tools are left out of the prompt and nothing is constrained.

Calls are written in the Hermes format that Qwen2/2.5/3 and SmolLM3 use (and this package's
default prompt asks for):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Plum"}}
    </tool_call>

or, for chat templates that take tools but do not use `<tool_call>` (Llama 3.1/3.2), as one
JSON object `{"name": ..., "parameters": {...}}`. `ToolPrompt.parse(text)` turns the output
into text content and `ToolCall`s. Earlier turns go in as messages: an assistant message with
`tool_calls` (`ToolCall`s or OpenAI-shaped dicts) and `{"role": "tool", "content": ...,
"tool_call_id": ...}` results, rendered by the template or, by default, as
`<tool_response>` blocks in a user turn.

This module does not run tools, talk to a server, or speak LangChain / LlamaIndex (the
integrations translate their tool objects into `Tool`s); OpenAI request and response shapes
are in `cascade_rag.openai_tools`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade_rag.sampling import JSON_OPTIONS, Constraint

MAX_PARALLEL_CALLS = 8
"""Most calls one answer may hold (a bound, so a small model cannot loop on calls)."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    Attributes:
        name: The function's name (letters, digits, `_`, `-`, `.`; at most 64 characters).
        description: What it does, shown to the model.
        parameters: JSON schema of its arguments, an object schema (checked by compiling it).

    Example:
        >>> Tool("get_weather", "Weather in a city",
        ...      {"type": "object", "properties": {"city": {"type": "string"}}})
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name):
            raise ValueError(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'"
            )
        if not isinstance(self.description, str):
            raise TypeError(f"tool {self.name}: description must be a str")
        params = Constraint(json_schema=self.parameters).json_schema  # JSON-only copy, checked
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ValueError(
                f"tool {self.name}: parameters must be an object schema "
                f'({{"type": "object", "properties": ...}}), got {self.parameters!r:.80}'
            )
        object.__setattr__(self, "parameters", params)

    @classmethod
    def from_openai(cls, spec: Mapping[str, Any] | Tool) -> Tool:
        """A `Tool` from OpenAI's `{"type": "function", "function": {name, description,
        parameters}}` or the bare function dict."""
        if isinstance(spec, Tool):
            return spec
        if not isinstance(spec, Mapping):
            raise TypeError(f"a tool must be a dict or a Tool, got {type(spec).__name__}")
        if spec.get("type", "function") != "function":
            raise ValueError(f"tool type {spec.get('type')!r} is not supported; use 'function'")
        fn = spec.get("function", spec)
        if not isinstance(fn, Mapping) or "name" not in fn:
            raise ValueError(f"a tool needs a function name, got {dict(spec)!r:.120}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return cls(fn["name"], fn.get("description") or "", params)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's tool shape (what chat templates take as `tools`)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def new_call_id() -> str:
    """A fresh tool call id, `call_` and 24 hex digits (OpenAI's shape)."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments (a dict)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's tool call shape (arguments as JSON text)."""
        args = json.dumps(self.arguments, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": args},
        }


@dataclass(frozen=True)
class InvalidToolCall:
    """Text that looked like a call but is not one (e.g. cut by `max_tokens`)."""

    text: str
    error: str
    name: str | None = None


@dataclass(frozen=True)
class ToolCallFormat:
    """How calls are written: `open` + JSON object + `close`, calls joined by `separator`."""

    name: str
    open: str
    close: str
    arguments_key: str
    separator: str
    parallel: bool


HERMES = ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n", True)
LLAMA_JSON = ToolCallFormat("json", "", "", "parameters", "", False)


@dataclass(frozen=True)
class ParsedOutput:
    """A generated answer split into text content and tool calls."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()


def parse_tool_calls(
    text: str, tools: Sequence[Tool] = (), fmt: ToolCallFormat = HERMES
) -> ParsedOutput:
    """Split `text` into content and the calls in it (any position, for unconstrained text).

    A call whose JSON does not parse, names no given tool (when `tools` is not empty) or has
    no argument object becomes an `InvalidToolCall`.

    Example:
        >>> parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
        ParsedOutput(content='', tool_calls=(ToolCall(name='f', arguments={'x': 1}, ...),), ...)
    """
    names = {t.name for t in tools}
    if fmt.open:
        pattern = re.compile(
            re.escape(fmt.open.strip()) + r"\s*(.*?)\s*(?:" + re.escape(fmt.close.strip()) + "|$)",
            re.DOTALL,
        )
        blocks = [(m.start(), m.end(), m.group(1)) for m in pattern.finditer(text)]
    else:
        stripped = text.strip()
        blocks = [(0, len(text), stripped)] if stripped.startswith("{") else []
    calls, invalid, content, pos = [], [], [], 0
    for start, end, body in blocks:
        content.append(text[pos:start])
        pos = end
        call, error = _read_call(body, names, fmt)
        if call is not None:
            calls.append(call)
        elif fmt.open or blocks:
            invalid.append(InvalidToolCall(text[start:end], error, _name_of(body)))
    content.append(text[pos:])
    return ParsedOutput("".join(content).strip(), tuple(calls), tuple(invalid))


def _read_call(body: str, names: set[str], fmt: ToolCallFormat) -> tuple[ToolCall | None, str]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return None, f"the call is not valid JSON: {exc}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, "the call is not a JSON object with a string 'name'"
    args = obj.get(fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if not isinstance(args, dict):
        return None, f"the arguments of {obj['name']} are not a JSON object"
    if names and obj["name"] not in names:
        return None, f"there is no tool named {obj['name']!r}"
    return ToolCall(obj["name"], args), ""


def _name_of(body: str) -> str | None:
    m = re.search(r'"name"\s*:\s*"([^"]*)"', body)
    return m.group(1) if m else None


# ---- tool_choice and the grammar ----------------------------------------------------------


def check_tools(tools: Sequence[Mapping[str, Any] | Tool]) -> tuple[Tool, ...]:
    """`Tool`s from `Tool`s or OpenAI dicts; names must be unique."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of tools, got {type(tools).__name__}")
    out = tuple(Tool.from_openai(t) for t in tools)
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise ValueError(f"two tools are named {t.name!r}; tool names must be unique")
        seen.add(t.name)
    return out


def check_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> tuple[str, str | None]:
    """(mode, tool name): mode is 'auto', 'required', 'none' or 'function' (a named tool).

    Accepts 'auto', 'required' (also 'any'), 'none', a tool's name, `True` (required),
    None (auto), and OpenAI's `{"type": "function", "function": {"name": ...}}`.
    """
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice is True or tool_choice == "any":
        tool_choice = "required"
    names = [t.name for t in tools]
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function") or {}
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                f"tool_choice {dict(tool_choice)!r} must look like "
                '{"type": "function", "function": {"name": ...}}'
            )
        tool_choice = name
        if name in ("auto", "required", "none"):
            raise ValueError(f"tool_choice names a function called {name!r}; rename the tool")
    if not isinstance(tool_choice, str):
        raise TypeError(f"tool_choice must be a str or a dict, got {type(tool_choice).__name__}")
    if tool_choice in ("auto", "required", "none"):
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs at least one tool")
        return tool_choice, None
    if tool_choice not in names:
        raise ValueError(
            f"tool_choice={tool_choice!r} names no given tool; use 'auto', 'required', 'none' "
            f"or one of {names}"
        )
    return "function", tool_choice


def tool_constraint(
    tools: Sequence[Tool],
    tool_choice: Any = "auto",
    fmt: ToolCallFormat = HERMES,
    parallel_tool_calls: bool = True,
    text_schema: Mapping[str, Any] | None = None,
) -> Constraint | None:
    """The `Constraint` that admits text (for 'auto') or calls of `tools` with valid arguments.

    Args:
        tools: the tools.
        tool_choice: see `check_tool_choice`; 'none' returns None (or the `text_schema`
            constraint).
        fmt: how calls are written (`HERMES` or `LLAMA_JSON`).
        parallel_tool_calls: allow up to `MAX_PARALLEL_CALLS` calls in one answer (the
            format permitting); False allows one.
        text_schema: a JSON schema the non-call answer must follow instead of free text (a
            `response_format` next to tools).

    Free text is any text that does not start with the call's opening (`<tool_call>` or
    `{`); stop strings apply to it until a call begins (`Constraint.stop_after`).
    """
    mode, name = check_tool_choice(tool_choice, tools)
    if mode == "none":
        return Constraint(json_schema=text_schema) if text_schema is not None else None
    chosen = [t for t in tools if mode != "function" or t.name == name]
    rules = []
    for i, tool in enumerate(chosen):
        schema = {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                fmt.arguments_key: close_objects(tool.parameters),
            },
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        rules.append(f"call_{i}: {_json_rule(schema)}")
    call = "call: " + _lit(fmt.open) + " (" + " | ".join(f"call_{i}" for i in range(len(chosen)))
    call += ") " + _lit(fmt.close)
    many = parallel_tool_calls and fmt.parallel and mode == "required"
    many = many or (parallel_tool_calls and fmt.parallel and mode == "auto")
    calls = "calls: call" + (
        f" ({_lit(fmt.separator)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if many else ""
    )
    lines = [calls, call, *rules]
    stop_after = None
    if mode == "auto":
        if text_schema is not None:
            lines.insert(0, "start: answer | calls")
            text = Constraint(json_schema=text_schema).json_schema  # checked, JSON-only
            lines.append(f"answer: {_json_rule(text)}")
        else:
            opener = fmt.open.strip() or "{"
            lines.insert(0, "start: TEXT | calls")
            lines.append(f"TEXT: /{_not_starting_with(opener)}/")
            stop_after = opener
    else:
        lines.insert(0, "start: calls")
    return Constraint(grammar="\n".join(lines) + "\n", stop_after=stop_after)


def close_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema that does not say otherwise has
    `"additionalProperties": false`.

    Every instance of the result is an instance of the original; decoding under it keeps a
    model from inventing keys (a small model copies schema keywords into the arguments
    otherwise). Tool arguments are always decoded under the closed schema.
    """
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: close_objects(v) for k, v in value.items()}
        elif key in ("items", "additionalItems", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
            out[key] = close_objects(value)
        else:
            out[key] = value
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_rule(schema: Any) -> str:
    """An inline JSON schema in llguidance's Lark, laid out as JSON constraints are."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return "%json " + json.dumps(
        {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}
    )


def _lit(text: str) -> str:
    return json.dumps(text) if text else ""


def _not_starting_with(prefix: str) -> str:
    """A regex for every string that does not start with `prefix`: its proper prefixes, or a
    first difference then anything. (Spelled out rather than as llguidance's `& ~` negation,
    whose first mask takes seconds to build over a 49k-token vocabulary.)"""
    alts = [_regex_escape(prefix[:i]) for i in range(len(prefix))]
    alts += [
        _regex_escape(prefix[:i]) + "[^" + _regex_escape(prefix[i]) + "](.|\\n)*"
        for i in range(len(prefix))
    ]
    return "(" + "|".join(alts) + ")"


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)


# prompts: the tools rendered into a chat (imported here so `cascade_rag.tools` is the one
# place to import from)
from cascade_rag.tool_prompts import (  # noqa: E402
    DEFAULT_TOOL_PROMPT,
    ToolPrompt,
    call_format,
    prepare_tools,
    template_supports_tools,
)

__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "HERMES",
    "LLAMA_JSON",
    "MAX_PARALLEL_CALLS",
    "InvalidToolCall",
    "ParsedOutput",
    "Tool",
    "ToolCall",
    "ToolCallFormat",
    "ToolPrompt",
    "call_format",
    "check_tool_choice",
    "check_tools",
    "close_objects",
    "new_call_id",
    "parse_tool_calls",
    "prepare_tools",
    "template_supports_tools",
    "tool_constraint",
]
