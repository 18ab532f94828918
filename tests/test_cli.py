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
    result = run_cli("ask", "Where?", "--device", "gpu")
    assert result.returncode == 2 and "expected cpu, cuda or cuda:N, got 'gpu'" in result.stderr
    result = run_cli("chat", "--dtype", "float64")
    assert result.returncode == 2 and "invalid choice: 'float64'" in result.stderr


def test_undecodable_question_exits_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "cascade_rag.cli", "ask", b"Where is \xff?"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cascade-rag: error: the question is not valid" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_comes_from_the_package_metadata():
    from importlib import metadata

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cascade-rag {metadata.version('cascade-rag')}"


@pytest.mark.parametrize("command", ["ingest", "ask", "chat", "demo"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap anywhere
    for shown in ("(default: 16384)", "(default: cpu)", "(default: auto)"):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text
    if command != "ingest":
        assert "(default: 3)" in text and "(default: 128)" in text  # -k, --max-tokens
    if command == "chat":
        assert "(default: 8)" in text  # --history-turns


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
    built: list[dict] = []  # the keyword arguments of every engine the CLI builds

    def engine(model=None, **kw):
        built.append(kw)
        return real_engine(default_model, **kw)

    monkeypatch.setattr(cascade_rag.llm, "CascadeEngine", engine)
    monkeypatch.setattr(cascade_rag.retrieval, "Embedder", lambda model=None, **kw: embedder)
    return built


class WriteRecorder(io.StringIO):
    """stdout that remembers the text written before each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())
        super().flush()


def test_ask_streams_over_the_bundled_documents(shared_models, tmp_path, monkeypatch):
    stdout = WriteRecorder()
    monkeypatch.setattr(sys, "stdout", stdout)
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
    out = stdout.getvalue()
    assert status == 0
    assert shared_models == [
        {"kv_cache_tokens": 4096, "cache_dir": str(tmp_path), "device": "cpu", "dtype": "auto"}
    ]
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert len(answer) > len("A: ")
    # streamed: the answer line reached the terminal in several flushed pieces, before its end
    partial = [f for f in stdout.flushed if "A: " in f and "sources:" not in f]
    assert len({f.split("A: ", 1)[1] for f in partial}) > 2
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

    too_long = "ferry " * 5000  # more tokens than the KV pool holds
    lines = [
        b"How often does the \xff ferry leave?",  # not UTF-8
        b"",
        b"How often does the ferry leave?",
        too_long.encode(),
        b"Where does it leave from?",
        b"exit",
        b"not read",
    ]
    stdin = io.TextIOWrapper(io.BytesIO(b"\n".join(lines) + b"\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    status = cli.main(["chat", "--index", index, "--max-tokens", "8", *common])
    out, err = capsys.readouterr()
    assert status == 0
    assert out.count("Q: ") == 2 and "not read" not in out and "ferry ferry" not in out
    assert "ferry.md" in out and "cache: " in out
    # the second question went with the first one and its answer
    assert "history: 1 earlier turn in the prompt" in out
    errors = err.splitlines()
    assert len(errors) == 2 and all(e.startswith("cascade-rag: error: ") for e in errors)
    assert "line 1 is not valid utf-8 text" in errors[0]
    assert "KV pages" in errors[1] or "context" in errors[1]


def test_interactive_chat_exits_cleanly_on_ctrl_d_and_ctrl_c(
    shared_models, tmp_path, capsys, monkeypatch
):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferry.md").write_text("# Ferry\n\nThe Gull Island ferry leaves every 30 minutes.")
    args = ["chat", "--docs", str(docs), "--cache-dir", str(tmp_path), "--max-tokens", "4", "-q"]
    for end, status in ((EOFError, 0), (KeyboardInterrupt, 130)):
        terminal = FakeTerminal(["How often does the ferry leave?"], end)
        monkeypatch.setattr(sys, "stdin", terminal)
        monkeypatch.setattr("builtins.input", terminal.input)
        assert cli.main(args) == status
        out, err = capsys.readouterr()
        assert terminal.prompts == ["> ", "> "]
        assert out.count("Q: ") == 1 and "Traceback" not in err


class FakeTerminal(io.StringIO):
    """A terminal on stdin: `input` returns the typed lines, then raises `end` (EOFError for
    Ctrl-D, KeyboardInterrupt for Ctrl-C)."""

    def __init__(self, typed: list[str], end: type[BaseException]) -> None:
        super().__init__()
        self.typed, self.end, self.prompts = list(typed), end, []

    def isatty(self) -> bool:
        return True

    def input(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        if not self.typed:
            raise self.end
        return self.typed.pop(0)
