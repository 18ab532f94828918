"""A request inside the engine: its prompt as a chain of chunks, its tokens and its KV pages.

A `Sequence` does no scheduling and no compute; the scheduler moves it between states and
keeps its page table in a block-table row (block_table.py), which the model runner reads.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from cascade_rag.chunks import Chunk
from cascade_rag.engine.kv_cache import ChunkNode
from cascade_rag.sampling import SamplingParams


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as token ids: a chain of cacheable chunks, then private tokens.

    Attributes:
        chunks: chunks whose KV may be shared with other requests, in prompt order.
        tail_ids: the request's own tokens after the chunks (the query, the generation
            prompt); never empty, so the last prompt token is always computed by the request.
    """

    chunks: tuple[Chunk, ...]
    tail_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.tail_ids:  # a caller may build one by hand
            raise ValueError(
                "PreparedPrompt.tail_ids is empty; a prompt ends with at least one private token"
            )

    @property
    def token_ids(self) -> list[int]:
        ids: list[int] = []
        for chunk in self.chunks:
            ids.extend(chunk.token_ids)
        ids.extend(self.tail_ids)
        return ids

    @property
    def num_chunk_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state. `token_ids` = prompt + generated tokens so far.

        While RUNNING it pins `nodes` (its chain of chunk nodes) and owns `private_pages`
        (the pages of positions after the chain). With reuse anywhere (engine/segments.py) its
        nodes are `placements` (the anchor first), its private pages hold positions
        [private_start, len(token_ids)) from slot 0, and `cow_pages` are its private copies of
        chunk pages that hold recomputed tokens. `num_kv` tokens have KV in the cache; the
        tokens after that are computed by the next step. With exact prefix reuse a running
        sequence holds row `block_row` of the scheduler's block table (-1 when it holds none).
    With overlap its last `num_pending` tokens are placeholders of steps not read back yet.
    """

    prompt: PreparedPrompt
    params: SamplingParams
    generator: torch.Generator | None = None
    max_tokens: int = 0  # params.max_tokens, clamped to the context window
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    nodes: list[ChunkNode] = field(default_factory=list)
    private_pages: list[int] = field(default_factory=list)
    num_kv: int = 0
    num_cached_tokens: int | None = None  # prompt tokens reused at first admission
    num_recomputed_tokens: int = 0  # tokens of reused chunks recomputed in context (anywhere)
    placements: list = field(default_factory=list)  # segments.Placement, prompt order
    private_start: int = 0  # reuse anywhere: first position of the private segment
    cow_pages: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    isolate: bool = False  # its batch failed: run its next step alone to find the culprit
    num_prompt_computed: int = 0  # prompt positions computed at least once (for usage stats)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, if asked
    finish_reason: str | None = None
    block_row: int = -1
    num_pending: int = 0  # overlap: placeholder tokens at the end (launched, not read back)
    _table_key: tuple | None = field(default=None, repr=False)
    _chain_table: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = self.prompt.token_ids
            self.num_prompt_tokens = len(self.token_ids)
        if not self.max_tokens:
            self.max_tokens = self.params.max_tokens

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def chain_end(self) -> int:
        """First position after the chunk chain: where the private pages start."""
        return self.nodes[-1].end if self.nodes else 0

    def page_table(self, page_size: int) -> list[int]:
        """Page id per page index for positions [0, len(token_ids)).

        Deeper owners replace the shallower owner's partial page at their boundary index,
        so only the last page of the table can be partial. This builds the list from the
        nodes (O(pages)): the slow reference of the sequence's block-table row, which the
        engine reads instead.
        """
        key = (len(self.nodes), self.nodes[-1].node_id if self.nodes else -1)
        if self._table_key != key:  # new chain (admission): rebuild the chain part
            self._chain_table = []
            for node in self.nodes:
                self._chain_table[node.start // page_size :] = node.pages
            self._table_key = key
        first_private = self.chain_end // page_size
        if not self.private_pages:
            return list(self._chain_table)
        # only the private pages grow step by step
        return self._chain_table[:first_private] + self.private_pages
