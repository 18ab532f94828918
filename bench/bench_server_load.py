"""Load test of `cascade-rag serve`: concurrent streaming clients over HTTP vs the same requests
made in-process, with every answer checked.

Workload (bounded in count and time, localhost only):

* N (default 200) chat requests, all sent at once as streams (`stream=true`,
  `stream_options.include_usage`), each sampled (temperature 0.7) with its own seed and
  `max_tokens` (default 16). Three of four name registered chunks (`chunk_ids`: a system
  prompt, then 1-2 of 4 documents, in one of 6 orders) and ask one of 10 questions; the fourth
  sends the documents inside the system message as plain chat (auto-chunked by the engine).
* The server is `python -m cascade_rag.cli serve` in a subprocess with the default model on the
  CPU (engine defaults but `--max-num-seqs`, `--kv-cache-tokens`, `--max-queued-requests`
  from the command line); the clients are httpx streams in this process.
* The baseline: the same requests, at once, through `CascadeEngine.astream` in this process on
  a fresh engine with the same options (no HTTP, no JSON, no second process).

Checks: every HTTP request completes (all its tokens, `[DONE]`, usage) or gets a 429 (queue
full); nothing hangs (a phase that passes `--timeout` is reported as such); every completed
stream's text equals the in-process answer of the request with the same seed (no lost or
mixed-up streams).

Reported for both: requests/s (completed requests over the wall time from the first send to the
last token), time to first token and inter-token latency percentiles (p50/p90/p99, from
the arrival of each streamed piece), and the ratio server / in-process.

It does not measure prompt caching against a baseline without it (bench_cpu_rag.py does) or
the GPU path. Run: python bench/bench_server_load.py [--clients 200] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from cascade_rag.composition import ChunkId, Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

SYSTEM = "You answer questions about the island of Zorbia from the documents, in one sentence."
DOCS = [
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, a port of "
    "about forty thousand people built on three hills above the harbour.",
    "The river Quill rises in the northern highlands of Zorbia, flows south through Plum and "
    "reaches the Lantern Sea at the old salt marshes.",
    "Zorbia's economy rests on fishing, salt and the spring tulip fair, which draws visitors "
    "from every island of the Lantern Sea each April.",
    "The Zorbian council has nine members elected every four years; it meets in the Glass Hall "
    "in Plum, beside the tulip market.",
]
ORDERS = [(0,), (1,), (0, 1), (2, 3), (0, 2), (3,)]
QUESTIONS = [
    "What is the capital of Zorbia?",
    "Which river flows through Plum?",
    "How many people live in Plum?",
    "What does Zorbia's economy rest on?",
    "When is the tulip fair?",
    "How many members has the council?",
    "Where does the council meet?",
    "Where does the Quill reach the sea?",
    "On how many hills is Plum built?",
    "Which sea surrounds Zorbia?",
]


@dataclass
class Result:
    """One request's outcome as its client saw it."""

    status: int = 0
    text: str = ""
    completion_tokens: int = 0
    sent: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # one per streamed piece of text
    done: bool = False
    error: str = ""


def workload(n: int):
    """(kind, order, question, seed) per request: kind "chunks" or "plain"."""
    return [
        ("plain" if i % 4 == 3 else "chunks", ORDERS[i % len(ORDERS)], QUESTIONS[i % 10], i)
        for i in range(n)
    ]


def plain_messages(order, question) -> list[dict]:
    context = "\n\n".join(DOCS[d] for d in order)
    return [
        {"role": "system", "content": f"{SYSTEM}\n\n{context}"},
        {"role": "user", "content": question},
    ]


# ---- over HTTP ------------------------------------------------------------------------------


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable, "-m", "cascade_rag.cli", "serve", "--port", "0",
        "--max-num-seqs", str(args.max_num_seqs),
        "--kv-cache-tokens", str(args.kv_cache_tokens),
        "--max-queued-requests", str(args.max_queued),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "cascade-rag: serving" in line:
            url = line.split(" on ", 1)[1].split("/v1", 1)[0]
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, url
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start")


async def http_phase(url: str, requests, args) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.timeout, connect=60)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        ids = []
        for doc in DOCS:
            r = await http.post("/v1/chunks", json={"text": doc, "metadata": {"bench": True}})
            r.raise_for_status()
            ids.append(r.json()["id"])
        await one_http(http, ("chunks", (0,), "Warm up.", 10**6), ids, 2)  # not timed

        results = [Result() for _ in requests]
        t0 = time.perf_counter()
        runs = [one_http(http, q, ids, args.max_tokens, r) for q, r in zip(requests, results)]
        await asyncio.wait_for(asyncio.gather(*runs), args.timeout)
        return results, t0


async def one_http(http, req, ids, max_tokens: int, res: Result | None = None) -> Result:
    res = res or Result()
    kind, order, question, seed = req
    body = {
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "chunks":
        body["messages"] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ]
        body["chunk_ids"] = [ids[d] for d in order]
    else:
        body["messages"] = plain_messages(order, question)
    res.sent = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    break
                if chunk["choices"]:
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        res.arrivals.append(time.perf_counter())
                        res.text += piece
                if chunk.get("usage"):
                    res.completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


# ---- in-process -----------------------------------------------------------------------------


