"""Stock LlamaIndex and LangChain RAG pipelines get chunk-cache reads on later questions.

A stock pipeline hands the LLM one flat prompt (passages formatted into a template, in score
order, LlamaIndex's with "file_path: ..." lines in their text). With the embedding classes
bound to the engine (`CascadeEmbedding(engine=...)`, `CascadeEmbeddings(engine=...)`) the
LLM classes find the embedded passages in that prompt and compose each as a chunk
(`cascade_rag.passages`), without changing the prompt's token ids.

Checked per question, on the bundled Larkhaven documents and the default model: every
retrieved passage is found and is the chunk the embedding registered; the composed prompt has
the flat prompt's token ids; later questions read the template prefix from the cache (exact
prefix reuse) or every passage seen before at any position (`chunk_reuse="anywhere"`); and
with exact prefix reuse the answer equals a full prefill of the same ids. Each test prints
its numbers per question (run with -s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.llms.cascade_rag")
pytest.importorskip("langchain_cascade_rag")

from langchain_cascade_rag import CascadeEmbeddings, ChatCascadeRAG  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from langchain_text_splitters import RecursiveCharacterTextSplitter  # noqa: E402
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex  # noqa: E402
from llama_index.llms.cascade_rag import CascadeEmbedding, CascadeRAG  # noqa: E402

import cascade_rag.data  # noqa: E402
from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.passages import PassageIndex  # noqa: E402
from cascade_rag.retrieval import Embedder  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402

DOCS = Path(cascade_rag.data.__file__).parent / "docs"
MAX_TOKENS = 8
# later questions retrieve passages of earlier ones, in other orders and combinations
QUESTIONS = [
    "How often does the F1 ferry to Gull Island run?",
    "Can I take my bike on the ferry?",
    "How much does it cost to rent a bike for a day?",
    "How much does a monthly tram pass cost?",
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


class PromptLog:
    """What the LLM class did: every `PassageIndex.compose` call's input and output, and the
    output of every `engine.generate` call."""

    def __init__(self, monkeypatch, engine) -> None:
        self.calls: list[tuple[object, PreparedPrompt, int]] = []
        self.outputs: list = []
        compose, generate = PassageIndex.compose, engine.generate

        def recording_compose(index, prompt):
            prepared, found = compose(index, prompt)
            self.calls.append((prompt, prepared, found))
            return prepared, found

        def recording_generate(prompt, sampling=None):
            output = generate(prompt, sampling)
            self.outputs.append(output)
            return output

        monkeypatch.setattr(PassageIndex, "compose", recording_compose)
        monkeypatch.setattr(engine, "generate", recording_generate)

    @property
    def usages(self) -> list[tuple[int, int, int]]:
        return [
            (o.usage.prompt_tokens, o.usage.cached_tokens, o.usage.recomputed_tokens)
            for o in self.outputs
        ]


def registered_ids(engine, texts: list[str]) -> set[str]:
    """Chunk ids of the embedded texts, each checked to be registered with the engine by the
    embedding class (a passage's chunk is its own tokens, surrounding whitespace stripped)."""
    ids = set()
    for text in texts:
        chunk = engine.registry.chunk_for(engine.composer.text.encode(text.strip()))
        assert chunk.id in engine.registry and chunk.type is ChunkType.RAG_RESULT
        ids.add(chunk.id)
    return ids


def check_questions(engine, log, usages, registered, mode, label):
    """Print and check the per-question numbers of one pipeline run."""
    assert len(log.calls) == len(usages) == len(QUESTIONS)
    seen: set[str] = set()
    print(f"\n{label}, chunk_reuse={mode!r}")
    print("question | prompt | cached | recomputed | passages (seen before) | prefix | seen tok")
    for q, ((flat, prepared, found), usage) in enumerate(zip(log.calls, usages)):
        # the prompt the engine ran has exactly the flat prompt's token ids
        assert prepared.token_ids == engine.prepare(flat).token_ids
        passages = [c for c in prepared.chunks if c.type is ChunkType.RAG_RESULT]
        assert found == len(passages) > 0
        assert {c.id for c in passages} <= registered  # the chunks the embedding registered
        first = next(i for i, c in enumerate(prepared.chunks) if c.type is ChunkType.RAG_RESULT)
        prefix = sum(len(c) for c in prepared.chunks[:first])
        again = [c for c in passages if c.id in seen]
        seen_tokens = sum(len(c) for c in again)
        prompt_tokens, cached, recomputed = usage
        assert prompt_tokens == len(prepared.token_ids)
        print(
            f"{q + 1} | {prompt_tokens} | {cached} | {recomputed} | {len(passages)} "
            f"({len(again)}) | {prefix} | {seen_tokens}"
        )
        if q == 0:
            assert cached == 0  # a fresh engine
        elif mode == "prefix":
            assert cached >= prefix  # the template's system turn and head at least
        else:
            # every passage seen before is read, but for its recomputed first tokens
            budget = engine.config.recompute_tokens
            assert again, "the questions are chosen so that later ones retrieve earlier passages"
            assert cached >= prefix + seen_tokens - budget * len(again)
            assert cached + recomputed >= prefix + seen_tokens
        seen.update(c.id for c in passages)
    return seen


def check_exact(engine, prepared: PreparedPrompt, token_ids) -> None:
    """With exact prefix reuse the cached answer equals a full prefill of the same ids."""
    full = engine.generate(
        PreparedPrompt(chunks=(), tail_ids=tuple(prepared.token_ids)),
        SamplingParams(max_tokens=MAX_TOKENS),
    )
    assert full.usage.cached_tokens == 0
    assert list(token_ids) == list(full.token_ids)


# ---- LlamaIndex: VectorStoreIndex.from_documents(...).as_query_engine(llm=CascadeRAG) --------


@pytest.mark.parametrize("mode", ["prefix", "anywhere"])
def test_stock_llamaindex_query_engine_reads_the_cache(mode, default_model, embedder, monkeypatch):
    with CascadeEngine(default_model, kv_cache_tokens=16384, chunk_reuse=mode) as engine:
        embed_model = CascadeEmbedding(embedder, engine=engine)
        documents = SimpleDirectoryReader(str(DOCS)).load_data()
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
        registered = registered_ids(engine, [n.get_content("embed") for n in _nodes(index)])
        query_engine = index.as_query_engine(llm=CascadeRAG(engine, max_tokens=MAX_TOKENS))
        log = PromptLog(monkeypatch, engine)
        answers = [query_engine.query(q) for q in QUESTIONS]
        for answer in answers:
            # the passages the LLM got: the query engine's source nodes, in score order
            assert len(answer.source_nodes) == 2
        check_questions(engine, log, log.usages, registered, mode, "LlamaIndex query engine")
        if mode == "prefix":
            check_exact(engine, log.calls[-1][1], log.outputs[-1].token_ids)


def _nodes(index: VectorStoreIndex):
    return list(index.docstore.docs.values())


# ---- LangChain: InMemoryVectorStore + retriever + stuff-documents LCEL chain ----------------


class LangChainUsage(BaseCallbackHandler):
    def __init__(self) -> None:
        self.usages: list[tuple[int, int, int]] = []

    def on_llm_end(self, response, **kwargs) -> None:
        message = response.generations[0][0].message
        usage = message.usage_metadata
        self.usages.append(
            (
                usage["input_tokens"],
                usage["input_token_details"]["cache_read"],
                message.response_metadata["recomputed_tokens"],
            )
        )


def langchain_documents() -> list[Document]:
    files = sorted(p for p in DOCS.iterdir() if p.suffix in (".md", ".txt"))
    docs = [Document(p.read_text(encoding="utf-8"), metadata={"source": p.name}) for p in files]
    return RecursiveCharacterTextSplitter(chunk_size=800, chunk_overlap=0).split_documents(docs)


@pytest.mark.parametrize("mode", ["prefix", "anywhere"])
def test_stock_langchain_retrieval_chain_reads_the_cache(
    mode, default_model, embedder, monkeypatch
):
    with CascadeEngine(default_model, kv_cache_tokens=16384, chunk_reuse=mode) as engine:
        embeddings = CascadeEmbeddings(embedder=embedder, engine=engine)
        store = InMemoryVectorStore(embedding=embeddings)
        documents = langchain_documents()
        store.add_documents(documents)
        registered = registered_ids(engine, [d.page_content for d in documents])
        retriever = store.as_retriever(search_kwargs={"k": 3})
        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", "Answer the question using only this context.\n\n{context}"),
                ("human", "{question}"),
            ]
        )

        def format_docs(docs: list[Document]) -> str:
            return "\n\n".join(doc.page_content for doc in docs)

        llm = ChatCascadeRAG(engine=engine, max_tokens=MAX_TOKENS)
        chain = (
            {"context": retriever | format_docs, "question": RunnablePassthrough()}
            | prompt
            | llm
            | StrOutputParser()
        )
        usage = LangChainUsage()
        log = PromptLog(monkeypatch, engine)
        answers = [chain.invoke(q, config={"callbacks": [usage]}) for q in QUESTIONS]
        assert all(isinstance(a, str) and a for a in answers)
        assert usage.usages == log.usages  # what LangChain's usage records say
        check_questions(engine, log, log.usages, registered, mode, "LangChain LCEL chain")
        if mode == "prefix":
            check_exact(engine, log.calls[-1][1], log.outputs[-1].token_ids)
