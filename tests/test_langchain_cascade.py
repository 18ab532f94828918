"""langchain-cascade-rag beyond the standard tests: one engine batch per LangChain batch,
token callbacks, concurrent async calls, stop strings, usage with cache reads, `chunks=`,
the completion model, the retriever's documents, and a plain LCEL stuff-documents chain that
gets the chunk cache without any cascade-specific code.

Runs the default model on one engine with short generations.
"""

from __future__ import annotations

import asyncio

import pytest
from langchain_cascade_rag import CascadeRAGLLM, CascadeRAGRetriever, ChatCascadeRAG
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from cascade_rag.llm import CascadeEngine
from cascade_rag.retrieval import DocumentIndex, Passage, Retriever
from cascade_rag.testing import WordHashEmbedder

PASSAGES = [
    (
        "Zorbia is an island nation in the Lantern Sea. Its capital city is Plum, a port of "
        "narrow streets, copper roofs and lantern-lit bridges.",
        "zorbia.md",
    ),
    (
        "Plum has about forty thousand inhabitants. The river Quill flows through the city "
        "from the northern hills to the harbour.",
        "plum.md",
    ),
    (
        "The Quill freezes every winter, usually in the second week of December, and "
        "Zorbians skate on it from the hills down to the capital.",
        "quill.md",
    ),
    (
        "Zorbian trams run all night between Plum harbour and the old capital, Fennick, "
        "which lies forty kilometres inland.",
        "tram.md",
    ),
]
STEP_SLACK = 3  # prefill steps on top of one step per generated token


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


class UsageRecorder(BaseCallbackHandler):
    """The usage of every chat model run, as LangChain callbacks see it."""

    def __init__(self) -> None:
        self.usage: list[dict] = []

    def on_llm_end(self, response, **kwargs) -> None:
        self.usage.append(response.generations[0][0].message.usage_metadata)


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=8192, max_model_len=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def index(engine):
    index = DocumentIndex(engine, embedder=WordHashEmbedder())
    index.add_passages([Passage(text, source) for text, source in PASSAGES], show_progress=False)
    return index


@pytest.fixture
def chat(engine):
    return ChatCascadeRAG(engine=engine, max_tokens=8)


def count_generate_calls(monkeypatch, engine) -> list[int]:
    """Record the number of prompts of every `engine.generate` call."""
    calls: list[int] = []
    generate = engine.generate

    def recording(prompts, sampling=None):
        calls.append(len(prompts) if isinstance(prompts, list) else 1)
        return generate(prompts, sampling)

    monkeypatch.setattr(engine, "generate", recording)
    return calls


def unique_system(tag: str) -> str:
    """A system prompt long enough to be cut into chunks, new to the engine's cache."""
    return "\n".join(
        f"Rule {i} ({tag}): answer briefly, politely and only about the island of Zorbia."
        for i in range(5)
    )


# ---- batching ------------------------------------------------------------------------------


def test_batch_is_one_engine_batch(engine, chat, monkeypatch):
    questions = [f"Name a colour that starts with the letter {c}." for c in "BGRY"]
    alone = [chat.invoke(q).content for q in questions]
    calls = count_generate_calls(monkeypatch, engine)
    steps = engine.stats().num_steps
    batched = chat.batch(questions)
    steps = engine.stats().num_steps - steps
    assert [m.content for m in batched] == alone  # each input got its own answer, in order
    assert calls == [len(questions)]
    assert steps <= chat.max_tokens + STEP_SLACK, f"{steps} steps: not one batch"
    assert all(m.usage_metadata["output_tokens"] > 0 for m in batched)


def test_chain_batch_is_one_engine_batch(engine, chat, monkeypatch):
    chain = ChatPromptTemplate.from_messages([("human", "Say hello to {name}.")]) | chat
    calls = count_generate_calls(monkeypatch, engine)
    outs = (chain | StrOutputParser()).batch([{"name": n} for n in ("Ann", "Bo", "Cy")])
    assert calls == [3] and all(isinstance(o, str) and o for o in outs)


