"""Documents from a folder, and passages from documents.

`load_documents` reads .txt/.md/.rst (and, on request, files without an extension) as UTF-8
text, .pdf with pypdf and .html/.htm with a linear-time scanner (`html_text.py`, visible text
only). Which files are read is decided by `files.scan_folder` (symlinks out of the folder are
not followed unless asked). Every file not read is reported, with its reason, in the result's
`report` (an `IngestReport`): the files not asked for (hidden, other extensions) in `ignored`,
the files asked for that could not be used (binary, not UTF-8, unreadable, empty, too large,
symlinks refused...) in `skipped`, which is also logged as one warning. A bad file never stops
the others. `split_documents` cuts documents into overlapping passages of at most
`chunk_size` characters with langchain-text-splitters' RecursiveCharacterTextSplitter
(paragraphs, then lines, then words; Markdown at headings first).

This module neither embeds nor indexes (see `embedder.py`, `index.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cascade_rag.retrieval.files import (
    DEFAULT_EXTENSIONS,
    FollowedSymlink,
    SkipKind,
    SkippedFile,
    list_document_files,
    normalise_extensions,
    scan_folder,
)
from cascade_rag.retrieval.html_text import html_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_FILE_BYTES",
    "Document",
    "FollowedSymlink",
    "IngestReport",
    "LoadedDocuments",
    "NoUsableDocumentsError",
    "Passage",
    "SkipKind",
    "SkippedFile",
    "list_document_files",
    "load_documents",
    "split_documents",
]

DEFAULT_MAX_FILE_BYTES = 100 * 2**20  # larger files are reported as too large, not read
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
            its document) and "start_index" (character offset in the document's text). It must
            be JSON-serialisable with str keys (the index saves it as JSON).
        chunk_id: the id of the engine chunk holding this text, once indexed (None before).
    """

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_id: str | None = None


@dataclass
class IngestReport:
    """What `load_documents` read, and every file it did not read, with the reason.

    Attributes:
        folder: the folder as given.
        num_read: files that gave a document.
        skipped: files asked for that could not be used (binary, not UTF-8, unreadable,
            empty, too large, symlinks out of the folder, folders already read, special files).
        ignored: files not asked for: hidden ones and other extensions.
        followed: symlinks out of the folder that were followed (`follow_symlinks=True`).
    """

    folder: str
    num_read: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: list[SkippedFile] = field(default_factory=list)
    followed: list[FollowedSymlink] = field(default_factory=list)

    @property
    def not_read(self) -> list[SkippedFile]:
        """`skipped` and `ignored` together, sorted by path."""
        return sorted(self.skipped + self.ignored, key=lambda s: s.path)

    def by_kind(self) -> dict[SkipKind, list[SkippedFile]]:
        """The files not read, grouped by kind, the largest group first."""
        groups: dict[SkipKind, list[SkippedFile]] = defaultdict(list)
        for s in self.not_read:
            groups[s.kind].append(s)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0].value)))

    def summary(self, max_paths: int = 3) -> str:
        """Lines for people: files read, then per reason a count and the first few paths.

        Example:
            >>> print(docs.report.summary())
            read 2 files; not read: 3
              unsupported extension: 2 (data.csv, logo.png)
              symlink outside the folder: 1 (secrets.txt)
        """
        not_read = self.not_read
        head = f"read {self.num_read} files; "
        lines = [head + (f"not read: {len(not_read)}" if not_read else "every file was read")]
        for kind, items in self.by_kind().items():
            shown = ", ".join(self._display(s.path) for s in items[:max_paths])
            more = f", and {len(items) - max_paths} more" if len(items) > max_paths else ""
            lines.append(f"  {kind.value}: {len(items)} ({shown}{more})")
        if self.followed:
            shown = ", ".join(
                f"{self._display(f.path)} -> {f.target}" for f in self.followed[:max_paths]
            )
            more = (
                f", and {len(self.followed) - max_paths} more"
                if len(self.followed) > max_paths
                else ""
            )
            lines.append(
                f"  followed {len(self.followed)} symlinks out of the folder: {shown}{more}"
            )
        return "\n".join(lines)

    def _display(self, path: str) -> str:
        try:
            return Path(path).relative_to(Path(self.folder).expanduser()).as_posix() or path
        except ValueError:
            return path


class NoUsableDocumentsError(ValueError):
    """`load_documents` found no file that gave a document; `report` says why for each."""

    def __init__(self, message: str, report: IngestReport) -> None:
        super().__init__(message)
        self.report = report


class LoadedDocuments(list):
    """The documents `load_documents` read (a list), with its `report`.

    `skipped`, `ignored` and `followed` are the report's lists.
    """

    def __init__(self, documents: Iterable[Document] = (), report: IngestReport | None = None):
        super().__init__(documents)
        self.report = report if report is not None else IngestReport(folder="")

    @property
    def skipped(self) -> list[SkippedFile]:
        return self.report.skipped

    @property
    def ignored(self) -> list[SkippedFile]:
        return self.report.ignored

    @property
    def followed(self) -> list[FollowedSymlink]:
        return self.report.followed


