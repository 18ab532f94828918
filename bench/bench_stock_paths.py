"""Chunk-cache reads of stock LlamaIndex and LangChain RAG pipelines, with and without
passage composition, on the bundled Larkhaven documents and the default model (CPU).

Pipelines (nothing cascade-specific in them but the model and embedding classes):
- LlamaIndex: `VectorStoreIndex.from_documents(docs, embed_model=CascadeEmbedding(...))
  .as_query_engine(llm=CascadeRAG(...))` over `SimpleDirectoryReader` documents (top 2).
- LangChain: `InMemoryVectorStore(embedding=CascadeEmbeddings(...))`, its retriever (top 3)
  over 800-character chunks, and an LCEL stuff-documents chain into `ChatCascadeRAG`.

Each is run on a fresh engine per row: "flat" is the prompt as the framework gives it
(`passage_chunks=False`: cut after line ends, today's behaviour), "passages" composes the
embedded passages found in it as chunks; under exact prefix reuse and reuse anywhere. Printed
per question: prompt tokens, cached, recomputed; per row the totals and the ratio of cached
tokens to the flat baseline of the same reuse mode, and how many answers (8 greedy tokens)
equal the exact ones (prefix reuse gives the answer of a full prefill of the same ids).

    python bench/bench_stock_paths.py
"""

from __future__ import annotations

import time
from pathlib import Path

from langchain_cascade_rag import CascadeEmbeddings, ChatCascadeRAG
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.llms.cascade_rag import CascadeEmbedding, CascadeRAG

import cascade_rag.data
from cascade_rag.llm import CascadeEngine
from cascade_rag.models.loader import load_model
from cascade_rag.retrieval import Embedder
from cascade_rag.sampling import SamplingParams

DOCS = Path(cascade_rag.data.__file__).parent / "docs"
MAX_TOKENS = 8
QUESTIONS = [
    "How often does the F1 ferry to Gull Island run?",
    "Can I take my bike on the ferry?",
    "How much does it cost to rent a bike for a day?",
    "How much does a monthly tram pass cost?",
    "When does the last ferry leave Harbour Gate?",
    "Where can I park my bicycle near Central Station?",
    "How much is a ferry ticket?",
    "Which tram goes to the harbour?",
]


def record(engine):
    """Wrap engine.generate: (outputs, prompts) of every call."""
    outputs, prompts = [], []
    generate = engine.generate

    def recording(prompt, sampling=None):
        out = generate(prompt, sampling)
        outputs.append(out)
        prompts.append(prompt)
        return out

    engine.generate = recording
    return outputs, prompts


def llamaindex_run(model, embedder, mode, passages):
    with CascadeEngine(model, kv_cache_tokens=16384, chunk_reuse=mode) as engine:
        documents = SimpleDirectoryReader(str(DOCS)).load_data()
        embed_model = CascadeEmbedding(embedder, engine=engine if passages else None)
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
        llm = CascadeRAG(engine, max_tokens=MAX_TOKENS, passage_chunks=passages)
        query_engine = index.as_query_engine(llm=llm)
        outputs, prompts = record(engine)
        start = time.perf_counter()
        for q in QUESTIONS:
            query_engine.query(q)
        return outputs, prompts, time.perf_counter() - start, engine


def langchain_run(model, embedder, mode, passages):
    with CascadeEngine(model, kv_cache_tokens=16384, chunk_reuse=mode) as engine:
        files = sorted(p for p in DOCS.iterdir() if p.suffix in (".md", ".txt"))
        docs = [Document(p.read_text(encoding="utf-8"), metadata={"source": p.name}) for p in files]
        docs = RecursiveCharacterTextSplitter(chunk_size=800, chunk_overlap=0).split_documents(docs)
        embeddings = CascadeEmbeddings(embedder=embedder, engine=engine if passages else None)
        store = InMemoryVectorStore(embedding=embeddings)
        store.add_documents(docs)
        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", "Answer the question using only this context.\n\n{context}"),
                ("human", "{question}"),
            ]
        )
        chain = (
            {
                "context": store.as_retriever(search_kwargs={"k": 3})
                | (lambda ds: "\n\n".join(d.page_content for d in ds)),
                "question": RunnablePassthrough(),
            }
            | prompt
            | ChatCascadeRAG(engine=engine, max_tokens=MAX_TOKENS, passage_chunks=passages)
            | StrOutputParser()
        )
        outputs, prompts = record(engine)
        start = time.perf_counter()
        for q in QUESTIONS:
            chain.invoke(q)
        return outputs, prompts, time.perf_counter() - start, engine


def exact_answers(engine_model, prompts) -> list[tuple[int, ...]]:
    """Greedy answers of a full prefill (no chunk cache) of each prompt's token ids."""
    with CascadeEngine(engine_model, kv_cache_tokens=16384, enable_chunk_cache=False) as full:
        outs = [full.generate(p, SamplingParams(max_tokens=MAX_TOKENS)) for p in prompts]
        return [tuple(o.token_ids) for o in outs]


def main() -> None:
    model, embedder = load_model(), Embedder()
    runs = (("LlamaIndex query engine", llamaindex_run), ("LangChain LCEL", langchain_run))
    for name, run in runs:
        print(f"\n## {name}: {len(QUESTIONS)} questions, {MAX_TOKENS} new tokens each")
        exact = None
        for mode in ("prefix", "anywhere"):
            flat_cached = None
            for passages in (False, True):
                outputs, prompts, seconds, _ = run(model, embedder, mode, passages)
                if exact is None:  # the flat prompts: the same token ids in every row
                    exact = exact_answers(model, prompts)
                label = f"{mode:8s} {'passages' if passages else 'flat':8s}"
                per_q = " ".join(
                    f"{o.usage.prompt_tokens}/{o.usage.cached_tokens}/{o.usage.recomputed_tokens}"
                    for o in outputs
                )
                prompt = sum(o.usage.prompt_tokens for o in outputs)
                cached = sum(o.usage.cached_tokens for o in outputs)
                recomputed = sum(o.usage.recomputed_tokens for o in outputs)
                same = sum(tuple(o.token_ids) == e for o, e in zip(outputs, exact))
                ratio = ""
                if flat_cached is not None:
                    ratio = f" ({cached / max(flat_cached, 1):.1f}x flat)"
                print(f"{label} per question prompt/cached/recomputed: {per_q}")
                print(
                    f"{label} total: {prompt} prompt, {cached} cached{ratio}, {recomputed} "
                    f"recomputed, {prompt - cached} computed; {same}/{len(outputs)} answers "
                    f"exact; {seconds:.1f} s"
                )
                if flat_cached is None:
                    flat_cached = cached


if __name__ == "__main__":
    main()