def test_batch_errors_reach_only_their_input(engine, chat, monkeypatch):
    calls = count_generate_calls(monkeypatch, engine)
    outs = chat.batch(["Hello", "   ", "Hi there"], return_exceptions=True)
    assert isinstance(outs[0], AIMessage) and isinstance(outs[2], AIMessage)
    assert isinstance(outs[1], ValueError) and "empty" in str(outs[1])
    assert calls[0] == 3  # tried as one batch, then each alone to place the error
    with pytest.raises(ValueError, match="empty"):
        chat.batch(["Hello", "   "])


def test_batch_with_streaming_input_does_not_wait_for_it(engine):
    streaming = ChatCascadeRAG(engine=engine, max_tokens=6, streaming=True)
    recorder = TokenRecorder()
    outs = streaming.batch(["Hello", "Hi"], config={"callbacks": [recorder]})
    assert all(m.content for m in outs)
    # the two streams' tokens interleave in the shared handler
    assert len("".join(recorder.tokens)) == len(outs[0].content) + len(outs[1].content)


# ---- streaming, async, stop ----------------------------------------------------------------


def test_stream_fires_token_callbacks(chat):
    recorder = TokenRecorder()
    chunks = list(chat.stream("Hello", config={"callbacks": [recorder]}))
    text = "".join(c.content for c in chunks)
    assert len(chunks) > 2 and text
    assert "".join(recorder.tokens) == text
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata["output_tokens"] > 0
    assert last.response_metadata["finish_reason"] in ("stop", "length")


def test_streaming_invoke_fires_token_callbacks(engine):
    recorder = TokenRecorder()
    msg = ChatCascadeRAG(engine=engine, max_tokens=8, streaming=True).invoke(
        "Hello", config={"callbacks": [recorder]}
    )
    assert msg.content and "".join(recorder.tokens) == msg.content
    assert msg.usage_metadata["output_tokens"] > 0


def test_async_calls_run_concurrently(engine, chat):
    questions = [f"Count from {i} to {i + 3}." for i in range(4)]
    expected = [chat.invoke(q).content for q in questions]

    async def main():
        steps = engine.stats().num_steps
        outs = await asyncio.gather(*(chat.ainvoke(q) for q in questions))
        steps = engine.stats().num_steps - steps
        recorder = TokenRecorder()
        chunks = [c async for c in chat.astream("Hello", config={"callbacks": [recorder]})]
        return outs, steps, chunks, recorder.tokens

    outs, steps, chunks, tokens = asyncio.run(main())
    assert [m.content for m in outs] == expected
    assert steps <= chat.max_tokens + STEP_SLACK, f"{steps} steps: async calls not batched"
    assert "".join(tokens) == "".join(c.content for c in chunks) != ""


def test_stop_sequences_cut(engine):
    chat = ChatCascadeRAG(engine=engine, max_tokens=12)
    full = chat.invoke("Hello").content
    word = full.split()[2]
    cut = chat.invoke("Hello", stop=[word])
    assert cut.content == full[: full.index(word)]
    assert cut.response_metadata["finish_reason"] == "stop"
    default_stop = ChatCascadeRAG(engine=engine, max_tokens=12, stop=[word])
    assert default_stop.invoke("Hello").content == cut.content
    streamed = "".join(c.content for c in chat.stream("Hello", stop=[word]))
    assert streamed == cut.content


def test_per_call_sampling_overrides(chat):
    assert chat.invoke("Hello", max_tokens=2).usage_metadata["output_tokens"] == 2
    a = chat.invoke("Tell me a story.", temperature=1.0, seed=3, max_tokens=6)
    b = chat.invoke("Tell me a story.", temperature=1.0, seed=3, max_tokens=6)
    assert a.content == b.content
    with pytest.raises(TypeError, match="functions"):
        chat.invoke("Hello", functions=[])


# ---- usage and the chunk cache -------------------------------------------------------------


