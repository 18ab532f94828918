"""Run the app with uvicorn: bind, serve, and drain on SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, the app answers 503 to requests
that still arrive on open connections and `/health` turns 503, and running requests (streams
included) get `ServerConfig.drain_timeout_s` seconds to finish before they are cancelled.
Then the app shuts down and `run_server` returns; after SIGTERM the process can exit with
status 0. A second Ctrl-C quits at once.

This module does not build the engine (the CLI does) and does not define routes (app.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
import time

import uvicorn

from cascade_rag.serving.app import create_app
from cascade_rag.serving.config import ServerConfig

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that tells the app it drains as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, gate) -> None:
        super().__init__(config)
        self._gate = gate

    def handle_exit(self, sig, frame) -> None:
        self._gate.draining = True
        super().handle_exit(sig, frame)


def run_server(engine, config: ServerConfig, sock: socket.socket | None = None) -> None:
    """Serve `engine` until SIGTERM / Ctrl-C; returns once the running requests drained.

    Args:
        engine: a `CascadeEngine` (not closed here: the caller owns it).
        config: server options; `host` and `port` are ignored when `sock` is given.
        sock: an already bound socket to serve on (tests pass one bound to port 0).

    Raises:
        KeyboardInterrupt: after draining, when it was stopped with Ctrl-C.
    """
    app = create_app(engine, config)
    state = app.state.server
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        lifespan="on",
        # streams get drain_timeout_s (sse-starlette's grace period); uvicorn waits a little
        # longer so they end by themselves, then cancels what is left
        timeout_graceful_shutdown=math.ceil(config.drain_timeout_s) + 2,
    )
    server = _DrainingServer(uv_config, state.gate)
    sock = sock if sock is not None else bind_socket(config.host, config.port)
    if not config.is_local and config.api_key is None:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can use "
            "the model; pass --api-key (or set CASCADE_RAG_API_KEY)",
            config.host,
        )
    key = "an API key is required" if config.api_key else "no API key"
    print(f"cascade-rag: serving {state.model_name} on {_url(sock)}/v1 ({key})", flush=True)
    with _sigterm_returns():
        server.run(sockets=[sock])


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port); port 0 picks a free one.

    Raises:
        OSError: the address is taken or cannot be bound, with the address in the message.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _sigterm_returns():
    """After a graceful shutdown uvicorn re-raises the signal it caught with the handler that
    was installed before it; a no-op SIGTERM handler makes that a clean return."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """The server in a background thread of this process (notebooks, tests, benchmarks).

    Args:
        engine: a `CascadeEngine` (not closed by `stop`).
        config: server options; `config.port` 0 (the default here) picks a free port.

    Signals are left to the main thread, so SIGTERM does not drain it: call `stop()`.

    Example:
        >>> with BackgroundServer(engine) as server:
        ...     client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, engine, config: ServerConfig | None = None) -> None:
        config = config or ServerConfig(port=0, log_level="warning")
        self.app = create_app(engine, config)
        self.sock = bind_socket(config.host, config.port)
        self.port = self.sock.getsockname()[1]
        self.url = _url(self.sock)
        uv_config = uvicorn.Config(
            self.app,
            log_level=config.log_level,
            access_log=config.access_log,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(config.drain_timeout_s) + 2,
        )
        self.server = _DrainingServer(uv_config, self.app.state.server.gate)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def state(self):
        """The app's `ServerState` (engine, metrics, chunk store, admission gate)."""
        return self.app.state.server

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Drain (running requests finish, new ones get 503) and stop the thread."""
        self.state.gate.draining = True
        self.server.should_exit = True
        self.thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
