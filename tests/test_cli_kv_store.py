"""`cascade-rag ingest --precompute-kv` and `ask --kv-store`: passages' KV computed at ingest
time is served from disk by a later process (here: a later engine in the same process, built
by the CLI on the session's loaded model)."""

from __future__ import annotations

import pytest

from cascade_rag import cli


@pytest.fixture(scope="module")
def embedder():
    from cascade_rag.retrieval import Embedder

    return Embedder()


@pytest.fixture
def engines(default_model, embedder, monkeypatch):
    """The CLI's engines, built on the loaded model; each records its last stats on close."""
    import cascade_rag.llm
    import cascade_rag.retrieval

    real = cascade_rag.llm.CascadeEngine
    built: list[tuple[dict, dict]] = []

    class Recording(real):
        def __init__(self, model=None, **kw):
            super().__init__(default_model, **kw)
            self.record = {}
            built.append((kw, self.record))

        def close(self):
            if not self.closed:
                self.record.update(stats=self.stats(), store=self.kv_store_stats())
            super().close()

    monkeypatch.setattr(cascade_rag.llm, "CascadeEngine", Recording)
    monkeypatch.setattr(cascade_rag.retrieval, "Embedder", lambda model=None, **kw: embedder)
    return built


def test_ingest_precomputes_kv_and_ask_serves_it_from_disk(engines, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferry.md").write_text("# Ferry\n\nThe Gull Island ferry leaves every 30 minutes.")
    (docs / "tram.md").write_text("# Tram\n\nThe blue tram line runs from the harbour to the zoo.")
    index = str(tmp_path / "index")
    common = ["--kv-cache-tokens", "4096", "-q"]
    assert cli.main(["ingest", str(docs), "--index", index, "--precompute-kv", *common]) == 0
    out = capsys.readouterr().out
    store = str(tmp_path / "index" / "chunk_kv")
    assert f"chunk KV of 2 passages in {store}" in out and f"--kv-store {store}" in out
    kwargs, record = engines[0]
    assert kwargs["chunk_reuse"] == "anywhere" and kwargs["kv_store_dir"] == store
    assert record["store"].entries == 3  # the system prompt and two passages

    question = "How often does the Gull Island ferry leave?"
    args = ["ask", question, "--index", index, "--kv-store", store, "-k", "2", "--max-tokens", "8"]
    assert cli.main([*args, *common]) == 0
    assert "A: " in capsys.readouterr().out
    _, record = engines[1]
    stats = record["stats"]
    # both passages and the system prompt came from disk: only the question was computed
    assert stats.kv_cache.disk_hit_tokens > 0
    assert (
        stats.kv_cache.disk_hit_tokens
        == stats.kv_cache.hit_tokens + stats.kv_cache.recomputed_tokens
    )
    assert record["store"].loads == 3 and record["store"].errors == 0


def test_kv_store_without_reuse_anywhere_is_not_offered_for_serve():
    text = cli._parser().parse_args(["serve"])
    assert not hasattr(text, "kv_store")  # serve builds its engine from its own options
