"""Structured output and tool calling over HTTP, driven by the official `openai` client.

`response_format` (json_object, json_schema) and `tools` / `tool_choice` decode under a grammar,
so what comes back always parses: a JSON answer validates against its schema, and a forced
tool call has a known tool's name and schema-valid arguments, streamed or not. A tool result
sent back as a `tool` message is answered. The answers must equal a direct engine call on the
same plan (prompt and constraint), greedy.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from cascade_rag.llm import CascadeEngine
from cascade_rag.openai_tools import prepare_chat
from cascade_rag.sampling import SamplingParams
from cascade_rag.serving import BackgroundServer, ServerConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Plum?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=8192, max_model_len=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, ServerConfig(port=0, log_level="warning")) as srv:
        yield srv


class _Client:
    """The openai client with this server's model name filled in."""

    def __init__(self, server) -> None:
        self._client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        self._model = server.state.model_name

    def create(self, **kwargs):
        kwargs["model"] = self._model
        return self._client.chat.completions.create(**kwargs)


@pytest.fixture(scope="module")
def client(server):
    return _Client(server)


def test_json_schema_response_validates_and_equals_the_engine(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    msgs = [{"role": "user", "content": "Invent a person. Answer in JSON."}]
    out = client.create(messages=msgs, response_format=fmt, max_tokens=48, temperature=0)
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), PERSON)
    plan = prepare_chat(engine, msgs, response_format=fmt)
    direct = engine.generate(plan.prompt, SamplingParams(max_tokens=48, constraint=plan.constraint))
    assert text == direct.text


def test_json_object_response_parses(client):
    out = client.create(
        messages=[{"role": "user", "content": "Give a JSON object with a colour."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0.8,
        seed=3,
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_forced_tool_call_has_schema_valid_arguments(client):
    out = client.create(
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # one call (OpenAI's default allows several)
        max_tokens=64,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # the tool's result goes back as a tool message and is answered
    follow = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    answer = client.create(messages=follow, tools=[WEATHER], max_tokens=24, temperature=0)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_named_tool_choice_and_streamed_tool_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.create(
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice=named,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls and all(c["name"] == "get_weather" for c in calls.values())
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), WEATHER["function"]["parameters"])


def test_tool_choice_none_answers_in_text(client):
    out = client.create(
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    assert not out.choices[0].message.tool_calls and out.choices[0].message.content


def test_tools_with_chunk_ids_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="chunk_ids"):
        client.create(
            messages=QUESTION,
            tools=[WEATHER],
            max_tokens=8,
            extra_body={"chunk_ids": ["0" * 32]},
        )
