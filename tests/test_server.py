"""`cascade-rag serve` over HTTP, driven by the official `openai` client and raw httpx.

The real server (uvicorn, in a background thread) runs on a free localhost port over the
default model. Every answer is compared with a direct engine call with the same options
(greedy, or sampled with the same seed); streams must concatenate to the same text and end
with usage whose `prompt_tokens_details.cached_tokens` is filled. Bad requests get OpenAI's
error format with the field named; the API key, the body-size limit and the bounded queue
answer 401 / 413 / 429; a client that goes away aborts its request in the engine.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade_rag.composition import ChunkId, Composition
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.serving import BackgroundServer, ServerConfig

SYSTEM = "Answer from the context in a few words."
DOC = (
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, which has "
    "about forty thousand inhabitants. The river Quill flows through Plum."
)
QUESTION = "What is the capital of Zorbia?"
LONG = {"max_tokens": 400, "ignore_eos": True}  # runs until aborted, in these tests


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(
        default_model, kv_cache_tokens=8192, max_model_len=1024, max_num_seqs=8
    ) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, ServerConfig(port=0, log_level="warning")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server.state.model_name


def messages(question: str = QUESTION) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM + "\n\n" + DOC},
        {"role": "user", "content": question},
    ]


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def post(server, path: str, body, headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        server.url + path,
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
        **kwargs,
    )


# ---- models, health ---------------------------------------------------------------------------


def test_health_models_and_unknown_routes(server, client, model, engine):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    listed = client.models.list().data
    assert [m.id for m in listed] == [model] and listed[0].owned_by == "cascade-rag"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    # the engine's full identity is a name for the model too
    out = client.chat.completions.create(model=engine.model_name, messages=messages(), max_tokens=1)
    assert out.model == model


# ---- chat and completions against the engine --------------------------------------------------


def test_chat_matches_the_engine_greedy_and_seeded(client, model, engine):
    out = client.chat.completions.create(
        model=model, messages=messages(), max_tokens=12, temperature=0
    )
    ref = engine.generate(messages(), SamplingParams(max_tokens=12))
    assert out.choices[0].message.content == ref.text and ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.prompt_tokens_details.cached_tokens > 0  # the system message's chunks
    seeded = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    out = client.chat.completions.create(model=model, messages=messages("Tell me."), **seeded)
    ref = engine.generate(messages("Tell me."), SamplingParams(**seeded))
    assert out.choices[0].message.content == ref.text


def test_chat_stream_concatenates_and_ends_with_usage(client, model, engine):
    stream = client.chat.completions.create(
        model=model,
        messages=messages("Which river flows through Plum?"),
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ref = engine.generate(
        messages("Which river flows through Plum?"), SamplingParams(max_tokens=16)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [ref.finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(ref.token_ids)
    assert last.usage.prompt_tokens_details.cached_tokens == ref.usage.cached_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no chunk carries usage
    plain = list(
        client.chat.completions.create(
            model=model, messages=messages(), max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.usage is None and c.choices for c in plain)


def test_completions_text_tokens_and_batches(client, model, engine):
    prompts = ["The capital of France is", "Once upon a time"]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    refs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in refs]
    assert out.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in refs)
    ids = engine.tokenizer.encode("The capital of Italy is")
    out = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    ref = engine.generate(
        PreparedPrompt(chunks=(), tail_ids=tuple(ids)), SamplingParams(max_tokens=5)
    )
    assert out.choices[0].text == ref.text
    stream = client.completions.create(
        model=model, prompt=prompts, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts = ["", ""]
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [r.text for r in refs]
    assert usage.completion_tokens == sum(len(r.token_ids) for r in refs)


def test_stop_logprobs_and_max_completion_tokens(client, model, engine):
    out = client.chat.completions.create(
        model=model,
        messages=messages(),
        max_completion_tokens=20,
        temperature=0,
        stop=["Plum"],
        logprobs=True,
        top_logprobs=2,
    )
    ref = engine.generate(messages(), SamplingParams(max_tokens=20, stop=["Plum"], logprobs=2))
    assert out.choices[0].message.content == ref.text and "Plum" not in ref.text
    assert out.choices[0].finish_reason == "stop"
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in ref.logprobs])
    assert all(len(c.top_logprobs) == 2 for c in content)
    out = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=1
    )
    assert len(out.choices[0].logprobs.token_logprobs) == 3
    assert "".join(out.choices[0].logprobs.tokens) == out.choices[0].text


def test_repeated_system_prompt_is_read_from_the_cache(client, model):
    first = client.chat.completions.create(
        model=model, messages=messages("Who lives in Plum?"), max_tokens=2, temperature=0
    )
    again = client.chat.completions.create(
        model=model, messages=messages("How big is Plum?"), max_tokens=2, temperature=0
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens_details.cached_tokens and cached > 30


# ---- errors -------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_CHAT = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),  # above --max-tokens-limit
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 5}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ({"chunk_ids": ["0" * 32]}, "chunk_ids"),
    ({"model": 7}, "model"),
]


@pytest.mark.parametrize("change,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_requests_name_the_field(server, change, param):
    body = {**CHAT, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]


BAD_COMPLETION = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"logprobs": 21}, "logprobs"),
]


@pytest.mark.parametrize("change,param", BAD_COMPLETION, ids=[p for _, p in BAD_COMPLETION])
def test_bad_completion_requests_name_the_field(server, change, param):
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]", b'"text"'])
def test_malformed_bodies_get_400(server, body):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_the_openai_client_raises(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=CHAT["messages"], temperature=-2
        )
    assert err.value.body["param"] == "temperature"


def test_api_key_is_required_when_set(engine):
    config = ServerConfig(port=0, log_level="warning", api_key="s3cret")
    with BackgroundServer(engine, config) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # open, for probes
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        out = good.chat.completions.create(model=srv.state.model_name, **CHAT)
        assert out.usage.completion_tokens >= 1


def test_request_size_limit(engine):
    config = ServerConfig(port=0, log_level="warning", max_request_bytes=4096)
    with BackgroundServer(engine, config) as srv:
        big = {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1}
        r = post(srv, "/v1/chat/completions", big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = httpx.post(srv.url + "/v1/chat/completions", content=chunked(), timeout=30)
        assert r.status_code == 413
        assert post(srv, "/v1/chat/completions", CHAT).status_code == 200


def test_full_queue_answers_429_and_frees_slots(engine):
    capacity = engine.config.max_num_seqs  # with no queue beyond the running requests
    config = ServerConfig(port=0, log_level="warning", max_queued_requests=0)
    with BackgroundServer(engine, config) as srv:
        body = {**CHAT, **LONG, "stream": True}
        with httpx.Client(timeout=60) as http:
            streams = []
            try:
                for _ in range(capacity):
                    s = http.stream("POST", srv.url + "/v1/chat/completions", json=body)
                    streams.append(s)
                    s.__enter__()
                assert srv.state.gate.in_flight == capacity
                r = post(srv, "/v1/chat/completions", CHAT)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
                r = post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
                assert r.status_code == 429
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
        assert wait_until(lambda: srv.state.gate.in_flight == 0)
        assert wait_until(lambda: engine.stats().num_running == 0)
        assert post(srv, "/v1/chat/completions", CHAT).status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'cascade_rag_requests_total{endpoint="chat",outcome="rejected"} 1.0' in metrics


# ---- disconnects ------------------------------------------------------------------------------


def test_a_client_that_disconnects_aborts_its_request(server, engine):
    body = {**CHAT, **LONG, "stream": True}
    before = engine.stats().generated_tokens
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert engine.stats().num_running == 1
    # the connection is closed mid-stream: the engine drops the request and its pages
    assert wait_until(lambda: engine.stats().num_running == 0, 10)
    assert engine.stats().generated_tokens - before < 400  # far from running to max_tokens
    # the same for a request that is not streamed: the client gives up waiting
    before = engine.stats().generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **LONG}, timeout=1.5)
    assert wait_until(lambda: engine.stats().num_running == 0, 10)
    assert engine.stats().generated_tokens - before < 400
    assert server.state.gate.in_flight == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'cascade_rag_requests_total{endpoint="chat",outcome="abort"}' in metrics


def test_concurrent_streams_are_not_mixed_up(client, model, engine):
    questions = [f"Question {i}: what is the capital of Zorbia?" for i in range(6)]
    params = [dict(max_tokens=10, temperature=0.8, seed=100 + i) for i in range(6)]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model=model, messages=messages(questions[i]), stream=True, **params[i]
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refs = engine.generate([messages(q) for q in questions], [SamplingParams(**p) for p in params])
    assert [results[i] for i in range(6)] == [r.text for r in refs]


# ---- chunks -----------------------------------------------------------------------------------


def test_chunk_endpoints(server, client, model, engine):
    url = server.url + "/v1/chunks"
    made = httpx.post(url, json={"text": DOC, "metadata": {"source": "zorbia.md"}}).json()
    assert made["id"] == engine.register_chunk(DOC).id and made["object"] == "chunk"
    assert made["type"] == "rag_result" and made["metadata"] == {"source": "zorbia.md"}
    assert httpx.post(url, json={"text": DOC}).json()["id"] == made["id"]  # same content
    ids = engine.tokenizer.encode("Quill is a river.\n\n")
    tok = httpx.post(url, json={"token_ids": ids, "type": "context"}).json()
    assert tok["num_tokens"] == len(ids) and tok["type"] == "context"
    listed = {c["id"] for c in httpx.get(url).json()["data"]}
    assert {made["id"], tok["id"]} <= listed
    assert httpx.get(f"{url}/{made['id']}").json()["text"] == DOC

    # chat with system + chunk ids + question, without sending the document
    chat = dict(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        max_tokens=10,
        temperature=0,
    )
    out = client.chat.completions.create(**chat, extra_body={"chunk_ids": [made["id"]]})
    comp = Composition(query=QUESTION, chunks=[ChunkId(made["id"])], system=SYSTEM)
    ref = engine.generate(comp, SamplingParams(max_tokens=10))
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens

    # pin the chain [system prompt, document]: it survives clear_cache
    pinned = httpx.post(f"{url}/{made['id']}/pin", json={"system": SYSTEM}).json()
    assert pinned["pins"] == 1 and pinned["chunk_ids"][-1] == made["id"]
    assert pinned["num_tokens"] == ref.usage.prompt_tokens - len(engine.prepare(comp).tail_ids)
    engine.clear_cache()
    kv = httpx.get(f"{url}/{made['id']}").json()["kv"]
    assert [(e["chain"], e["pins"]) for e in kv] == [(pinned["chunk_ids"][:1], 1)]
    pins = httpx.get(server.url + "/v1/pins").json()["data"]
    assert [p["chunk_ids"] for p in pins] == [pinned["chunk_ids"]]
    again = client.chat.completions.create(**chat, extra_body={"chunk_ids": [made["id"]]})
    assert again.usage.prompt_tokens_details.cached_tokens == pinned["num_tokens"]
    r = httpx.delete(f"{url}/{made['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "chunk_in_use"
    assert httpx.post(f"{url}/{made['id']}/unpin", json={"system": SYSTEM}).json()["pins"] == 0
    r = httpx.post(f"{url}/{made['id']}/unpin", json={"system": SYSTEM})
    assert r.status_code == 400 and "not pinned" in r.json()["error"]["message"]

    # precompute a chain with a prefix: [default system prompt, token chunk, document]
    pre = httpx.post(f"{url}/{made['id']}/precompute", json={"prefix": [tok["id"]]}).json()
    assert pre["computed_tokens"] > 0 and pre["chunk_ids"][1:] == [tok["id"], made["id"]]
    pre2 = httpx.post(f"{url}/{made['id']}/precompute", json={"prefix": [tok["id"]]}).json()
    assert pre2["computed_tokens"] == 0

    # delete: the chunk and its KV go; requests naming it get 400
    gone = httpx.delete(f"{url}/{made['id']}").json()
    assert gone["deleted"] and gone["freed_pages"] > 0
    assert httpx.get(f"{url}/{made['id']}").status_code == 404
    assert not any(n.chunk_id == made["id"] for n in engine.cached_chunks())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**chat, extra_body={"chunk_ids": [made["id"]]})
    assert err.value.body["code"] == "chunk_not_found"


BAD_CHUNKS = [
    ({}, "text"),
    ({"text": "a", "token_ids": [1]}, "text"),
    ({"text": "   "}, "text"),
    ({"text": "a", "type": "poem"}, "type"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": [1, 10**7]}, "token_ids"),
    ({"token_ids": ["a"]}, "token_ids[0]"),
    ({"text": "a", "metadata": [1]}, "metadata"),
]


@pytest.mark.parametrize("body,param", BAD_CHUNKS, ids=[str(b) for b, _ in BAD_CHUNKS])
def test_bad_chunk_requests(server, body, param):
    r = post(server, "/v1/chunks", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chunk_routes_for_unknown_ids(server):
    for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/pin"), ("POST", "/precompute")]:
        r = httpx.request(method, f"{server.url}/v1/chunks/{'f' * 32}{suffix}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "chunk_not_found"
    made = httpx.post(server.url + "/v1/chunks", json={"text": "Tiny note."}).json()
    r = post(server, f"/v1/chunks/{made['id']}/pin", {"prefix": ["e" * 32]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prefix"
    chat = {**CHAT, "chunk_ids": [made["id"]]}
    chat["messages"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_are_prometheus_counters_gauges_and_histograms(server, client, model):
    for q in ("Who?", "Where?"):
        client.chat.completions.create(model=model, messages=messages(q), max_tokens=3)
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    }
    kinds = {
        "cascade_rag_requests": "counter",
        "cascade_rag_prompt_tokens": "counter",
        "cascade_rag_cached_prompt_tokens": "counter",
        "cascade_rag_generation_tokens": "counter",
        "cascade_rag_preemptions": "counter",
        "cascade_rag_kv_evicted_chunks": "counter",
        "cascade_rag_cascade_steps": "counter",
        "cascade_rag_num_requests_running": "gauge",
        "cascade_rag_num_requests_waiting": "gauge",
        "cascade_rag_kv_free_pages": "gauge",
        "cascade_rag_kv_cached_chunks": "gauge",
        "cascade_rag_time_to_first_token_seconds": "histogram",
        "cascade_rag_time_per_output_token_seconds": "histogram",
        "cascade_rag_e2e_request_latency_seconds": "histogram",
    }
    for name, kind in kinds.items():
        assert families[name].type == kind, name

    def value(name: str, suffix: str = "_total", **labels) -> float:
        return next(
            s.value
            for s in families[name].samples
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("cascade_rag_requests", endpoint="chat", outcome="length") >= 2
    assert value("cascade_rag_cached_prompt_tokens", kind="context") > 0
    assert value("cascade_rag_prompt_tokens") >= value(
        "cascade_rag_cached_prompt_tokens", kind="context"
    )
    assert value("cascade_rag_time_to_first_token_seconds", "_count") >= 2
    assert value("cascade_rag_num_requests_running", "") == 0


# ---- configuration ------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"port": 70000}, ValueError, "port"),
    ({"port": "80"}, TypeError, "port"),
    ({"api_key": ""}, ValueError, "api_key"),
    ({"max_queued_requests": -1}, ValueError, "max_queued_requests"),
    ({"max_tokens_limit": 0}, ValueError, "max_tokens_limit"),
    ({"max_request_bytes": 10}, ValueError, "max_request_bytes"),
    ({"drain_timeout_s": -1}, ValueError, "drain_timeout_s"),
    ({"log_level": "loud"}, ValueError, "log_level"),
    ({"served_model_name": " "}, ValueError, "served_model_name"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_CONFIGS, ids=[n for _, _, n in BAD_CONFIGS])
def test_server_config_names_bad_fields(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ServerConfig(**kwargs)


def test_server_config_defaults_are_local():
    config = ServerConfig()
    assert config.host == "127.0.0.1" and config.is_local and config.api_key is None
    assert ServerConfig(host="::1").is_local and ServerConfig(host="localhost").is_local
    assert not ServerConfig(host="0.0.0.0").is_local


def test_served_model_name(engine):
    config = ServerConfig(port=0, log_level="warning", served_model_name="smol")
    with BackgroundServer(engine, config) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["smol"]
        assert c.chat.completions.create(model="smol", **CHAT).model == "smol"


def test_draining_and_closed_engines_answer_503(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=512, max_model_len=256) as eng:
        with BackgroundServer(eng, ServerConfig(port=0, log_level="warning")) as srv:
            assert post(srv, "/v1/chat/completions", CHAT).status_code == 200
            srv.state.gate.draining = True  # what SIGTERM sets
            r = post(srv, "/v1/chat/completions", CHAT)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert httpx.get(srv.url + "/health").json() == {"status": "draining"}
            srv.state.gate.draining = False
            eng.close()
            r = post(srv, "/v1/chat/completions", CHAT)
            assert r.status_code == 503 and "closed" in r.json()["error"]["message"]
            assert httpx.get(srv.url + "/health").status_code == 503
            assert httpx.get(srv.url + "/metrics").status_code == 200  # still scrapeable
