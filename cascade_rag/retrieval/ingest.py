"""Documents from a folder, and passages from documents.

`load_documents` reads .txt/.md as UTF-8, .pdf with pypdf and .html/.htm with BeautifulSoup
(visible text only). A file that cannot be read, is binary, does not decode, or has no text is
skipped with a logged warning and listed in the result's `skipped`; it never stops the others.
`split_documents` cuts documents into overlapping passages of at most `chunk_size` characters
with langchain-text-splitters' RecursiveCharacterTextSplitter (paragraphs, then lines, then
words; Markdown at headings first).

This module neither embeds nor indexes (see `embedder.py`, `index.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".txt", ".md", ".pdf", ".html", ".htm")
_BINARY_PROBE = 8192  # bytes read to spot a NUL byte in a text file


@dataclass
class Document:
    """One file's text.

    Attributes:
        text: the extracted text.
        source: the file's path, as found under the folder.
        metadata: extras: "file_name", "extension", and "num_pages" (PDF) or "title" (HTML).
    """

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Passage:
    """A piece of a document: the unit that is embedded, indexed and retrieved.

    Attributes:
        text: the passage text.
        source: the path of the document it came from.
        metadata: the document's metadata plus "source", "position" (index of the passage in
            its document) and "start_index" (character offset in the document's text).
        chunk_id: the id of the engine chunk holding this text, once indexed (None before).
    """

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_id: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file `load_documents` could not use, and why."""

    path: str
    reason: str


class LoadedDocuments(list):
    """The documents `load_documents` read (a list), with the files it skipped in `skipped`."""

    def __init__(self, documents: Iterable[Document] = (), skipped: Iterable[SkippedFile] = ()):
        super().__init__(documents)
        self.skipped: list[SkippedFile] = list(skipped)


def load_documents(
    folder: str | Path,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    show_progress: bool = True,
) -> LoadedDocuments:
    """Read every file with one of `extensions` under `folder` (recursively, sorted by path).

    Args:
        folder: a folder of documents (or a single document file).
        extensions: file suffixes to read, case-insensitive; other files are ignored silently.
        show_progress: show a tqdm progress bar.
    Returns:
        a list of `Document`s with a `skipped` attribute: the `SkippedFile`s (unreadable,
        binary, undecodable or empty files), also logged as one warning.
    Raises:
        FileNotFoundError: `folder` does not exist.
        ValueError: no file gave a usable document.

    Example:
        >>> docs = load_documents("handbook/", show_progress=False)
        >>> docs[0].source, len(docs.skipped)
    """
    paths = list_document_files(folder, extensions)
    documents: list[Document] = []
    skipped: list[SkippedFile] = []
    for path in tqdm(paths, desc="Reading documents", unit="file", disable=not show_progress):
        try:
            text, extra = _read(path)
        except _Unusable as exc:
            skipped.append(SkippedFile(str(path), str(exc)))
            continue
        if not text.strip():
            skipped.append(SkippedFile(str(path), "no text"))
            continue
        metadata = {"file_name": path.name, "extension": path.suffix.lower(), **extra}
        documents.append(Document(text=text, source=str(path), metadata=metadata))
    if skipped:
        logger.warning(
            "skipped %d of %d files: %s",
            len(skipped),
            len(paths),
            "; ".join(f"{s.path} ({s.reason})" for s in skipped),
        )
    if not documents:
        detail = f"; skipped {len(skipped)} unusable files" if skipped else ""
        raise ValueError(
            f"no usable documents in {str(folder)!r} (looked for "
            f"{', '.join(_normalise_extensions(extensions))}){detail}"
        )
    return LoadedDocuments(documents, skipped)


def split_documents(
    docs: Iterable[Document], chunk_size: int = 800, chunk_overlap: int = 80
) -> list[Passage]:
    """Split documents into passages of at most `chunk_size` characters.

    Args:
        docs: documents (e.g. from `load_documents`).
        chunk_size: most characters per passage.
        chunk_overlap: characters shared by neighbouring passages (< chunk_size).
    Returns:
        passages in document order; whitespace-only pieces are dropped.

    Example:
        >>> passages = split_documents(docs, chunk_size=400, chunk_overlap=40)
        >>> passages[0].metadata["position"], passages[0].metadata["start_index"]
        (0, 0)
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if (
        isinstance(chunk_overlap, bool)
        or not isinstance(chunk_overlap, int)
        or not 0 <= chunk_overlap < chunk_size
    ):
        raise ValueError(
            f"chunk_overlap must be an int in [0, chunk_size={chunk_size}), got {chunk_overlap!r}"
        )
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    plain = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    # Markdown is cut before headings first, so a heading opens its section's passage
    # instead of dangling at the end of the previous one.
    markdown = RecursiveCharacterTextSplitter.from_language(
        Language.MARKDOWN, chunk_size=chunk_size, chunk_overlap=chunk_overlap
    )
    passages: list[Passage] = []
    for doc in docs:
        if not isinstance(doc, Document):
            raise TypeError(f"split_documents takes Documents, got {type(doc).__name__}")
        is_markdown = str(doc.metadata.get("extension", Path(doc.source).suffix)).lower() in (
            ".md",
            ".markdown",
        )
        splitter = markdown if is_markdown else plain
        search_from = 0
        position = 0
        for piece in splitter.split_text(doc.text):
            if not piece.strip():
                continue
            start = doc.text.find(piece, search_from)
            if start >= 0:  # pieces are substrings in order; overlap may step back a little
                search_from = start + 1
            metadata = {**doc.metadata, "source": doc.source, "position": position}
            metadata["start_index"] = start
            passages.append(Passage(text=piece, source=doc.source, metadata=metadata))
            position += 1
    return passages


def list_document_files(
    folder: str | Path, extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[Path]:
    """The files `load_documents` would read, sorted; hidden files and folders are left out.

    Raises:
        FileNotFoundError: `folder` does not exist.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"document folder {str(folder)!r} does not exist")
    wanted = _normalise_extensions(extensions)
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in wanted
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


class _Unusable(Exception):
    """A file that cannot give a document; the message says why."""


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    wanted = []
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip("."):
            raise ValueError(f"bad extension {ext!r}; pass suffixes such as '.txt'")
        wanted.append("." + ext.lower().lstrip("."))
    if not wanted:
        raise ValueError("extensions is empty; pass e.g. ('.txt', '.md')")
    return tuple(wanted)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """(text, extra metadata) of one file; raises `_Unusable`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Unusable(f"unreadable: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(path, data)
    if b"\x00" in data[:_BINARY_PROBE]:
        raise _Unusable("binary content")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unusable(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if suffix in (".html", ".htm"):
        return _html_text(text)
    return text, {}


def _read_pdf(path: Path, data: bytes) -> tuple[str, dict[str, Any]]:
    import io

    from pypdf import PdfReader

    if not data.lstrip()[:5] == b"%PDF-":
        raise _Unusable("not a PDF file")
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types on malformed files
        raise _Unusable(f"unreadable PDF: {type(exc).__name__}: {exc}") from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    return text, {"num_pages": len(pages)}


def _html_text(html: str) -> tuple[str, dict[str, Any]]:
    """Visible text: a line per block element, inline elements joined with their spaces."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_after("\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    text = "\n".join(line for line in lines if line)
    return text, ({"title": title} if title else {})


_HTML_BLOCKS = [
    "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
    "section", "article", "header", "footer", "table", "ul", "ol", "dd", "dt", "title",
]  # fmt: skip
