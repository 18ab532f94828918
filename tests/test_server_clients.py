"""Real framework clients against `cascade-rag serve`: LangChain's `ChatOpenAI` and LlamaIndex's
`OpenAILike`, each pointed at the server on a free localhost port.

Every answer is compared with the engine's own greedy answer to the same messages; LangChain's
`usage_metadata` carries `input_token_details.cache_read` from the server's cached tokens, and a
plain stuffed-prompt chain (system prompt + documents + question, no cascade-specific code)
reads the documents' KV from the cache on its second question.
"""

from __future__ import annotations

import asyncio

import langchain_openai
import pytest
from llama_index.llms import openai_like

from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.serving import BackgroundServer, ServerConfig

DOCS = [
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum.",
    "The river Quill flows through Plum and into the Lantern Sea.",
    "Plum has about forty thousand inhabitants and a harbour for fishing boats.",
]
SYSTEM = "Answer the question from the context in a few words.\n\nContext:\n{context}"


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=4096, max_model_len=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, ServerConfig(port=0, log_level="warning", api_key="k")) as srv:
        yield srv


def reference(engine, messages, max_tokens: int) -> str:
    return engine.generate(messages, SamplingParams(max_tokens=max_tokens)).text


# ---- LangChain ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    return langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="k",
        model=server.state.model_name,
        temperature=0,
        max_tokens=10,
        stream_usage=True,
        max_retries=0,
    )


def stuffed(question: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM.format(context="\n\n".join(DOCS))},
        {"role": "user", "content": question},
    ]


def test_langchain_invoke_matches_the_engine_and_reports_cache_reads(chat_model, engine):
    msgs = stuffed("What is the capital of Zorbia?")
    first = chat_model.invoke([(m["role"], m["content"]) for m in msgs])
    assert first.content == reference(engine, msgs, 10)
    usage = first.usage_metadata
    assert usage["input_tokens"] == len(engine.prepare(msgs).token_ids)
    assert usage["output_tokens"] == 10 or first.response_metadata["finish_reason"] == "stop"
    assert "cache_read" in usage["input_token_details"]
    again = chat_model.invoke([(m["role"], m["content"]) for m in msgs])
    assert again.usage_metadata["input_token_details"]["cache_read"] > 0


def test_langchain_stream_and_astream(chat_model, engine):
    msgs = stuffed("Which river flows through Plum?")
    pairs = [(m["role"], m["content"]) for m in msgs]
    chunks = list(chat_model.stream(pairs))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == reference(engine, msgs, 10)
    assert total.usage_metadata["output_tokens"] >= 1
    assert total.usage_metadata["input_token_details"]["cache_read"] > 0

    async def collect() -> str:
        return "".join([c.content async for c in chat_model.astream(pairs)])

    assert asyncio.run(collect()) == total.content


def test_a_stuffed_prompt_chain_reads_the_documents_from_the_cache(chat_model, engine):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
    chain = prompt | chat_model
    context = "\n\n".join(DOCS)
    engine.clear_cache()
    cold = chain.invoke({"context": context, "question": "How many people live in Plum?"})
    warm = chain.invoke({"context": context, "question": "Where does the Quill flow?"})
    cold_read = cold.usage_metadata["input_token_details"]["cache_read"]
    warm_read = warm.usage_metadata["input_token_details"]["cache_read"]
    system_tokens = len(engine.prepare(stuffed("x")[:1]).token_ids)
    assert cold_read == 0
    assert warm_read >= system_tokens - 40  # the documents' KV, up to the last cut line
    assert warm_read > 40
    text = (prompt | chat_model | StrOutputParser()).invoke(
        {"context": context, "question": "Where does the Quill flow?"}
    )
    assert text == warm.content == reference(engine, stuffed("Where does the Quill flow?"), 10)


# ---- LlamaIndex -----------------------------------------------------------------------------


def llama_llm(server, chat: bool):
    return openai_like.OpenAILike(
        model=server.state.model_name,
        api_base=server.url + "/v1",
        api_key="k",
        is_chat_model=chat,
        context_window=1024,
        max_tokens=8,
        temperature=0,
        max_retries=0,
    )


def test_llamaindex_chat_stream_and_async(server, engine):
    from llama_index.core.llms import ChatMessage

    llm = llama_llm(server, chat=True)
    msgs = stuffed("What is the capital of Zorbia?")
    li_msgs = [ChatMessage(role=m["role"], content=m["content"]) for m in msgs]
    ref = reference(engine, msgs, 8)
    out = llm.chat(li_msgs)
    assert out.message.content == ref
    assert out.raw.usage.prompt_tokens_details.cached_tokens >= 0
    assert "".join(r.delta for r in llm.stream_chat(li_msgs)) == ref
    assert asyncio.run(llm.achat(li_msgs)).message.content == ref
    # complete() on a chat model sends the prompt as one user message
    prompt = "What is the capital of France?"
    assert llm.complete(prompt).text == reference(engine, [{"role": "user", "content": prompt}], 8)


def test_llamaindex_completion_model(server, engine):
    llm = llama_llm(server, chat=False)
    prompt = "The capital of France is"
    ref = reference(engine, prompt, 8)
    assert llm.complete(prompt).text == ref
    assert "".join(r.delta for r in llm.stream_complete(prompt)) == ref