def load_documents(
    folder: str | Path,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    show_progress: bool = True,
    *,
    follow_symlinks: bool = False,
    include_extensionless: bool = False,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> LoadedDocuments:
    """Read every file with one of `extensions` under `folder` (recursively, sorted by path).

    Args:
        folder: a folder of documents (or a single document file).
        extensions: file suffixes to read, case-insensitive. .pdf and .html/.htm are parsed;
            every other suffix (.txt, .md, .rst, or one you add) is read as UTF-8 text.
        show_progress: show a tqdm progress bar.
        follow_symlinks: follow symlinks whose target is outside `folder`; by default they
            are skipped and reported as "symlink outside the folder".
        include_extensionless: also read files without an extension, as text.
        max_file_bytes: larger files are reported as too large and not read; None: no limit.
    Returns:
        a list of `Document`s with a `report` (an `IngestReport`) of every file not read and
        why, and of the symlinks followed; `skipped` is also logged as one warning.
    Raises:
        FileNotFoundError: `folder` does not exist.
        NoUsableDocumentsError (a ValueError): no file gave a usable document; its `report`
            (also in the message) says why for each file.
        ValueError: a bad extension or `max_file_bytes`.

    Example:
        >>> docs = load_documents("handbook/", extensions=(".md", ".rst"), show_progress=False)
        >>> docs[0].source, len(docs.report.not_read)
    """
    if max_file_bytes is not None and (
        isinstance(max_file_bytes, bool)
        or not isinstance(max_file_bytes, int)
        or max_file_bytes <= 0
    ):
        raise ValueError(f"max_file_bytes must be a positive int or None, got {max_file_bytes!r}")
    scan = scan_folder(
        folder,
        extensions,
        follow_symlinks=follow_symlinks,
        include_extensionless=include_extensionless,
    )
    report = IngestReport(
        str(folder), skipped=list(scan.skipped), ignored=list(scan.ignored), followed=scan.followed
    )
    documents: list[Document] = []
    paths = scan.files
    for path in tqdm(paths, desc="Reading documents", unit="file", disable=not show_progress):
        try:
            text, extra = _read(path, max_file_bytes)
            if not text.strip():
                raise _Unusable(SkipKind.EMPTY, "no text")
        except _Unusable as exc:
            report.skipped.append(SkippedFile(str(path), exc.reason, exc.kind))
            continue
        metadata = {"file_name": path.name, "extension": path.suffix.lower(), **extra}
        documents.append(Document(text=text, source=str(path), metadata=metadata))
    report.num_read = len(documents)
    report.skipped.sort(key=lambda s: s.path)
    if report.skipped:
        logger.warning(
            "skipped %d of %d files: %s",
            len(report.skipped),
            len(paths) + len(scan.skipped),
            "; ".join(f"{s.path} ({s.reason})" for s in report.skipped),
        )
    if report.followed:
        logger.warning(
            "followed %d symlinks out of %s: %s",
            len(report.followed),
            folder,
            "; ".join(f"{f.path} -> {f.target}" for f in report.followed),
        )
    if report.ignored:
        logger.info(
            "ignored %d files not asked for (hidden or other extensions)", len(report.ignored)
        )
    if not documents:
        detail = f"; skipped {len(report.skipped)} unusable files" if report.skipped else ""
        raise NoUsableDocumentsError(
            f"no usable documents in {str(folder)!r} (looked for "
            f"{', '.join(normalise_extensions(extensions))}){detail}\n{report.summary()}",
            report,
        )
    return LoadedDocuments(documents, report)


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


class _Unusable(Exception):
    """A file that cannot give a document: its `SkipKind` and a reason for people."""

    def __init__(self, kind: SkipKind, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _read(path: Path, max_file_bytes: int | None) -> tuple[str, dict[str, Any]]:
    """(text, extra metadata) of one file; raises `_Unusable`."""
    try:
        size = path.stat().st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise _Unusable(
                SkipKind.TOO_LARGE,
                f"too large ({size} bytes > max_file_bytes={max_file_bytes})",
            )
        data = path.read_bytes()
    except OSError as exc:
        raise _Unusable(SkipKind.UNREADABLE, f"unreadable: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(data)
    if b"\x00" in data[:_BINARY_PROBE]:
        raise _Unusable(SkipKind.BINARY, "binary content")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unusable(
            SkipKind.NOT_UTF8, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    if suffix in (".html", ".htm"):
        text, title = html_text(text)
        return text, ({"title": title} if title else {})
    return text, {}


def _read_pdf(data: bytes) -> tuple[str, dict[str, Any]]:
    import io

    from pypdf import PdfReader

    if not data.lstrip()[:5] == b"%PDF-":
        raise _Unusable(SkipKind.UNREADABLE, "not a PDF file")
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types on malformed files
        raise _Unusable(
            SkipKind.UNREADABLE, f"unreadable PDF: {type(exc).__name__}: {exc}"
        ) from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    return text, {"num_pages": len(pages)}
