"""How the OpenAI-compatible server is run: one dataclass, validated on construction.

`ServerConfig` holds what the HTTP layer decides (address, API key, request limits, queue
bound, drain time). The engine's own options (model, KV pool, batch size) stay in
`cascade_rag.config.EngineConfig`. This module does not parse command lines (cli.py does)
and does not start anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

API_KEY_ENV = "CASCADE_RAG_API_KEY"


@dataclass
class ServerConfig:
    """Options of `cascade-rag serve`.

    Args:
        host: address to bind; the default answers only this machine. Binding anything else
            without an `api_key` is allowed but logged as a warning.
        port: TCP port (0 picks a free one).
        api_key: when set, every request except `GET /health` needs the header
            `Authorization: Bearer <api_key>` (401 otherwise).
        served_model_name: the model name clients send in `model`; None uses the model's
            file name. The engine's full model identity is accepted too.
        max_queued_requests: requests that may wait beyond the engine's `max_num_seqs`
            running ones; a request over running + queued gets 429.
        max_tokens_limit: most tokens one request may ask to generate (400 above it); also
            the default when a request does not say.
        max_request_bytes: largest request body (413 above it).
        max_chunks: most chunks registered over HTTP at once (`POST /v1/chunks`); each is kept
            until deleted.
        drain_timeout_s: on SIGTERM, seconds running requests get to finish before they are
            cancelled; new requests get 503 meanwhile.
        log_level: uvicorn's log level ("critical", "error", "warning", "info", "debug").
        access_log: log one line per request.

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range, naming it.

    Example:
        >>> ServerConfig(port=8080, api_key="secret").host
        '127.0.0.1'
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 256
    max_tokens_limit: int = 4096
    max_request_bytes: int = 4 * 2**20
    max_chunks: int = 10_000
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise TypeError(f"host must be a non-empty str, got {self.host!r}")
        _int_in("port", self.port, 0, 65535)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty str or None")
        if self.served_model_name is not None and (
            not isinstance(self.served_model_name, str) or not self.served_model_name.strip()
        ):
            raise ValueError(
                f"served_model_name must be a non-empty str or None, got {self.served_model_name!r}"
            )
        _int_in("max_queued_requests", self.max_queued_requests, 0, 1 << 20)
        _int_in("max_tokens_limit", self.max_tokens_limit, 1, 1 << 24)
        _int_in("max_request_bytes", self.max_request_bytes, 1024, 1 << 34)
        _int_in("max_chunks", self.max_chunks, 1, 1 << 24)
        if isinstance(self.drain_timeout_s, bool) or not isinstance(
            self.drain_timeout_s, (int, float)
        ):
            raise TypeError(f"drain_timeout_s must be a number, got {self.drain_timeout_s!r}")
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s} must be in [0, 3600]")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise ValueError(f"log_level={self.log_level!r} is not one of {levels}")
        if not isinstance(self.access_log, bool):
            raise TypeError(f"access_log must be True or False, got {self.access_log!r}")

    @property
    def is_local(self) -> bool:
        """Whether `host` only answers this machine (a loopback address or localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _int_in(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range: use an int in [{lo}, {hi}]")