def test_cache_read_on_second_call_with_same_system_prompt(chat):
    system = unique_system("repeat")
    first = chat.invoke([SystemMessage(system), HumanMessage("Where is Plum?")])
    second = chat.invoke([SystemMessage(system), HumanMessage("How big is Plum?")])
    usage = second.usage_metadata
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    assert usage["input_token_details"]["cache_read"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert second.response_metadata["model_name"] == chat.model_name


def test_stuff_documents_chain_reuses_documents_and_system_prompt(engine, index):
    """A plain LCEL RAG chain: retriever | format_docs | prompt | model | parser.

    Nothing in it knows about cascade-rag beyond the model and retriever classes: the
    documents are stuffed into the prompt as text. The engine still computes the shared
    system prompt and documents once; later questions read them from the cache.
    """
    retriever = CascadeRAGRetriever(index=index, k=len(PASSAGES))
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You answer questions about Zorbia using only the context. Be brief."),
            ("human", "{context}\n\nQuestion: {question}"),
        ]
    )

    def format_docs(docs: list[Document]) -> str:
        return "\n\n".join(doc.page_content for doc in docs)

    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | prompt
        | ChatCascadeRAG(engine=engine, max_tokens=8)
        | StrOutputParser()
    )
    questions = [
        "What is the capital of Zorbia?",
        "Which river flows through Plum?",
        "When does the Quill freeze?",
    ]
    recorder = UsageRecorder()
    answers = [chain.invoke(q, config={"callbacks": [recorder]}) for q in questions]
    assert all(isinstance(a, str) and a for a in answers)

    # the prompt prefix the questions share: system turn, documents, up to "Question: "
    def prompt_ids(question: str) -> list[int]:
        context = format_docs(retriever.invoke(question))
        messages = prompt.invoke({"context": context, "question": question})
        roles = {"system": "system", "human": "user"}
        turns = [{"role": roles[m.type], "content": m.content} for m in messages.to_messages()]
        return list(engine.prepare(turns).token_ids)

    ids = [prompt_ids(q) for q in questions]
    shared = min(_common_prefix(ids[0], other) for other in ids[1:])
    assert shared > 100
    first, *later = recorder.usage
    assert first["input_tokens"] == len(ids[0])
    assert first["input_token_details"]["cache_read"] == 0  # documents new to the engine
    for usage in later:
        cache_read = usage["input_token_details"]["cache_read"]
        computed = usage["input_tokens"] - cache_read
        # everything shared except the last part-chunk (< 2 x auto_chunk_min_tokens)
        assert shared - 2 * engine.config.auto_chunk_min_tokens <= cache_read <= shared
        assert computed < usage["input_tokens"] / 3, usage


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chunks_kwarg_composes_retrieved_documents(engine, index, chat):
    retriever = CascadeRAGRetriever(index=index, k=2)
    system = "Answer from the context in one short sentence."
    question = "What is the capital of Zorbia?"
    docs = retriever.invoke(question)
    first = chat.invoke([("system", system), ("human", question)], chunks=docs)
    again = chat.invoke([("system", system), ("human", "Which sea is Zorbia in?")], chunks=docs)
    from cascade_rag.composition import Composition

    composed = engine.prepare(
        Composition(query=question, chunks=[engine.get_chunk(d.id) for d in docs], system=system)
    )
    assert first.usage_metadata["input_tokens"] == len(composed.token_ids)
    # the system chunk and the retrieved chunks (the ones the index registered) are reused
    assert again.usage_metadata["input_token_details"]["cache_read"] == composed.num_chunk_tokens
    # plain text and Documents without a chunk id work too
    plain = chat.invoke(question, chunks=[d.page_content for d in docs])
    assert plain.content
    with pytest.raises(ValueError, match="one human message"):
        chat.invoke([("human", "hi"), ("ai", "hello"), ("human", question)], chunks=docs)
    with pytest.raises(TypeError, match="list"):
        chat.invoke(question, chunks=docs[0])


# ---- construction --------------------------------------------------------------------------


def test_construction_errors(engine, default_model):
    with pytest.raises(ValueError, match="either engine"):
        ChatCascadeRAG(engine=engine, model=default_model)
    with pytest.raises(TypeError, match="CascadeEngine"):
        ChatCascadeRAG(engine="not an engine")
    with pytest.raises(ValueError, match="temperature"):
        ChatCascadeRAG(engine=engine, temperature=-1.0)
    chat = ChatCascadeRAG(engine=engine)
    assert chat._llm_type == "cascade-rag-chat"
    assert chat._identifying_params["model_name"] == engine.model_name


