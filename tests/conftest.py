import pytest


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct), float32 on CPU.

    Uses the normal default cache dir, so the gguf conversion (~20 s) happens once per
    machine, not once per test run.
    """
    from cascade_rag.models.loader import load_model

    return load_model()
