"""Retrieval: ingestion, the FAISS document index, retrievers over other frameworks, RAGPipeline.

One engine (the real default model) and one embedder are shared by the module; the bundled
Larkhaven documents are indexed once. Tests that change an index build their own.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from pathlib import Path

import numpy as np
import pytest

from cascade_rag.chunks import ChunkType
from cascade_rag.data import docs_dir
from cascade_rag.llm import CascadeEngine
from cascade_rag.rag import DEFAULT_SYSTEM_PROMPT, RAGPipeline
from cascade_rag.retrieval import (
    Document,
    DocumentIndex,
    Embedder,
    Passage,
    Retriever,
    load_documents,
    split_documents,
)
from cascade_rag.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=8192) as eng:
        yield eng


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def bundled_index(engine, embedder):
    return DocumentIndex.from_folder(
        docs_dir(), engine, embedder, chunk_size=400, chunk_overlap=40, show_progress=False
    )


def pdf_bytes(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


# ---- ingestion -------------------------------------------------------------------------------


def test_load_documents_reads_every_format(tmp_path):
    (tmp_path / "notes.txt").write_text("The ferry leaves at noon.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "guide.md").write_text("# Guide\n\nTrams run all night.")
    (tmp_path / "page.HTML").write_text(
        "<html><head><title>Parks</title><script>var x = 'hidden';</script></head>"
        "<body><p>The <b>rose</b> garden opens in June.</p><p>Dogs on leads.</p></body></html>"
    )
    (tmp_path / "report.pdf").write_bytes(pdf_bytes("Copperfield recycling centre"))
    (tmp_path / "data.csv").write_text("ignored,by,extension")
    (tmp_path / ".hidden.txt").write_text("hidden files are ignored")

    docs = load_documents(tmp_path, show_progress=False)

    by_name = {Path(d.source).name: d for d in docs}
    assert sorted(by_name) == ["guide.md", "notes.txt", "page.HTML", "report.pdf"]
    assert by_name["notes.txt"].text == "The ferry leaves at noon."
    assert "Trams run all night." in by_name["guide.md"].text
    html = by_name["page.HTML"]
    assert "The rose garden opens in June.\nDogs on leads." in html.text
    assert "hidden" not in html.text and html.metadata["title"] == "Parks"
    pdf = by_name["report.pdf"]
    assert "Copperfield recycling centre" in pdf.text and pdf.metadata["num_pages"] == 1
    assert docs.skipped == []


def test_unusable_files_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "good.md").write_text("Line 3 goes to the airport.")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 menu".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\n\t ")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (tmp_path / "fake.pdf").write_text("plain text named .pdf")
    (tmp_path / "empty.html").write_text("<html><script>only()</script></html>")
    (tmp_path / "locked.txt").write_text("cannot be read")
    read_bytes = pathlib.Path.read_bytes

    def deny_locked(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny_locked)
    with caplog.at_level(logging.WARNING, logger="cascade_rag.retrieval.ingest"):
        docs = load_documents(tmp_path, show_progress=False)

    assert [Path(d.source).name for d in docs] == ["good.md"]
    reasons = {Path(s.path).name: s.reason for s in docs.skipped}
    assert set(reasons) == {
        "binary.txt",
        "latin1.txt",
        "empty.txt",
        "blank.md",
        "broken.pdf",
        "fake.pdf",
        "empty.html",
        "locked.txt",
    }
    assert reasons["binary.txt"] == "binary content"
    assert "not UTF-8" in reasons["latin1.txt"]
    assert reasons["empty.txt"] == reasons["blank.md"] == reasons["empty.html"] == "no text"
    assert "Permission denied" in reasons["locked.txt"]
    assert "PDF" in reasons["broken.pdf"] and reasons["fake.pdf"] == "not a PDF file"
    (warning,) = [r for r in caplog.records if r.name == "cascade_rag.retrieval.ingest"]
    assert "skipped 8 of 9 files" in warning.getMessage()
    assert all(name in warning.getMessage() for name in reasons)


def test_missing_folder_and_no_usable_documents(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_documents(tmp_path / "nowhere", show_progress=False)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(ValueError, match="no usable documents.*skipped 1"):
        load_documents(tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="no usable documents"):
        load_documents(tmp_path, extensions=(".pdf",), show_progress=False)


def test_split_documents_positions_sizes_and_headings():
    text = "\n\n".join(f"## Section {i}\n\n" + f"Sentence {i} about trams. " * 8 for i in range(4))
    docs = [
        Document(text, "a.md", {"extension": ".md"}),
        Document("Short text.", "b.txt", {"extension": ".txt"}),
    ]
    passages = split_documents(docs, chunk_size=300, chunk_overlap=30)
    from_a = [p for p in passages if p.source == "a.md"]
    assert len(from_a) >= 4 and all(len(p.text) <= 300 for p in passages)
    assert [p.metadata["position"] for p in from_a] == list(range(len(from_a)))
    assert all(text[p.metadata["start_index"] :].startswith(p.text) for p in from_a)
    assert all(p.text.startswith("## Section") for p in from_a)  # Markdown cut at headings
    assert passages[-1].text == "Short text." and passages[-1].metadata["source"] == "b.txt"
    assert all(p.chunk_id is None for p in passages)
    with pytest.raises(ValueError, match="chunk_overlap"):
        split_documents(docs, chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValueError, match="chunk_size"):
        split_documents(docs, chunk_size=0)


# ---- the index -------------------------------------------------------------------------------


def passages_of(*texts: str) -> list[Passage]:
    return [Passage(t, f"doc{i}.txt", {"position": 0}) for i, t in enumerate(texts)]


def test_adding_the_same_text_twice_stores_it_once(engine, embedder):
    index = DocumentIndex(engine, embedder)
    a, b = "Gull Island ferry every 30 minutes.", "Pedal Lark bikes cost 1 crown to unlock."
    assert index.add_passages(passages_of(a, b, a), show_progress=False) == 2
    assert index.add_passages(passages_of(b), show_progress=False) == 0
    assert len(index) == 2
    ids = {p.text: p.chunk_id for p in index.passages()}
    assert ids[a] == engine.register_chunk(a, ChunkType.RAG_RESULT).id
    assert engine.get_chunk(ids[b]).type is ChunkType.RAG_RESULT


@pytest.mark.parametrize(
    "question, expected",
    [
        ("Which tram line goes to the airport?", "tram_lines.md"),
        ("How much does a replacement library card cost?", "library_cards.md"),
        ("When is the Lantern Festival held?", "parks_and_events.md"),
        ("On which day is the grey bin for general waste collected?", "waste_and_recycling.txt"),
    ],
)
def test_search_ranks_the_document_about_the_question_first(bundled_index, question, expected):
    results = bundled_index.search(question, k=3)
    assert Path(results[0][0].source).name == expected
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0


def test_search_limits_and_errors(engine, embedder):
    index = DocumentIndex(engine, embedder)
    with pytest.raises(ValueError, match="the index is empty; ingest documents first"):
        index.search("anything", k=3)
    index.add_passages(passages_of("Alpha text.", "Beta text."), show_progress=False)
    assert len(index.search("alpha", k=50)) == 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive int"):
            index.search("alpha", k=bad)
    with pytest.raises(ValueError, match="query"):
        index.search("  ", k=1)


def test_a_failed_add_leaves_the_index_as_it_was(engine, embedder, monkeypatch):
    index = DocumentIndex(engine, embedder)
    index.add_passages(passages_of("Kept passage one."), show_progress=False)
    calls = []

    def failing_embed(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("embedding failed")
        return np.ones((len(texts), embedder.dim), np.float32) / np.sqrt(embedder.dim)

    monkeypatch.setattr(index.embedder, "embed", failing_embed)
    monkeypatch.setattr(index.embedder, "batch_size", 2)
    with pytest.raises(RuntimeError, match="embedding failed"):
        index.add_passages(passages_of("n1", "n2", "n3", "n4"), show_progress=False)
    monkeypatch.undo()
    assert len(index) == 1 and index._index.ntotal == 1
    assert index.search("kept", k=5)[0][0].text == "Kept passage one."


def test_save_load_round_trip(engine, embedder, bundled_index, tmp_path):
    bundled_index.save(tmp_path / "idx")
    loaded = DocumentIndex.load(tmp_path / "idx", engine, embedder)
    assert len(loaded) == len(bundled_index)
    question = "How many items can I borrow at once?"
    got = [(p.chunk_id, round(s, 5)) for p, s in loaded.search(question, 4)]
    assert got == [(p.chunk_id, round(s, 5)) for p, s in bundled_index.search(question, 4)]
    assert [p.metadata for p in loaded.passages()] == [p.metadata for p in bundled_index.passages()]

    class OtherEmbedder:
        name, dim = "another-model", 768

    with pytest.raises(ValueError, match="built with embedder 'all-MiniLM-L6-v2'"):
        DocumentIndex.load(tmp_path / "idx", engine, OtherEmbedder())
    with pytest.raises(FileNotFoundError, match="no saved index"):
        DocumentIndex.load(tmp_path / "missing", engine, embedder)


class ByteEngine:
    """Another "model": names chunks by the hash of the text's UTF-8 bytes, its own namespace."""

    def __init__(self, namespace: str = "byte-model|bytes:256") -> None:
        from cascade_rag.chunks import ChunkRegistry

        self.registry = ChunkRegistry(namespace)

    def register_chunk(self, text, type=ChunkType.RAG_RESULT, metadata=None):
        return self.registry.register(list(text.encode()), type=type, text=text, metadata=metadata)