def test_unknown_constructor_arguments_raise_naming_them(engine, index):
    with pytest.raises(TypeError, match=r"'max_token' \(did you mean 'max_tokens'\?\)"):
        ChatCascadeRAG(engine=engine, max_token=5)
    with pytest.raises(TypeError, match="'max_token'"):
        ChatCascadeRAG(max_token=5)  # raised before an engine is built
    for cls in (ChatCascadeRAG, CascadeRAGLLM):
        with pytest.raises(TypeError, match="base_url=.*in this process.*OpenAI-compatible"):
            cls(engine=engine, base_url="http://localhost:8000/v1")
        with pytest.raises(TypeError, match="api_key="):
            cls(engine=engine, api_key="sk-...")
        # LangChain's standard params of server clients
        with pytest.raises(TypeError, match="max_retries= and timeout=.*in this process"):
            cls(engine=engine, timeout=60, max_retries=2, temperature=0, max_tokens=100, stop=[])
        with pytest.raises(TypeError, match=r"engine_kwargs=\{'device'"):
            cls(engine=engine, device="cuda")
    with pytest.raises(TypeError, match=r"CascadeRAGRetriever .*'kk' \(did you mean 'k'\?\)"):
        CascadeRAGRetriever(index=index, kk=2)
    with pytest.raises(TypeError, match="base_url=.*in this process"):
        CascadeRAGRetriever(index=index, base_url="http://localhost:6333")

    # what LangChain itself passes or users set on any model still works
    recorder = TokenRecorder()
    chat = ChatCascadeRAG(
        engine=engine,
        max_tokens=3,
        callbacks=[recorder],
        tags=["t"],
        metadata={"run": 1},
        verbose=False,
        cache=False,
        name="chat",
        rate_limiter=None,
        disable_streaming=False,
    )
    assert chat.invoke("Hi").content and chat.tags == ["t"] and chat.name == "chat"
    llm = CascadeRAGLLM(engine=engine, max_tokens=3, callbacks=[], tags=["t"], cache=False)
    assert llm.invoke("Hi") is not None
    retriever = CascadeRAGRetriever(index=index, k=1, tags=["r"], metadata={"a": 1})
    assert len(retriever.invoke("Plum")) == 1


def test_builds_its_own_engine_from_a_model(default_model):
    chat = ChatCascadeRAG(
        model=default_model, engine_kwargs={"kv_cache_tokens": 1024}, max_tokens=4
    )
    try:
        assert chat.engine.config.kv_cache_tokens == 1024
        assert chat.invoke("Hello").content
    finally:
        chat.engine.close()


# ---- completion model ----------------------------------------------------------------------


def test_completion_model(engine, monkeypatch):
    llm = CascadeRAGLLM(engine=engine, max_tokens=6)
    prompts = ["The capital of France is", "One, two, three,", "Roses are red,"]
    alone = [llm.invoke(p) for p in prompts]
    calls = count_generate_calls(monkeypatch, engine)
    result = llm.generate(prompts)
    assert calls == [3]
    assert [g[0].text for g in result.generations] == alone
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] in ("stop", "length") and info["token_usage"]["prompt_tokens"] > 0
    assert result.llm_output["model_name"] == engine.model_name
    assert llm.batch(prompts) == alone and calls == [3, 3]

    recorder = TokenRecorder()
    streamed = list(llm.stream(prompts[0], config={"callbacks": [recorder]}))
    assert "".join(streamed) == alone[0] == "".join(recorder.tokens)
    word = alone[1].split()[1]
    assert llm.invoke(prompts[1], stop=[word]) == alone[1][: alone[1].index(word)]

    prefix = unique_system("completion") + "\n"
    llm.invoke(prefix + "Where is Plum?")
    usage = llm.generate([prefix + "Where is Fennick?"]).llm_output["token_usage"]
    assert usage["cached_tokens"] > 0

    async def main():
        return await llm.abatch(prompts), [c async for c in llm.astream(prompts[0])]

    outs, chunks = asyncio.run(main())
    assert outs == alone and "".join(chunks) == alone[0]


# ---- retriever -----------------------------------------------------------------------------


