"""Retrieved passages inside flat prompts, found again and composed as chunks.

A stock RAG pipeline (LlamaIndex's `VectorStoreIndex(...).as_query_engine()`, a LangChain
stuff-documents chain) formats its retrieved passages into the prompt's text, so the LLM gets
a flat string or chat messages and no list of passages. `PassageIndex` remembers the passage
texts the pipeline embedded (the integrations' embedding classes add them when they are bound
to an engine) and finds them again inside a prompt; `PassageIndex.compose` then makes each
passage found a RAG_RESULT chunk of its own (`PromptComposer.prepare_passages`), so the engine
reuses its KV where it comes back: at any position with `chunk_reuse="anywhere"`, after the
same chunks before it with exact prefix reuse.

Matching is exact: a registered text, stripped of surrounding whitespace, found as a substring
of the prompt (longest first, non-overlapping, the first occurrence of each). A text that
starts with LlamaIndex-style metadata lines ("file_path: ...", then a blank line) is also
found by its body alone, for prompts that render other metadata than the embedded text had;
the lines around the body then stay text between chunks. Texts shorter than
`MIN_PASSAGE_CHARS` are not kept.

The prompt's token ids do not change (it is tokenized whole, as without passages, and only cut
where a passage starts and ends on token boundaries), so with exact prefix reuse the answer is
the one the flat prompt gets. The index keeps every text added (like the vector store it
mirrors) until `clear()`.

It does not embed, retrieve or reorder passages.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence

from cascade_rag.chunks import Chunk, ChunkType
from cascade_rag.engine.sequence import PreparedPrompt

MIN_PASSAGE_CHARS = 32  # also the length of the head a passage is looked up by
_METADATA_LINE = re.compile(r"[^\s:][^\n:]{0,63}: [^\n]*")


class PassageIndex:
    """The passage texts of one engine, found again inside prompts.

    Args:
        engine: the `CascadeEngine` whose tokenizer and chunk registry the passages use. The
            index holds no reference to the engine itself.

    Thread-safe. Get an engine's index with `passage_index(engine, create=True)`, so that
    the embedding classes and the LLM classes of one engine share it.

    Example:
        >>> passages = passage_index(engine, create=True)
        >>> chunks = passages.add(["Plum is the capital of Zorbia, an island nation."])
        >>> prompt = "Context:\\nPlum is the capital of Zorbia, an island nation.\\n\\nQ: Where?"
        >>> prepared, found = passages.compose(prompt)
        >>> found, prepared.chunks[-1].id == chunks[0].id
        (1, True)
    """

    def __init__(self, engine) -> None:
        self._composer = engine.composer
        self._registry = engine.registry
        self._compose_lock = engine._compose_lock  # the engine tokenizes under it too
        self._lock = threading.Lock()
        self._heads: dict[str, list[str]] = {}  # first MIN_PASSAGE_CHARS characters -> texts
        self._keys: set[str] = set()

    def add(self, texts: Iterable[str], metadatas: Sequence[Mapping] | None = None) -> list:
        """Keep passage texts and register each with the engine as a RAG_RESULT chunk.

        Nothing is computed (the KV is computed by the first prompt that holds the passage);
        the chunk is the passage's own tokens, so it is the chunk a prompt gets for the
        passage wherever its tokens start and end on the passage's boundaries.

        Args:
            texts: passage texts as the pipeline will put them into prompts.
            metadatas: optional metadata per text, kept with its chunk.

        Returns:
            the chunk of each text, None for a text too short to be found again.

        Raises:
            TypeError: a text that is not a str; ValueError: invalid Unicode.
        """
        from cascade_rag.composition import check_text

        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        chunks: list[Chunk | None] = []
        for i, text in enumerate(texts):
            check_text(text, "passage text")
            key = text.strip()
            if len(key) < MIN_PASSAGE_CHARS:
                chunks.append(None)
                continue
            with self._compose_lock:
                ids = self._composer.text.encode(key)
            meta = metadatas[i] if metadatas is not None else None
            chunks.append(self._registry.register(ids, ChunkType.RAG_RESULT, key, meta))
            with self._lock:
                for form in _forms(key):
                    if form not in self._keys:
                        self._keys.add(form)
                        self._heads.setdefault(form[:MIN_PASSAGE_CHARS], []).append(form)
        return chunks

    def find(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of kept passages in `text`: increasing, not
        overlapping, longer matches first; a passage that occurs again is returned once (its
        first occurrence), and no shorter passage inside a repeat is returned."""
        n = MIN_PASSAGE_CHARS
        matches: list[tuple[int, int]] = []
        with self._lock:
            heads = self._heads
            for i in range(len(text) - n + 1):
                keys = heads.get(text[i : i + n])
                if keys:
                    matches.extend((i, i + len(k)) for k in keys if text.startswith(k, i))
        taken: list[tuple[int, int]] = []  # every occurrence kept, repeats included
        chosen: list[tuple[int, int]] = []
        seen: set[str] = set()
        for start, end in sorted(matches, key=lambda m: (m[0] - m[1], m[0])):
            if any(s < end and start < e for s, e in taken):
                continue
            taken.append((start, end))
            if text[start:end] not in seen:  # a repeat stays text (nothing inside it is cut)
                seen.add(text[start:end])
                chosen.append((start, end))
        return sorted(chosen)

    def compose(self, prompt: str | Sequence[Mapping[str, str]]) -> tuple[PreparedPrompt, int]:
        """The prompt (plain text or chat messages) as a `PreparedPrompt` whose passages are
        chunks, and how many passages were made chunks (see
        `PromptComposer.prepare_passages`: the token ids are the flat prompt's)."""
        with self._compose_lock:
            return self._composer.prepare_passages(prompt, self.find)

    def clear(self) -> None:
        """Forget every passage text (their chunks stay registered until evicted)."""
        with self._lock:
            self._heads = {}
            self._keys = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def _forms(key: str) -> list[str]:
    """The strings a passage is found by: the text, and its body after metadata lines."""
    forms = [key]
    head, sep, body = key.partition("\n\n")
    body = body.strip()
    if (
        sep
        and len(body) >= MIN_PASSAGE_CHARS
        and all(_METADATA_LINE.fullmatch(line) for line in head.split("\n"))
    ):
        forms.append(body)
    return forms


_indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def passage_index(engine, *, create: bool = False) -> PassageIndex | None:
    """The `PassageIndex` of `engine`; with `create`, made if it has none yet."""
    with _indexes_lock:
        index = _indexes.get(engine)
        if index is None and create:
            index = _indexes[engine] = PassageIndex(engine)
        return index


def register_passages(
    engine, texts: Iterable[str], metadatas: Sequence[Mapping] | None = None
) -> list:
    """Add passage texts to `engine`'s passage index (see `PassageIndex.add`)."""
    return passage_index(engine, create=True).add(texts, metadatas)


def compose_prompt(engine, prompt):
    """`prompt` with the engine's registered passages as chunks (a `PreparedPrompt`), or the
    prompt unchanged when the engine has no passage index or it is empty."""
    index = passage_index(engine)
    if index is None or not len(index):
        return prompt
    return index.compose(prompt)[0]
