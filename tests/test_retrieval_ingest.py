"""Ingestion: which files are read, why every other one is not, symlinks, HTML in linear time,
and the `ingest` command's summary.

No model is loaded: the CLI test runs `cascade-rag ingest` in-process on a fake engine (chunk ids
from the text's bytes) and a bag-of-words embedder.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from pathlib import Path

import pytest

from cascade_rag import cli
from cascade_rag.chunks import ChunkRegistry, ChunkType
from cascade_rag.retrieval import (
    DocumentIndex,
    SkipKind,
    load_documents,
    scan_folder,
)
from cascade_rag.retrieval.html_text import html_text
from cascade_rag.retrieval.ingest import NoUsableDocumentsError
from cascade_rag.testing import WordHashEmbedder


def names(entries) -> dict[str, SkipKind]:
    return {Path(s.path).name: s.kind for s in entries}


# ---- symlinks ------------------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path):
    """docs/ with symlinks out of it (a file, a folder), inside it, broken, and a loop."""
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_text("The vault code is 1234.")
    (outside / "deep" / "notes.md").write_text("Outside notes about trams.")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.md").write_text("The ferry leaves at noon.")
    (docs / "sub" / "real.txt").write_text("Trams run all night.")
    (docs / "leak.txt").symlink_to(outside / "secret.txt")
    (docs / "outdir").symlink_to(outside)
    (docs / "alias.txt").symlink_to(docs / "guide.md")  # inside: read under its own name
    (docs / "subalias").symlink_to(docs / "sub")  # inside: read through sub/
    (docs / "dangling.txt").symlink_to(tmp_path / "nothing.txt")
    (docs / "sub" / "up").symlink_to(docs)  # a loop back to the top
    (outside / "back").symlink_to(outside)  # a loop inside the outside folder
    (docs / "a.md").symlink_to(docs / "b.md")  # two links pointing at each other
    (docs / "b.md").symlink_to(docs / "a.md")
    return docs


def test_symlinks_out_of_the_folder_are_skipped_and_reported(linked):
    docs = load_documents(linked, show_progress=False)
    read = sorted(Path(d.source).relative_to(linked).as_posix() for d in docs)
    assert read == ["alias.txt", "guide.md", "sub/real.txt"]
    assert not any("vault" in d.text or "Outside" in d.text for d in docs)
    skipped = {Path(s.path).relative_to(linked).as_posix(): s for s in docs.skipped}
    for name in ("leak.txt", "outdir"):
        assert skipped[name].kind is SkipKind.SYMLINK_OUTSIDE
        assert skipped[name].reason.startswith("symlink outside the folder")
    assert skipped["dangling.txt"].kind is SkipKind.BROKEN_SYMLINK
    assert skipped["a.md"].kind is skipped["b.md"].kind is SkipKind.BROKEN_SYMLINK  # ELOOP
    assert skipped["subalias"].kind is SkipKind.FOLDER_ALREADY_READ
    assert skipped["sub/up"].kind is SkipKind.FOLDER_ALREADY_READ  # the loop, not walked
    assert docs.followed == []
    summary = docs.report.summary()
    assert "symlink outside the folder: 2 (leak.txt, outdir)" in summary


def test_follow_symlinks_follows_them_and_reports_each_one(linked):
    docs = load_documents(linked, show_progress=False, follow_symlinks=True)
    read = sorted(Path(d.source).relative_to(linked).as_posix() for d in docs)
    assert read == [
        "alias.txt",
        "guide.md",
        "leak.txt",
        "outdir/deep/notes.md",
        "outdir/secret.txt",
        "sub/real.txt",
    ]
    followed = {Path(f.path).relative_to(linked).as_posix(): f.target for f in docs.followed}
    outside = linked.parent / "outside"
    assert followed == {"leak.txt": str(outside / "secret.txt"), "outdir": str(outside)}
    assert names(docs.skipped)["back"] is SkipKind.FOLDER_ALREADY_READ  # outside's own loop
    assert "followed 2 symlinks out of the folder: leak.txt -> " in docs.report.summary()
    assert SkipKind.SYMLINK_OUTSIDE not in {s.kind for s in docs.skipped}


@pytest.mark.parametrize("follow", [False, True])
def test_symlink_loops_end(tmp_path, follow):
    """Folders that link to themselves, to their parent and to each other, in and out."""
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "a" / "b").mkdir(parents=True)
    other.mkdir()
    (root / "a" / "b" / "doc.txt").write_text("A document deep inside.")
    (root / "a" / "b" / "self").symlink_to(root / "a" / "b")
    (root / "a" / "b" / "parent").symlink_to(root / "a")
    (root / "to_other").symlink_to(other)
    (other / "to_root").symlink_to(root)
    (other / "to_self").symlink_to(other)
    (other / "x.txt").write_text("Outside x.")
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(scan=scan_folder(root, follow_symlinks=follow)), daemon=True
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "scan_folder did not end on symlink loops"
    scan = result["scan"]
    read = sorted(p.relative_to(root).as_posix() for p in scan.files)
    assert read == (["a/b/doc.txt", "to_other/x.txt"] if follow else ["a/b/doc.txt"])
    kinds = names(scan.skipped)
    assert kinds["self"] is kinds["parent"] is SkipKind.FOLDER_ALREADY_READ
    if follow:
        assert kinds["to_root"] is kinds["to_self"] is SkipKind.FOLDER_ALREADY_READ
    else:
        assert kinds["to_other"] is SkipKind.SYMLINK_OUTSIDE


# ---- every file not read has its reason ----------------------------------------------------


def test_every_file_not_read_is_reported_with_its_reason(tmp_path, monkeypatch):
    (tmp_path / "good.md").write_text("Line 3 goes to the airport.")
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "Makefile").write_text("all:\n\techo text without an extension")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("inside a hidden folder: not listed alone")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "big.txt").write_text("x" * 2000)
    (tmp_path / "locked.txt").write_text("cannot be read")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block forever
    read_bytes = pathlib.Path.read_bytes

    def deny_locked(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny_locked)
    docs = load_documents(tmp_path, show_progress=False, max_file_bytes=1000)

    assert [Path(d.source).name for d in docs] == ["good.md"]
    assert names(docs.ignored) == {
        ".git": SkipKind.HIDDEN,
        ".hidden.txt": SkipKind.HIDDEN,
        "Makefile": SkipKind.UNSUPPORTED_EXTENSION,
        "data.csv": SkipKind.UNSUPPORTED_EXTENSION,
    }
    assert names(docs.skipped) == {
        "big.txt": SkipKind.TOO_LARGE,
        "binary.txt": SkipKind.BINARY,
        "empty.txt": SkipKind.EMPTY,
        "latin1.txt": SkipKind.NOT_UTF8,
        "locked.txt": SkipKind.UNREADABLE,
        "pipe.txt": SkipKind.NOT_A_FILE,
    }
    by_path = {Path(s.path).name: s.reason for s in docs.report.not_read}
    assert "include_extensionless" in by_path["Makefile"]
    assert "2000 bytes > max_file_bytes=1000" in by_path["big.txt"]
    assert "Permission denied" in by_path["locked.txt"]
    assert len(docs.report.not_read) == 10 and docs.report.num_read == 1
    summary = docs.report.summary(max_paths=1)
    assert summary.splitlines()[0] == "read 1 files; not read: 10"
    assert "  unsupported extension: 2 (Makefile, and 1 more)" in summary
    assert "  hidden: 2 (.git, and 1 more)" in summary
    assert "  not a regular file: 1 (pipe.txt)" in summary


def test_extensions_rst_and_extensionless_files(tmp_path):
    (tmp_path / "guide.rst").write_text("Guide\n=====\n\nThe ferry leaves at noon.")
    (tmp_path / "notes.md").write_text("Trams run all night.")
    (tmp_path / "README").write_text("Read me: the library opens at nine.")
    (tmp_path / "tool").write_bytes(b"\x7fELF\x00\x01binary")
    default = load_documents(tmp_path, show_progress=False)
    assert sorted(Path(d.source).name for d in default) == ["guide.rst", "notes.md"]
    assert "The ferry leaves at noon." in next(d.text for d in default if d.source.endswith("rst"))

    only_rst = load_documents(tmp_path, extensions=(".RST",), show_progress=False)
    assert [Path(d.source).name for d in only_rst] == ["guide.rst"]
    assert names(only_rst.ignored)["notes.md"] is SkipKind.UNSUPPORTED_EXTENSION

    with_bare = load_documents(tmp_path, show_progress=False, include_extensionless=True)
    assert sorted(Path(d.source).name for d in with_bare) == ["README", "guide.rst", "notes.md"]
    assert names(with_bare.skipped) == {"tool": SkipKind.BINARY}

    with pytest.raises(ValueError, match="bad extension"):
        load_documents(tmp_path, extensions=("../x",), show_progress=False)
    with pytest.raises(NoUsableDocumentsError, match="no usable documents") as info:
        load_documents(tmp_path, extensions=(".pdf",), show_progress=False)
    assert len(info.value.report.ignored) == 4 and "unsupported extension: 4" in str(info.value)


# ---- HTML ----------------------------------------------------------------------------------


def test_html_text_keeps_visible_text_and_lines():
    page = (
        "<!DOCTYPE html><html><head><title>Parks &amp; Gardens</title>"
        "<style>p { color: red }</style><script>if (a < b) { x = '</p>'; }</script></head>"
        "<body><h1>Rose <em>garden</em></h1><p>Opens in June.<br>Closes in<br/>October.</p>"
        "<!-- a comment <p>not shown</p> --><noscript><p>Enable scripts</p></noscript>"
        "<template><p>template</p></template><a href='x>y' title=\"a > b\">Map</a> &lt;3"
        "<ul><li>Dogs on leads</li><li>No fires</li></ul><p>3 < 4 and 5 > 4</p></body></html>"
    )
    text, title = html_text(page)
    assert title == "Parks & Gardens"
    assert text.split("\n") == [
        "Parks & Gardens",
        "Rose garden",
        "Opens in June.",
        "Closes in",
        "October.",
        "Map <3",
        "Dogs on leads",
        "No fires",
        "3 < 4 and 5 > 4",
    ]


def _best_time(fn, arg, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best


def test_deeply_nested_html_extracts_in_time_linear_in_size():
    """200 KB of nested <div>s against 200 KB of flat ones: same text, comparable time.

    BeautifulSoup's insert_after walks each tag's whole subtree (O(n * depth)) and took 182 s
    on 550 KB of nested divs; the scanner touches each character a bounded number of times.
    """
    n = 12_000
    nested = "<html><body>" + "".join(f"<div>w{i} " for i in range(n)) + "</div>" * n
    flat = "<html><body>" + "".join(f"<div>w{i} </div>" for i in range(n))
    assert len(nested) == len(flat) and len(nested) > 200_000
    text_nested, _ = html_text(nested)
    text_flat, _ = html_text(flat)
    assert text_nested == text_flat == "\n".join(f"w{i}" for i in range(n))
    ratio = _best_time(html_text, nested) / _best_time(html_text, flat)
    assert ratio < 3, f"nested/flat time ratio {ratio:.2f}"


@pytest.mark.parametrize(
    "unit",
    ["<div>w ", "<a ", "<!--", "<a href='", "</", "< ", "<title>", "<noscript><p>x"],
    ids=["nested", "unclosed-tags", "unclosed-comments", "unclosed-quotes", "end", "lt",
         "titles", "noscript"],
)  # fmt: skip
def test_html_time_grows_linearly_on_damaged_markup(unit):
    """4x the input must take well under 16x the time (quadratic); html.parser on Python 3.11
    takes minutes on 120 KB of `<a <a <a` or unclosed comments."""
    small, large = unit * 10_000, unit * 40_000
    growth = _best_time(html_text, large, 3) / max(_best_time(html_text, small, 3), 1e-4)
    assert growth < 8, f"4x input took {growth:.1f}x the time"


# ---- the ingest command --------------------------------------------------------------------


class ByteEngine:
    """A stand-in CascadeEngine: chunk ids hash the text's UTF-8 bytes."""

    def __init__(self, *args, **kwargs) -> None:
        self.registry = ChunkRegistry("byte-model|bytes:256")

    def register_chunk(self, text, type=ChunkType.RAG_RESULT, metadata=None):
        return self.registry.register(list(text.encode()), type=type, text=text, metadata=metadata)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@pytest.fixture
