"""What a constrained request's output must match: `Constraint`, checked when built.

A `Constraint` is one of: a JSON schema, any JSON object, a regular expression, a choice
among fixed strings, or a context-free grammar (llguidance's Lark dialect, or GBNF). It is put
in `SamplingParams(constraint=...)`; the engine then masks, at every step, the tokens that
could not continue a match (`cascade_rag.sampling.grammar`), so a finished output always
matches: JSON parses and validates against its schema.

Grammars are written for llguidance (https://github.com/guidance-ai/llguidance), which
compiles them against the model's tokenizer. This module only turns a constraint into
llguidance's grammar text and checks that text without a tokenizer (schema keywords, regex
syntax, grammar rules), so a bad constraint raises here, in the caller's thread, before any
request is submitted. It does not compile against a tokenizer, compute masks or keep
per-request state (grammar.py does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How JSON is laid out under a JSON constraint: `{"a": 1, "b": [2, 3]}` (one space after
`:` and `,`, no newlines). Flexible whitespace would let a small model emit blank lines until
`max_tokens`; a schema's `"x-guidance"` key can override these (llguidance's options)."""

_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, eq=False)
class Constraint:
    """A per-request output constraint; set exactly one of the fields.

    Attributes:
        json_schema: A JSON schema the output must be an instance of: a dict (or `True`),
            its JSON text, or a pydantic model class (its `model_json_schema()`). Stored as a
            dict. llguidance covers most of draft 2020-12 (types, `properties`, `required`,
            `additionalProperties`, `items`, `prefixItems`, `min/maxItems`, `enum`, `const`,
            `anyOf`/`oneOf`/`allOf`, `$ref`/`$defs`, string `pattern`/`format`/lengths,
            numeric bounds); an unsupported keyword raises `ValueError` naming it.
        json_object: True: the output is any JSON object (OpenAI's JSON mode).
        regex: A regular expression the whole output must match (Rust `regex` syntax: no
            lookarounds or backreferences).
        choice: Non-empty sequence of strings; the output is exactly one of them.
        grammar: A context-free grammar in llguidance's Lark dialect (`start: ...` rules,
            `/regex/` terminals, `%json {...}` for an inline JSON schema) or in GBNF
            (`root ::= ...`).
        stop_after: Text after which stop strings are no longer looked for; until it
            appears in the output, stop strings end the request as usual. Only with
            `grammar`, for grammars whose output up to that text is free text (every prefix
            of which is itself a complete match), such as tool calling's plain-text answer
            before a call's opening tag. Without it (the default) stop strings never cut
            constrained output, so it always matches.

    Raises:
        TypeError / ValueError: no field or several set, a field of the wrong type, a schema
            that is not JSON or uses an unsupported keyword, an invalid regex or grammar.

    Example:
        >>> c = Constraint(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
        >>> c.kind
        'json_schema'
        >>> Constraint(choice=["yes", "no"]).grammar_text().startswith("{")
        True
    """

    json_schema: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    stop_after: str | None = None
    _grammar: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise TypeError(
                f"json_object={self.json_object!r} is a {type(self.json_object).__name__}; "
                "pass True or False"
            )
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(
                "a Constraint takes exactly one of json_schema, json_object=True, regex, "
                f"choice or grammar; got {set_kinds or 'none'}"
            )
        put = object.__setattr__
        kind = set_kinds[0]
        if kind == "json_schema":
            put(self, "json_schema", _schema_dict(self.json_schema))
        elif kind == "choice":
            put(self, "choice", _check_choice(self.choice))
        elif not isinstance(getattr(self, kind), (str, bool)):
            value = getattr(self, kind)
            raise TypeError(f"{kind}={value!r} is a {type(value).__name__}; pass a str")
        elif kind in ("regex", "grammar") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty; pass a non-empty {kind}")
        if self.stop_after is not None:
            if kind != "grammar":
                raise ValueError(
                    f"stop_after is for grammars with a free-text branch; a {kind} constraint "
                    "never lets stop strings cut its output"
                )
            if not isinstance(self.stop_after, str) or not self.stop_after:
                raise TypeError(f"stop_after={self.stop_after!r} must be a non-empty str")
        put(self, "_grammar", _to_grammar(kind, getattr(self, kind)))

    @property
    def kind(self) -> str:
        """Which field is set: 'json_schema', 'json_object', 'regex', 'choice' or 'grammar'."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar (JSON text) this constraint compiles to."""
        return self._grammar

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: equal keys compile to the same matcher."""
        return (self._grammar, self.stop_after or "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constraint) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def _schema_dict(schema: Any) -> dict | bool:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()  # a pydantic model class
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"json_schema is not valid JSON text: {exc}") from None
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, Mapping):
        raise TypeError(
            f"json_schema must be a dict, its JSON text or a pydantic model class, got "
            f"{type(schema).__name__}"
        )
    try:  # a private, JSON-only copy: later changes to the caller's dict change nothing
        return json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema must hold JSON values only: {exc}") from None


def _check_choice(choice: Any) -> tuple[str, ...]:
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
        raise TypeError(f"choice={choice!r} must be a list of strings, e.g. choice=['yes', 'no']")
    choice = tuple(choice)
    if not choice:
        raise ValueError("choice is empty; pass at least one string")
    for c in choice:
        if not isinstance(c, str) or not c:
            raise ValueError(f"choice holds {c!r}; every choice must be a non-empty str")
    return choice


def _to_grammar(kind: str, value: Any) -> str:
    try:
        from llguidance import LLMatcher, grammar_from
    except ImportError:
        raise ImportError(
            "output constraints need the llguidance package: pip install 'llguidance>=1.9,<2'"
        ) from None

    if kind in ("json_schema", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else value
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        text = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    elif kind == "regex":
        text = LLMatcher.grammar_from_regex(value)
    elif kind == "choice":
        lark = "start: " + " | ".join(json.dumps(c) for c in value)
        text = LLMatcher.grammar_from_lark(lark)
    else:
        try:
            text = grammar_from("grammar", value)
        except ValueError as exc:
            raise ValueError(f"grammar could not be read: {exc}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ValueError(f"invalid {kind} constraint: {messages[0]}")
    return text