def test_retriever_documents(engine, index):
    retriever = CascadeRAGRetriever(index=index, k=3)
    docs = retriever.invoke("When does the Quill freeze in Zorbia?")
    assert len(docs) == 3
    for doc in docs:
        assert doc.id == doc.metadata["chunk_id"] == engine.get_chunk(doc.id).id
        assert doc.metadata["source"].endswith(".md")
        assert isinstance(doc.metadata["score"], float)
    assert [d.id for d in docs] == sorted(d.id for d in docs)  # canonical order
    assert min(d.metadata["rank"] for d in docs) == 0
    best = CascadeRAGRetriever(index=index, k=3, canonical_order=False).invoke(
        "When does the Quill freeze in Zorbia?"
    )
    assert [d.metadata["rank"] for d in best] == [0, 1, 2]
    scores = [d.metadata["score"] for d in best]
    assert scores == sorted(scores, reverse=True)
    assert len(asyncio.run(retriever.ainvoke("Plum trams", k=1))) == 1


def test_retriever_wraps_a_cascade_retriever(engine, index):
    wrapped = CascadeRAGRetriever(retriever=Retriever(engine, index, k=2, canonical_order=False))
    assert wrapped.k == 2 and not wrapped.canonical_order
    assert len(wrapped.invoke("Plum")) == 2
    with pytest.raises(ValueError, match="either retriever"):
        CascadeRAGRetriever(retriever=Retriever(engine, index), index=index)
    with pytest.raises(ValueError, match="index="):
        CascadeRAGRetriever()


# ---- tools and structured output ------------------------------------------------------------


def test_bind_tools_calls_are_valid_and_feed_back(engine):
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    model = ChatCascadeRAG(engine=engine, max_tokens=60)
    forced = model.bind_tools([multiply], tool_choice="any")
    msg = forced.invoke("What is 3 times 4?")
    (call,) = msg.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert msg.response_metadata["finish_reason"] == "tool_calls" and msg.content == ""
    named = model.bind_tools([multiply], tool_choice="multiply").invoke("Hi")
    assert named.tool_calls[0]["name"] == "multiply"
    # streamed: no text chunks, the call arrives as tool_call_chunks that add up
    full = None
    for chunk in forced.stream("What is 3 times 4?"):
        assert not chunk.content
        full = chunk if full is None else full + chunk
    assert full.tool_calls[0]["args"] == call["args"]
    # the result goes back as a ToolMessage; tool_choice none answers in text
    result = multiply.invoke(call)
    assert isinstance(result, ToolMessage)
    answer = model.bind_tools([multiply], tool_choice="none").invoke(
        [HumanMessage("What is 3 times 4?"), msg, result]
    )
    assert answer.content and not answer.tool_calls
    with pytest.raises(ValueError, match="chunks="):
        forced.invoke("What is 3 times 4?", chunks=["Three times four is twelve."])


def test_with_structured_output_methods(engine):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    model = ChatCascadeRAG(engine=engine, max_tokens=60)
    for method in ("json_schema", "function_calling", "json_mode"):
        out = model.with_structured_output(Person, method=method, include_raw=True).invoke(
            "Invent a person; answer as JSON with a name and an age."
        )
        assert isinstance(out["parsed"], Person), (method, out)
        assert out["parsing_error"] is None and isinstance(out["raw"], AIMessage)
    schema = {"title": "city", "type": "object", "properties": {"name": {"type": "string"}}}
    as_dict = model.with_structured_output(schema).invoke("Name a city.")
    assert set(as_dict) <= {"name"}
    with pytest.raises(ValueError, match="method"):
        model.with_structured_output(Person, method="xml")


# ---- embeddings and passages in flat prompts ---------------------------------------------


@pytest.fixture(scope="module")
def passage_engine(default_model):
    """An engine of its own: once it has passages, every prompt on it is composed with them."""
    with CascadeEngine(default_model, kv_cache_tokens=8192, max_model_len=1024) as eng:
        yield eng


