"""Which files under a document folder are read, and why every other one is not.

`scan_folder` walks a folder (sorted, without recursion limits) and sorts every entry into
one of three lists: the files to read, the files ignored because they were not asked for
(hidden, or an extension not chosen), and the files skipped although they were asked for
(a symlink out of the folder, a broken symlink, a folder already read, something that is not a
regular file). Each entry not read carries a `SkipKind` to group by and a reason to show.

Symlinks: a symlinked file or folder whose target resolves outside the scanned folder is
skipped unless `follow_symlinks=True`, and then each one followed is listed. A symlinked file
inside the folder is read under its own name. A symlinked folder whose target is inside the
folder is not walked (its files are read through their real path), and no folder is walked
twice (folders are told apart by device and inode, which also stops bind-mount loops), so
symlink loops end.

This module does not open files (see `ingest.py`).
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".pdf", ".html", ".htm")


class SkipKind(str, enum.Enum):
    """Why a file was not read; the value is the label a summary groups by."""

    HIDDEN = "hidden"
    UNSUPPORTED_EXTENSION = "unsupported extension"
    SYMLINK_OUTSIDE = "symlink outside the folder"
    BROKEN_SYMLINK = "broken symlink"
    FOLDER_ALREADY_READ = "folder already read"
    NOT_A_FILE = "not a regular file"
    TOO_LARGE = "too large"
    UNREADABLE = "unreadable"
    BINARY = "binary"
    NOT_UTF8 = "not UTF-8"
    EMPTY = "empty"


@dataclass(frozen=True)
class SkippedFile:
    """A file (or folder) that was not read.

    Attributes:
        path: the path as found under the folder.
        reason: what was wrong, for people (e.g. "not UTF-8 text (invalid start byte at 3)").
        kind: the `SkipKind` to group by.
    """

    path: str
    reason: str
    kind: SkipKind


@dataclass(frozen=True)
class FollowedSymlink:
    """A symlink out of the folder that was followed (`follow_symlinks=True`)."""

    path: str
    target: str


@dataclass
class FolderScan:
    """The result of `scan_folder`.

    Attributes:
        root: the folder scanned, as given.
        files: the files to read, sorted by path.
        ignored: files not asked for (hidden, or an extension not chosen), sorted by path.
        skipped: files asked for that cannot be read safely (symlinks refused, folders
            already read, special files), sorted by path.
        followed: symlinks out of the folder that were followed.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    ignored: list[SkippedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    followed: list[FollowedSymlink] = field(default_factory=list)


def scan_folder(
    folder: str | Path,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    *,
    follow_symlinks: bool = False,
    include_extensionless: bool = False,
) -> FolderScan:
    """Sort every entry under `folder` into files to read, ignored and skipped.

    Args:
        folder: a folder of documents, or one document file (read whatever its extension).
        extensions: suffixes to read, case-insensitive (e.g. (".md", ".rst")).
        follow_symlinks: follow symlinks whose target is outside `folder` (each one is
            listed in `followed`); by default they are skipped.
        include_extensionless: also read files without an extension (as text).
    Returns:
        a `FolderScan`.
    Raises:
        FileNotFoundError: `folder` does not exist.
        ValueError: a bad extension, or `folder` is neither a folder nor a regular file.

    Example:
        >>> scan = scan_folder("handbook/", extensions=(".md", ".rst"))
        >>> [s.kind.value for s in scan.skipped]
        ['symlink outside the folder']
    """
    root = Path(folder).expanduser()
    wanted = normalise_extensions(extensions)
    if not root.exists():
        raise FileNotFoundError(f"document folder {str(folder)!r} does not exist")
    scan = FolderScan(root)
    if root.is_file():
        scan.files.append(root)
        return scan
    if not root.is_dir():
        raise ValueError(f"{str(folder)!r} is neither a folder nor a regular file")
    root_real = Path(os.path.realpath(root))
    root_stat = root.stat()
    walked: dict[tuple[int, int], Path] = {(root_stat.st_dev, root_stat.st_ino): root}
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            scan.skipped.append(
                SkippedFile(
                    str(directory), f"unreadable folder: {exc.strerror or exc}", SkipKind.UNREADABLE
                )
            )
            continue
        for entry in entries:
            _sort_entry(
                entry,
                root_real,
                wanted,
                follow_symlinks,
                include_extensionless,
                walked,
                pending,
                scan,
            )
    scan.files.sort()
    scan.ignored.sort(key=lambda s: s.path)
    scan.skipped.sort(key=lambda s: s.path)
    return scan


def list_document_files(
    folder: str | Path,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    *,
    follow_symlinks: bool = False,
    include_extensionless: bool = False,
) -> list[Path]:
    """The files `load_documents` would read, sorted (`scan_folder(...).files`).

    Raises:
        FileNotFoundError: `folder` does not exist.
    """
    return scan_folder(
        folder,
        extensions,
        follow_symlinks=follow_symlinks,
        include_extensionless=include_extensionless,
    ).files


def normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    """Suffixes as lowercase ".ext"; raises ValueError for an empty or bad one."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    wanted = []
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip(".") or any(c in ext for c in "/\\ "):
            raise ValueError(f"bad extension {ext!r}; pass suffixes such as '.txt'")
        wanted.append("." + ext.lower().lstrip("."))
    if not wanted:
        raise ValueError("extensions is empty; pass e.g. ('.txt', '.md')")
    return tuple(wanted)


def _sort_entry(
    entry: os.DirEntry,
    root_real: Path,
    wanted: tuple[str, ...],
    follow_symlinks: bool,
    include_extensionless: bool,
    walked: dict[tuple[int, int], Path],
    pending: list[Path],
    scan: FolderScan,
) -> None:
    """File one directory entry into `scan` (files / ignored / skipped), or queue a folder."""
    path = Path(entry.path)

    def skip(kind: SkipKind, reason: str, ignored: bool = False) -> None:
        (scan.ignored if ignored else scan.skipped).append(SkippedFile(str(path), reason, kind))

    is_link = entry.is_symlink()
    if entry.name.startswith("."):
        is_dir = entry.is_dir(follow_symlinks=False)
        return skip(SkipKind.HIDDEN, "hidden folder" if is_dir else "hidden file", ignored=True)
    try:
        st = path.stat()  # follows symlinks
    except OSError as exc:
        if is_link:
            return skip(SkipKind.BROKEN_SYMLINK, f"broken symlink (to {os.readlink(path)})")
        return skip(SkipKind.UNREADABLE, f"unreadable: {exc.strerror or exc}")
    target = Path(os.path.realpath(path)) if is_link else None
    outside = target is not None and not target.is_relative_to(root_real)

    if stat.S_ISDIR(st.st_mode):
        if is_link and not outside:
            return skip(
                SkipKind.FOLDER_ALREADY_READ,
                f"symlink to {target}, a folder inside the folder (read through its own path)",
            )
        if outside and not follow_symlinks:
            return skip(SkipKind.SYMLINK_OUTSIDE, f"symlink outside the folder (to {target})")
        key = (st.st_dev, st.st_ino)
        if key in walked:
            return skip(
                SkipKind.FOLDER_ALREADY_READ,
                f"{'symlink loop: ' if is_link else ''}same folder as {walked[key]}",
            )
        walked[key] = path
        if outside:
            scan.followed.append(FollowedSymlink(str(path), str(target)))
        pending.append(path)
        return None
    if not stat.S_ISREG(st.st_mode):
        return skip(SkipKind.NOT_A_FILE, "not a regular file (a FIFO, socket or device)")
    suffix = path.suffix.lower()
    if not suffix and not include_extensionless:
        return skip(
            SkipKind.UNSUPPORTED_EXTENSION,
            "no extension (include_extensionless=True / --include-extensionless reads it)",
            ignored=True,
        )
    if suffix and suffix not in wanted:
        return skip(
            SkipKind.UNSUPPORTED_EXTENSION,
            f"extension {suffix} is not one of {', '.join(wanted)}",
            ignored=True,
        )
    if outside:
        if not follow_symlinks:
            return skip(SkipKind.SYMLINK_OUTSIDE, f"symlink outside the folder (to {target})")
        scan.followed.append(FollowedSymlink(str(path), str(target)))
    scan.files.append(path)
    return None
