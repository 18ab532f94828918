"""The error for constructor arguments a framework class does not take.

Shared by the LangChain and LlamaIndex integrations: `unknown_arguments_error` names each
unknown argument, suggests a close parameter name, points `EngineConfig` fields to
`engine_kwargs`, and says that the arguments of server clients (`base_url`, `api_key`...) have
no meaning for a class that runs in-process. It does not validate values (the constructors and
`cascade_rag.config.EngineConfig` do).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping

# Arguments of clients that talk to an inference server over HTTP.
SERVER_CLIENT_ARGUMENTS = frozenset(
    {
        "api_base",
        "api_key",
        "api_version",
        "base_url",
        "default_headers",
        "default_query",
        "endpoint",
        "endpoint_url",
        "host",
        "http_async_client",
        "http_client",
        "inference_server_url",
        "max_retries",
        "openai_api_base",
        "openai_api_key",
        "openai_organization",
        "openai_proxy",
        "organization",
        "port",
        "request_timeout",
        "reuse_client",
        "server_url",
        "timeout",
        "url",
    }
)


def unknown_arguments_error(
    owner: str,
    unknown: Collection[str],
    known: Collection[str],
    runs: str,
    instead: str,
    hints: Mapping[str, str] | None = None,
) -> TypeError:
    """A one-line `TypeError` naming the `unknown` arguments of `owner`'s constructor.

    Args:
        owner: the class name.
        unknown: the arguments it does not take.
        known: the arguments it takes (listed in the message, and matched for suggestions).
        runs: what the class does in-process, e.g. "runs the cascade-rag engine".
        instead: what to use instead of a server-client argument such as `base_url`.
        hints: a specific explanation for some argument names.
    """
    from cascade_rag.config import EngineConfig

    unknown, hints = sorted(unknown), hints or {}
    server = [name for name in unknown if name in SERVER_CLIENT_ARGUMENTS]
    if server:
        names = " and ".join(f"{name}=" for name in server)
        what = "an argument" if len(server) == 1 else "arguments"
        return TypeError(
            f"{owner} got {names}, {what} of clients of inference servers; {owner} {runs} in "
            f"this process, so there is no server to connect to. {instead}"
        )
    config_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if name in hints:
            parts.append(f"{name!r} ({hints[name]})")
        elif "engine_kwargs" in known and name in config_fields:
            parts.append(f"{name!r} (an engine setting: pass engine_kwargs={{{name!r}: ...}})")
        elif close:
            parts.append(f"{name!r} (did you mean {close[0]!r}?)")
        else:
            parts.append(repr(name))
    noun = "an unexpected argument" if len(parts) == 1 else "unexpected arguments"
    return TypeError(f"{owner} got {noun} {', '.join(parts)}. It takes: {', '.join(known)}.")
