"""Constructor arguments the LangChain classes do not take raise, naming the argument.

Pydantic ignores unknown fields by default, so `ChatCascadeRAG(max_token=5)` (a typo) or
`ChatCascadeRAG(base_url=...)` (an argument of a server client) would build a model that
silently does something else than asked. `reject_unknown` runs before pydantic's validation
and raises a `TypeError` that names the argument, suggests a close field name, points
`EngineConfig` fields to `engine_kwargs`, and says that server-client arguments have no
meaning for a class that runs in-process.

It does not validate values (the fields and `cascade_rag.config.EngineConfig` do).
"""

from __future__ import annotations

from typing import Any

from cascade_rag.arguments import unknown_arguments_error


def reject_unknown(cls: type, values: Any, runs: str, instead: str) -> None:
    """Raise `unknown_arguments_error` if `values` (constructor keywords) has a name that is
    neither a field of the pydantic model `cls` nor an alias of one (only a dict is checked)."""
    if not isinstance(values, dict):
        return
    known = set()
    for name, field in cls.model_fields.items():
        known.add(name)
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                known.add(alias)
    unknown = [str(key) for key in values if key not in known]
    if unknown:
        raise unknown_arguments_error(cls.__name__, unknown, sorted(known), runs, instead)
