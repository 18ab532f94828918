import pytest


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct), float32 on CPU.

    Uses the normal default cache dir, so the gguf conversion (~20 s) happens once per
    machine, not once per test run.
    """
    from cascade_rag.models.loader import load_model

    return load_model()


@pytest.fixture(scope="session", autouse=True)
def _forced_overlap():
    """CASCADE_RAG_TEST_OVERLAP=1 (or 0) runs every engine with overlap on (off) unless its
    config sets `overlap`; unset: the engine's default."""
    import os

    value = os.environ.get("CASCADE_RAG_TEST_OVERLAP")
    if value is None:
        yield
        return
    from cascade_rag.engine import llm_engine

    saved = llm_engine.default_overlap
    llm_engine.default_overlap = lambda device: value == "1"
    yield
    llm_engine.default_overlap = saved