def test_load_under_another_chunk_namespace_reregisters_passages(engine, embedder, tmp_path):
    texts = ("Namespace test one.", "Namespace test two.")
    index = DocumentIndex(engine, embedder)
    index.add_passages(passages_of(*texts), False)
    other = DocumentIndex(ByteEngine(), embedder)  # saved by an engine with other chunk ids
    other.add_passages(passages_of(*texts), False)
    other.save(tmp_path / "idx")
    assert {p.chunk_id for p in other.passages()}.isdisjoint(p.chunk_id for p in index.passages())
    loaded = DocumentIndex.load(tmp_path / "idx", engine, embedder)
    assert sorted(p.chunk_id for p in loaded.passages()) == sorted(
        p.chunk_id for p in index.passages()
    )
    assert loaded.search("test two", k=1)[0][0].text == "Namespace test two."


def test_save_is_atomic(engine, embedder, tmp_path, monkeypatch):
    import faiss

    from cascade_rag.retrieval import store as store_module  # the on-disk format

    path = tmp_path / "idx"
    index = DocumentIndex(engine, embedder)
    index.add_passages(passages_of("First saved passage.", "Second saved passage."), False)
    index.save(path)
    index.add_passages(passages_of("Third passage, never saved."), show_progress=False)

    def crash(*args):
        raise OSError("disk full")

    for target, name in ((store_module.os, "replace"), (faiss, "write_index")):
        with monkeypatch.context() as m:
            m.setattr(target, name, crash)
            with pytest.raises(OSError, match="disk full"):
                index.save(path)
        assert len(DocumentIndex.load(path, engine, embedder)) == 2
        assert sorted(f.name for f in path.iterdir() if f.name != ".lock")[0] == "index.json"
        assert len(list(path.glob("vectors-*.faiss"))) == 1 and not list(path.glob("*.tmp"))

    index.save(path)
    assert len(DocumentIndex.load(path, engine, embedder)) == 3
    assert len(list(path.glob("vectors-*.faiss"))) == 1
    (path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the index"):
        DocumentIndex.load(path, engine, embedder)


def test_cached_index_is_reused_and_rebuilt_when_documents_change(
    engine, embedder, tmp_path, monkeypatch
):
    docs, cache = tmp_path / "docs", tmp_path / "cache"
    docs.mkdir()
    (docs / "a.txt").write_text("The harbour market opens on Saturdays.")
    first = DocumentIndex.cached(docs, engine, embedder, cache_dir=cache, show_progress=False)
    assert len(first) == 1 and len(list((cache / "indexes").iterdir())) == 1

    built = []
    original = DocumentIndex.from_folder.__func__
    monkeypatch.setattr(
        DocumentIndex,
        "from_folder",
        classmethod(lambda cls, *a, **kw: built.append(1) or original(cls, *a, **kw)),
    )
    again = DocumentIndex.cached(docs, engine, embedder, cache_dir=cache, show_progress=False)
    assert built == [] and len(again) == 1

    (docs / "b.md").write_text("Founders' Day is the third Monday of May.")
    changed = DocumentIndex.cached(docs, engine, embedder, cache_dir=cache, show_progress=False)
    assert built == [1] and len(changed) == 2
    assert len(list((cache / "indexes").iterdir())) == 1  # replaced, not piled up


# ---- retrievers ------------------------------------------------------------------------------

TEXTS = [f"Fact {name}: the {name} tram stop has a bench." for name in "ABCDEF"]


def langchain_retriever(rankings: dict[str, list[str]]):
    """A LangChain BaseRetriever returning fixed texts per query, in the given order."""
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document as LCDocument
    from langchain_core.retrievers import BaseRetriever

    class FixedRetriever(BaseRetriever):
        rankings: dict

        def _get_relevant_documents(self, query, *, run_manager=None):
            return [
                LCDocument(page_content=t, metadata={"source": f"lc/{t[5]}.txt"})
                for t in self.rankings[query]
            ]

    return FixedRetriever(rankings=rankings)


def test_langchain_retriever_source(engine):
    a, b, c = TEXTS[:3]
    retriever = Retriever(engine, langchain_retriever({"q": [b, a, c, b]}), k=3)
    chunks = retriever.retrieve("q")
    assert [c.id for c in chunks] == sorted(c.id for c in chunks)
    by_text = {c.text: c for c in chunks}
    assert set(by_text) == {a, b, c}  # k=3 cut the repeat of b
    assert by_text[b].metadata["source"] == "lc/B.txt" and by_text[b].metadata["rank"] == 0
    assert by_text[b].metadata["score"] is None
    assert all(c.type is ChunkType.RAG_RESULT and engine.get_chunk(c.id) == c for c in chunks)
    ranked = Retriever(engine, retriever.source, k=2, canonical_order=False).retrieve("q")
    assert [c.text for c in ranked] == [b, a]


def test_canonical_order_shares_the_chunk_prefix_of_overlapping_retrievals(engine):
    """The same passages ranked differently: canonical order gives the same chunk chain."""
    system = "Answer in one word."
    for canonical, (a, b, c) in ((True, TEXTS[:3]), (False, TEXTS[3:6])):
        source = langchain_retriever({"first": [a, b, c], "second": [c, a, b]})
        retriever = Retriever(engine, source, k=3, canonical_order=canonical)
        one, two = retriever.compose("first", system), retriever.compose("second", system)
        chain_one = [c.id for c in engine.prepare(one).chunks]
        chain_two = [c.id for c in engine.prepare(two).chunks]
        assert (chain_one == chain_two) is canonical
        engine.generate(one, SamplingParams(max_tokens=1))
        out = engine.generate(two, SamplingParams(max_tokens=1))
        prepared = engine.prepare(two)
        if canonical:  # every chunk, system prompt included, was computed by the first
            assert out.usage.cached_tokens == prepared.num_chunk_tokens
        else:  # only the system prompt is a shared prefix
            assert out.usage.cached_tokens == len(prepared.chunks[0])


def test_langchain_vector_store_source(engine):
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    words = ["tram", "library", "festival", "ferry"]

    class KeywordEmbeddings(Embeddings):
        def embed_documents(self, texts):
            return [self.embed_query(t) for t in texts]

        def embed_query(self, text):
            v = np.array([text.lower().count(w) for w in words], float) + 0.01
            return (v / np.linalg.norm(v)).tolist()

    store = InMemoryVectorStore(KeywordEmbeddings())
    store.add_texts(
        ["The library lends books.", "The tram is red.", "The festival has lanterns."],
        metadatas=[{"source": "lib.md"}, {"source": "tram.md"}, {"source": "fest.md"}],
    )
    chunks = Retriever(engine, store, k=2, canonical_order=False).retrieve("Which tram?")
    assert len(chunks) == 2 and chunks[0].text == "The tram is red."
    assert chunks[0].metadata["source"] == "tram.md" and chunks[0].metadata["score"] > 0.9
    assert chunks[0].metadata["score"] > chunks[1].metadata["score"]


def test_llama_index_retriever_source(engine):
    pytest.importorskip("llama_index.core")
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, TextNode

    class FixedNodes(BaseRetriever):
        def _retrieve(self, query_bundle):
            return [
                NodeWithScore(node=TextNode(text=t, metadata={"file_name": f"{i}.txt"}), score=s)
                for i, (t, s) in enumerate(zip(TEXTS, [0.9, 0.8, 0.7]))
            ]

    chunks = Retriever(engine, FixedNodes(), k=2, canonical_order=False).retrieve("bench?")
    assert [c.text for c in chunks] == TEXTS[:2]
    assert [c.metadata["score"] for c in chunks] == pytest.approx([0.9, 0.8])
    assert chunks[1].metadata["source"] == "1.txt"
    assert Retriever(engine, FixedNodes(), k=3).compose("bench?").chunks[0].id == min(
        engine.register_chunk(t).id for t in TEXTS[:3]
    )


def test_retriever_rejects_unknown_sources_and_bad_k(engine, bundled_index):
    with pytest.raises(TypeError, match="cannot retrieve from a dict"):
        Retriever(engine, {})
    with pytest.raises(ValueError, match="k must be"):
        Retriever(engine, bundled_index, k=0)
    with pytest.raises(ValueError, match="query"):
        Retriever(engine, bundled_index).retrieve("")


# ---- RAGPipeline with the real model ---------------------------------------------------------


def test_pipeline_answers_from_the_bundled_documents(engine, bundled_index):
    rag = RAGPipeline(
        engine, Retriever(engine, bundled_index, k=3), sampling=SamplingParams(max_tokens=24)
    )
    first = rag.ask("When is the Lantern Festival held?")
    assert "October" in first.text
    assert Path(first.sources[0]["source"]).name == "parks_and_events.md"
    assert set(first.sources[0]) == {"source", "score", "chunk_id"}

    second = rag.ask("When does the Lantern Festival take place?")  # same passages, reranked
    ids = [[s["chunk_id"] for s in a.sources] for a in (first, second)]
    assert sorted(ids[0]) == sorted(ids[1])  # same passages, so the same canonical chain
    chunks = rag.retriever.retrieve(second.question)
    prepared = engine.prepare(rag.compose(second.question, chunks))
    assert second.usage.cached_tokens == prepared.num_chunk_tokens  # system + all passages
    assert prepared.chunks[0].text == DEFAULT_SYSTEM_PROMPT
    assert second.usage.cached_tokens > len(prepared.chunks[0])
    assert engine.stats().cache_hit_rate > 0


def test_pipeline_batches_and_async(engine, bundled_index):
    rag = RAGPipeline(engine, bundled_index, sampling=SamplingParams(max_tokens=6))
    answers = rag.ask_many(["How much does a day pass cost?", "Which tram goes to the airport?"])
    assert [a.question for a in answers] == [
        "How much does a day pass cost?",
        "Which tram goes to the airport?",
    ]
    assert all(a.text and a.usage.completion_tokens <= 6 for a in answers)
    assert rag.ask_many([]) == []
    answer = asyncio.run(rag.aask("Which tram goes to the airport?"))
    assert answer.usage.cached_tokens > 0
    with pytest.raises(ValueError, match="question"):
        rag.ask(" ")
