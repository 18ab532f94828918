"""The `cascade-rag` command line.

Error paths run the real command in a subprocess (they fail before any model loads). Commands
that answer run in-process with the session's loaded model and one embedder shared by the
module, so no model is loaded twice.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from cascade_rag import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cascade_rag.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_folder_exits_nonzero_with_a_message(tmp_path):
    missing = tmp_path / "no-such-folder"
    for args in (
        ("ask", "Where?", "--docs", str(missing)),
        ("ingest", str(missing), "--index", "x"),
    ):
        result = run_cli(*args)
        assert result.returncode == 1
        assert f"cascade-rag: error: document folder '{missing}' does not exist" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_index_exits_nonzero_with_a_message(tmp_path):
    result = run_cli("ask", "Where?", "--index", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "no index at" in result.stderr and "cascade-rag ingest" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_exit_with_usage():
    result = run_cli("ask", "Where?", "-k", "0")
    assert result.returncode == 2 and "positive integer" in result.stderr


@pytest.fixture(scope="module")
def embedder():
    from cascade_rag.retrieval import Embedder

    return Embedder()


@pytest.fixture
def shared_models(default_model, embedder, monkeypatch):
    """Make the CLI build its engines on the loaded model and reuse one embedder."""
    import cascade_rag.llm
    import cascade_rag.retrieval

    real_engine = cascade_rag.llm.CascadeEngine
    monkeypatch.setattr(
        cascade_rag.llm, "CascadeEngine", lambda model=None, **kw: real_engine(default_model, **kw)
    )
    monkeypatch.setattr(cascade_rag.retrieval, "Embedder", lambda model=None: embedder)


def test_ask_over_the_bundled_documents(shared_models, tmp_path, capsys):
    status = cli.main(
        [
            "ask",
            "When is the Lantern Festival held?",
            "-k",
            "2",
            "--max-tokens",
            "16",
            "--kv-cache-tokens",
            "4096",
            "--cache-dir",
            str(tmp_path),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert len(answer) > len("A: ")
    assert "parks_and_events.md" in out
    assert "cache: " in out and "of prompt tokens from the chunk cache" in out
    assert len(list((tmp_path / "indexes").iterdir())) == 1  # the bundled docs' cached index


def test_ingest_then_chat_over_the_index(shared_models, tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferry.md").write_text("# Ferry\n\nThe Gull Island ferry leaves every 30 minutes.")
    (docs / "junk.txt").write_bytes(b"\x00\x01binary")
    common = ["--kv-cache-tokens", "4096", "-q"]
    index = str(tmp_path / "index")
    assert cli.main(["ingest", str(docs), "--index", index, *common]) == 0
    assert "indexed 1 passages" in capsys.readouterr().out

    monkeypatch.setattr(
        sys, "stdin", io.StringIO("How often does the ferry leave?\n\nexit\nnot read\n")
    )
    status = cli.main(["chat", "--index", index, "--max-tokens", "8", *common])
    out = capsys.readouterr().out
    assert status == 0
    assert out.count("Q: ") == 1 and "not read" not in out
    assert "ferry.md" in out and "cache: " in out