def fake_models(monkeypatch):
    import cascade_rag.llm
    import cascade_rag.retrieval

    monkeypatch.setattr(cascade_rag.llm, "CascadeEngine", ByteEngine)
    monkeypatch.setattr(
        cascade_rag.retrieval, "Embedder", lambda *args, **kwargs: WordHashEmbedder()
    )


def test_ingest_command_prints_what_it_did_not_read(linked, tmp_path, fake_models, capsys):
    (linked / "table.csv").write_text("a,b")
    (linked / "LICENSE").write_text("Free to use.")
    (linked / "manual.rst").write_text("Manual\n======\n\nBikes cost one crown.")
    index = tmp_path / "index"
    args = ["ingest", str(linked), "--index", str(index), "-q"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "symlink outside the folder: 2 (leak.txt, outdir)" in out
    assert "unsupported extension: 2 (LICENSE, table.csv)" in out
    assert "indexed 3 passages" in out  # alias.txt repeats guide.md's text: stored once

    more = [*args, "--ext", ".md", "--ext", ".csv", "--follow-symlinks", "--include-extensionless"]
    assert cli.main(more) == 0
    out = capsys.readouterr().out
    assert "followed 1 symlinks out of the folder: outdir -> " in out  # leak.txt is a .txt
    assert "unsupported extension: 5 (alias.txt, leak.txt, manual.rst, and 2 more)" in out
    assert "indexed 4 passages" in out  # guide.md, outdir/deep/notes.md, table.csv, LICENSE
    loaded = DocumentIndex.load(index, ByteEngine(), WordHashEmbedder())
    assert sorted(Path(p.source).name for p in loaded.passages()) == [
        "LICENSE",
        "guide.md",
        "notes.md",
        "table.csv",
    ]


def test_ingest_command_with_nothing_usable_prints_why(tmp_path, fake_models, capsys):
    (tmp_path / "a.csv").write_text("a,b")
    (tmp_path / "b.txt").write_text("")
    assert cli.main(["ingest", str(tmp_path), "--index", str(tmp_path / "i"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "read 0 files; not read: 2" in err
    assert "  empty: 1 (b.txt)" in err and "  unsupported extension: 1 (a.csv)" in err
    assert "cascade-rag: error: no usable documents" in err