def test_embeddings_embed_and_register_documents(passage_engine):
    import numpy as np
    from langchain_cascade_rag import CascadeEmbeddings
    from langchain_core.embeddings import Embeddings

    from cascade_rag.passages import passage_index

    hashing = WordHashEmbedder()
    embeddings = CascadeEmbeddings(embedder=hashing, engine=passage_engine)
    assert isinstance(embeddings, Embeddings)
    texts = [text for text, _ in PASSAGES]
    vectors = embeddings.embed_documents(texts)
    np.testing.assert_allclose(vectors, hashing.embed(texts), rtol=1e-6)
    index = passage_index(passage_engine)
    assert len(index) == len(texts)
    query = embeddings.embed_query("Where is Plum?")
    np.testing.assert_allclose(query, hashing.embed(["Where is Plum?"])[0], rtol=1e-6)
    assert len(index) == len(texts)  # queries are not passages
    assert asyncio.run(embeddings.aembed_documents(texts[:1])) == vectors[:1]
    # without an engine nothing is registered anywhere
    assert (
        CascadeEmbeddings(embedder=hashing).embed_documents(["x"]) == hashing.embed(["x"]).tolist()
    )
    with pytest.raises(TypeError, match="embeder"):
        CascadeEmbeddings(embeder=hashing)
    with pytest.raises(TypeError, match="CascadeEngine"):
        CascadeEmbeddings(embedder=hashing, engine="not an engine")
    with pytest.raises(ValueError, match="either embedder"):
        CascadeEmbeddings(embedder=hashing, model="some/folder")
    with pytest.raises(TypeError, match="embed"):
        CascadeEmbeddings(embedder=object())


def test_default_embeddings_are_the_bundled_model():
    from langchain_cascade_rag import CascadeEmbeddings

    vector = CascadeEmbeddings().embed_query("When does the night tram run?")
    assert len(vector) == 384 and abs(sum(v * v for v in vector) - 1) < 1e-4


def test_chat_and_completion_models_compose_registered_passages(passage_engine, monkeypatch):
    """A prompt that stuffs registered documents is sent with each document as a chunk of
    its own (same token ids as the flat prompt); passage_chunks=False sends it flat."""
    from cascade_rag.engine.sequence import PreparedPrompt
    from cascade_rag.passages import register_passages

    register_passages(passage_engine, [text for text, _ in PASSAGES])
    sent = []
    generate = passage_engine.generate

    def recording(prompts, sampling=None):
        sent.append(prompts)
        return generate(prompts, sampling)

    monkeypatch.setattr(passage_engine, "generate", recording)

    def ask(model, first: int, second: int):
        context = f"{PASSAGES[first][0]}\n\n{PASSAGES[second][0]}"
        system = f"Answer from the context.\n\n{context}"
        return model.invoke([("system", system), ("human", "Where is Plum?")])

    chat = ChatCascadeRAG(engine=passage_engine, max_tokens=4)
    first = ask(chat, 0, 1)
    prompt = sent[-1]
    assert isinstance(prompt, PreparedPrompt)
    passages = [c for c in prompt.chunks if c.text in {t for t, _ in PASSAGES}]
    assert [c.text for c in passages] == [PASSAGES[0][0], PASSAGES[1][0]]
    assert first.usage_metadata["input_tokens"] == len(prompt.token_ids)
    assert first.response_metadata["recomputed_tokens"] == 0  # exact prefix reuse
    # the same documents in the other order: the system turn's head is read from the cache
    again = ask(chat, 1, 0)
    assert again.usage_metadata["input_token_details"]["cache_read"] >= len(sent[-1].chunks[0])
    flat = ask(ChatCascadeRAG(engine=passage_engine, max_tokens=4, passage_chunks=False), 0, 1)
    assert isinstance(sent[-1], list) and flat.content == first.content
    assert passage_engine.prepare(sent[-1]).token_ids == prompt.token_ids
    # the completion model sends plain text, composed the same way
    llm = CascadeRAGLLM(engine=passage_engine, max_tokens=4)
    text = f"Context:\n{PASSAGES[2][0]}\n\nQuestion: When does the Quill freeze?\nAnswer:"
    result = llm.generate([text])
    assert isinstance(sent[-1], list) and isinstance(sent[-1][0], PreparedPrompt)
    assert [c.text for c in sent[-1][0].chunks][-1] == PASSAGES[2][0]
    usage = result.generations[0][0].generation_info["token_usage"]
    assert usage["recomputed_tokens"] == 0 and result.llm_output["token_usage"] == usage
