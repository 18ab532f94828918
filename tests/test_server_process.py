"""`cascade-rag serve` as a process: the command line, the API key from the environment, and
SIGTERM draining a running stream before a clean exit (status 0).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str, queue.Queue]:
    """Run `cascade-rag serve --port 0 ...`; returns the process, its URL and its output lines."""
    cmd = [sys.executable, "-m", "cascade_rag.cli", "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "the server exited before it started"
        if "cascade-rag: serving" in line:
            url = line.split(" on ", 1)[1].split("/v1", 1)[0]
            return proc, url, lines
    proc.kill()
    raise AssertionError("the server did not start in time")


def output(lines: queue.Queue) -> str:
    out = []
    while True:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            break
        if line is None:
            break
        out.append(line)
    return "".join(out)


def test_bad_options_fail_before_the_model_loads():
    r = subprocess.run(
        [sys.executable, "-m", "cascade_rag.cli", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "port=70000" in r.stderr


def test_sigterm_drains_running_streams_then_exits_cleanly():
    proc, url, lines = start_server(
        "--kv-cache-tokens", "2048", "--max-model-len", "512", "--drain-timeout", "60",
        env={"CASCADE_RAG_API_KEY": "k"},
    )  # fmt: skip
    try:
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from the environment
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        body = {
            "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 40,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events: list[str] = []
        started = threading.Event()
        failures: list[BaseException] = []

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=120
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) >= 3:
                                started.set()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
            finally:
                started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        proc.send_signal(signal.SIGTERM)
        at_signal = len(events)
        # new connections are refused (or told 503) while the stream drains
        time.sleep(0.5)
        try:
            refused = httpx.get(url + "/health", timeout=5).status_code == 503
        except httpx.TransportError:
            refused = True
        assert refused
        reader.join(120)
        assert not failures, failures
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 40  # the running request ran to its end
        assert len(events) > at_signal + 10  # most of it after the signal
        finishes = [
            json.loads(e)["choices"][0]["finish_reason"]
            for e in events[:-2]
            if json.loads(e)["choices"]
        ]
        assert finishes[-1] == "length"
        assert proc.wait(60) == 0
        log = output(lines)
        assert "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
