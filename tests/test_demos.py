"""The demo notebooks run from top to bottom and show chunk-cache hits.

Each notebook is executed with nbclient in a fresh `python3` kernel (this venv's ipykernel), from
the demos/ folder. A cell that raises fails the test with the cell and its traceback; each
notebook's last cell asserts that the engine served prompt tokens from its cache, and the test
reads the printed hit rate back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

DEMOS = Path(__file__).resolve().parent.parent / "demos"
CELL_TIMEOUT_S = 300


def run_notebook(name: str) -> str:
    """Execute demos/<name>; return the text of all its outputs."""
    notebook = nbformat.read(DEMOS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(DEMOS)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", output
            if output["output_type"] == "stream":
                texts.append(output["text"])
            elif "data" in output:
                texts.append(output["data"].get("text/plain", ""))
    return "".join(texts)


@pytest.mark.parametrize(
    "name,integration",
    [
        ("llamaindex_query_engine.ipynb", "llama_index.llms.cascade_rag"),
        ("langchain_rag.ipynb", "langchain_cascade_rag"),
    ],
)
def test_demo_notebook_runs_and_hits_the_cache(name, integration):
    pytest.importorskip(integration)
    text = run_notebook(name)
    assert text.count("Q: ") >= 3, text
    match = re.search(r"cache hit rate: ([0-9.]+)%", text)
    assert match and float(match.group(1)) > 0, text
    if name == "langchain_rag.ipynb":
        reads = re.findall(r"'cache_read': (\d+)", text)
        assert len(reads) >= 3 and any(int(r) > 0 for r in reads), text
