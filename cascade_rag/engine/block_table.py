"""Persistent block tables: every running sequence's page per page index, kept across steps.

Exact-prefix mode only (reuse anywhere has no per-sequence page table). A sequence gets a row
when it is admitted (its whole page table written once: chain pages, then private pages), its
row grows by one page when a decode step needs a new page, and it gives the row back when it
finishes, is preempted or fails. Nothing is rebuilt per step, so the host work of a decode
step does not depend on the context length.

Memory. The table is one int32 array [num_rows, num_cols] on the host (pinned when the cache is
on CUDA) with a mirror on the cache's device; on the CPU the mirror is the host table itself.
Entries written since the last `sync_to_device` are copied as one packed (index, page) array,
non-blocking from pinned memory, and scattered into the mirror on the device stream, so the
copy never waits for the host and never makes the host wait. Every copy reads a fresh pinned
snapshot (the packed entries, or the whole table after a resize) that nothing writes again, so
the host table can change while a copy is in flight (overlap prepares the next step then).
The table grows (rows or columns doubled, the mirror copied whole) when a sequence needs more
than it holds.

Per row it keeps numpy arrays the step planner reads with vectorized indexing:
`num_pages` (entries written), `kv_len` (tokens with KV after the step the scheduler last
scheduled), `chain_end` (first position after the chunk chain: where the private pages start)
and `generation` (a number unique to every assignment, so a cached plan can tell a row's
occupant from the sequence that held it before, and identify it without the row).

It does not allocate KV pages (kv_cache.py), decide who runs (scheduler.py) or plan levels
(cascade_plan.py); it only records which page holds which page index.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def host_tensor(values: np.ndarray, pin: bool) -> torch.Tensor:
    """A CPU tensor over `values` (zero-copy), or a pinned copy of it when `pin`."""
    t = torch.from_numpy(values)
    return t.pin_memory() if pin else t


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """`values` on `device`: zero-copy on the CPU; elsewhere a non-blocking copy from pinned
    memory (the caching host allocator keeps the pinned block until the copy is done)."""
    t = torch.from_numpy(values)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class BlockTable:
    """Rows of page ids per page index for the running sequences (see the module docstring).

    Args:
        page_size: slots per page.
        device: the KV cache's device (the mirror lives there).
        num_rows, num_cols: initial capacity (both grow on demand).
        mirror: keep a separate device copy (default: unless the device is the CPU; tests
            turn it on for the CPU to check the copies).

    Example:
        >>> table = BlockTable(page_size=16, device=torch.device("cpu"))
        >>> row = table.assign([(0, [4, 9]), (2, [7])], kv_len=40, chain_end=32)
        >>> table.append(row, [12])
        >>> table.pages(row)
        [4, 9, 7, 12]
    """

    def __init__(
        self,
        page_size: int,
        device: torch.device | str,
        num_rows: int = 64,
        num_cols: int = 256,
        mirror: bool | None = None,
    ) -> None:
        self.page_size = page_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._mirror = self.device.type != "cpu" if mirror is None else mirror
        self.num_rows = 0
        self.num_cols = 0
        self._free: list[int] = []
        self._dirty: list[int] = []  # flat host indices written since the last sync
        self._full_sync = False
        self._generations = itertools.count(1)
        self.num_pages = np.zeros(0, np.int64)
        self.kv_len = np.zeros(0, np.int64)
        self.chain_end = np.zeros(0, np.int64)
        self.generation = np.zeros(0, np.int64)
        self._resize(max(num_rows, 1), max(num_cols, 1))

    # ---- rows ----------------------------------------------------------------------------

    def assign(self, runs: list[tuple[int, list[int]]], kv_len: int, chain_end: int) -> int:
        """A fresh row holding `runs` of pages: (first page index, pages); a later run
        overwrites an earlier one where they meet (the deepest owner of a boundary page wins).

        Returns the row; the row's page count is the end of the furthest run.
        """
        if not self._free:
            self._resize(2 * self.num_rows, self.num_cols)
        row = self._free.pop()
        end = max((first + len(pages) for first, pages in runs), default=0)
        if end > self.num_cols:
            self._resize(self.num_rows, max(2 * self.num_cols, end))
        for first, pages in runs:
            if pages:
                self.host[row, first : first + len(pages)] = pages
        self.num_pages[row] = end
        self.kv_len[row] = kv_len
        self.chain_end[row] = chain_end
        self.generation[row] = next(self._generations)
        if self._mirror and not self._full_sync:
            base = row * self.num_cols
            self._dirty.extend(range(base, base + end))
        return row

    def append(self, row: int, pages: list[int]) -> None:
        """Add `pages` after the row's last page (a sequence grew into new pages)."""
        n = int(self.num_pages[row])
        end = n + len(pages)
        if end > self.num_cols:
            self._resize(self.num_rows, max(2 * self.num_cols, end))
        self.host[row, n:end] = pages
        self.num_pages[row] = end
        if self._mirror and not self._full_sync:
            base = row * self.num_cols
            self._dirty.extend(range(base + n, base + end))

    def release(self, row: int) -> None:
        """Give a row back (its sequence finished, was preempted or failed)."""
        assert 0 <= row < self.num_rows and row not in self._free, f"row {row} released twice"
        self.num_pages[row] = 0
        self.kv_len[row] = 0
        self._free.append(row)

    def pages(self, row: int) -> list[int]:
        """The row's pages in page-index order (for tests and the slow reference)."""
        return self.host[row, : int(self.num_pages[row])].tolist()

    @property
    def num_used(self) -> int:
        return self.num_rows - len(self._free)

    # ---- device mirror -------------------------------------------------------------------

    def sync_to_device(self) -> None:
        """Copy the entries written since the last call to the device mirror (non-blocking:
        one packed copy from pinned memory and one scatter on the device stream)."""
        if not self._mirror:
            return
        if self._full_sync:
            # from a pinned snapshot: the host table may be written again (the next step is
            # prepared while this one runs, with overlap) before the copy is done
            self.dev.copy_(host_tensor(self.host.copy(), self._pin), non_blocking=True)
            self._full_sync = False
            self._dirty.clear()
            return
        if not self._dirty:
            return
        index = np.array(self._dirty, dtype=np.int64)
        self._dirty.clear()
        packed = np.stack([index, self.host.reshape(-1)[index].astype(np.int64)])
        on_dev = to_device(packed, self.device)  # [2, n]: flat index, page
        self.dev.view(-1).index_copy_(0, on_dev[0], on_dev[1].to(torch.int32))

    def _resize(self, num_rows: int, num_cols: int) -> None:
        host = torch.zeros((num_rows, num_cols), dtype=torch.int32, pin_memory=self._pin)
        if self.num_rows:
            host[: self.num_rows, : self.num_cols] = self._host
        self._host = host
        self.host = host.numpy()  # [num_rows, num_cols] int32 view of the host table
        if self._mirror:
            self.dev = torch.zeros_like(host, device=self.device)
            self._full_sync = True  # the new mirror is copied whole at the next sync
        else:
            self.dev = host  # [num_rows, num_cols] int32: the planner gathers from it
        grow = num_rows - self.num_rows
        if grow:
            for name in ("num_pages", "kv_len", "chain_end", "generation"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(grow, np.int64)]))
            self._free.extend(range(num_rows - 1, self.num_rows - 1, -1))
        self.num_rows, self.num_cols = num_rows, num_cols