async def engine_phase(engine: CascadeEngine, requests, args) -> tuple[list[Result], float]:
    chunks = [engine.register_chunk(doc, metadata={"bench": True}) for doc in DOCS]

    async def one(req, res: Result, max_tokens: int) -> None:
        kind, order, question, seed = req
        if kind == "chunks":
            prompt = Composition(
                query=question, chunks=[ChunkId(chunks[d].id) for d in order], system=SYSTEM
            )
        else:
            prompt = plain_messages(order, question)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed)
        res.sent = time.perf_counter()
        async for delta in engine.astream(prompt, params):
            if delta.text:
                res.arrivals.append(time.perf_counter())
                res.text += delta.text
            if delta.finished:
                res.completion_tokens = delta.output.usage.completion_tokens
                res.done = True
        res.status = 200

    await one(("chunks", (0,), "Warm up.", 10**6), Result(), 2)
    results = [Result() for _ in requests]
    t0 = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(one(r, res, args.max_tokens) for r, res in zip(requests, results))),
        args.timeout,
    )
    return results, t0


# ---- report ---------------------------------------------------------------------------------


def summary(results: list[Result], t0: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.done]
    end = max((r.arrivals[-1] for r in ok if r.arrivals), default=t0)
    ttft = [r.arrivals[0] - r.sent for r in ok if r.arrivals]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    e2e = [r.arrivals[-1] - r.sent for r in ok if r.arrivals]
    return {
        "completed": len(ok),
        "rejected_429": sum(r.status == 429 for r in results),
        "failed": sum(not (r.status == 200 and r.done) and r.status != 429 for r in results),
        "seconds": end - t0,
        "requests_per_s": len(ok) / (end - t0) if end > t0 else 0.0,
        "tokens": sum(r.completion_tokens for r in ok),
        "ttft": pcts(ttft),
        "itl": pcts(itl),
        "e2e": pcts(e2e),
    }


def pcts(xs: list[float]) -> dict:
    if not xs:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def print_report(args, http: dict, local: dict, mismatches: list[int], errors: list[str]) -> None:
    print(
        f"\n{args.clients} concurrent streaming chat requests, {args.max_tokens} new tokens each "
        f"(temperature 0.7, one seed per request), max_num_seqs {args.max_num_seqs}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    rows = [
        ("completed", "completed", "{:d}"),
        ("429 (queue full)", "rejected_429", "{:d}"),
        ("failed / hung", "failed", "{:d}"),
        ("wall seconds", "seconds", "{:.1f}"),
        ("requests/s", "requests_per_s", "{:.2f}"),
        ("output tokens", "tokens", "{:d}"),
    ]
    print(f"| {'':26} | {'HTTP server':>12} | {'in-process':>12} | {'server/in-process':>17} |")
    print(f"|{'-' * 28}|{'-' * 14}|{'-' * 14}|{'-' * 19}|")
    for label, key, fmt in rows:
        a, b = http[key], local[key]
        ratio = f"{a / b:.2f}x" if isinstance(a, float) and b else ""
        print(f"| {label:26} | {fmt.format(a):>12} | {fmt.format(b):>12} | {ratio:>17} |")
    for name, key in (("TTFT", "ttft"), ("inter-token", "itl"), ("end-to-end", "e2e")):
        for p in ("p50", "p90", "p99"):
            a, b = http[key][p] * 1000, local[key][p] * 1000
            label = f"{name} {p} (ms)"
            print(f"| {label:26} | {a:12.0f} | {b:12.0f} | {a / b if b else 0:16.2f}x |")
    checked = http["completed"]
    print(
        f"\nanswers equal to the in-process answer with the same seed: "
        f"{checked - len(mismatches)} of {checked}"
        + (f"; MISMATCHED: {mismatches[:20]}" if mismatches else "")
    )
    for e in errors[:5]:
        print("error:", e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200, help="concurrent streaming requests")
    ap.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size")
    ap.add_argument("--kv-cache-tokens", type=int, default=16384, help="KV pool, tokens")
    ap.add_argument("--max-queued", type=int, default=256, help="server queue bound (429 above)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase before 'hung'")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    requests = workload(args.clients)

    proc, url = start_server(args)
    print(f"server: {url} (pid {proc.pid})", flush=True)
    try:
        http_results, t0 = asyncio.run(http_phase(url, requests, args))
    except TimeoutError:
        print(f"HTTP phase did not finish in {args.timeout} s: HUNG")
        proc.kill()
        return 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    http = summary(http_results, t0)
    print(f"HTTP phase: {http['completed']} completed in {http['seconds']:.1f} s", flush=True)

    with CascadeEngine(kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs) as eng:
        local_results, t0 = asyncio.run(engine_phase(eng, requests, args))
    local = summary(local_results, t0)

    mismatches = [
        i
        for i, (h, e) in enumerate(zip(http_results, local_results))
        if h.status == 200 and h.done and h.text != e.text
    ]
    errors = [f"request {i}: {r.status} {r.error}" for i, r in enumerate(http_results) if r.error]
    errors = [e for e in errors if " 429 " not in e]
    print_report(args, http, local, mismatches, errors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"http": http, "in_process": local, "mismatches": mismatches}, f, indent=2)
    return 0 if not mismatches and not http["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
