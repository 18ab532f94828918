"""Turn what a caller sends (a prompt, chat messages, or an explicit RAG composition) into a
`PreparedPrompt`: a chain of registered chunks followed by the request's private tokens.

Tokenization rule at chunk boundaries (DESIGN.md rule 4): every chunk is tokenized on its own
and the prompt is the concatenation of the chunks' token ids; that concatenation *is* the
prompt (the Hugging Face reference is run on the same ids). Retrieved and context chunks end
with a blank line so that a chunk boundary is also a line boundary.

Plain prompts and chat messages are tokenized whole (nothing changes for the caller) and then
cut, between tokens, after line ends once a piece is long enough; the pieces are registered as
CONTEXT chunks, so a later prompt that starts with the same text reuses their KV.

This module neither computes KV nor decides sharing; it only produces token-id chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType
from cascade_rag.engine.sequence import PreparedPrompt

_SYS = "\u2063cascade-rag-system\u2063"
_USER = "\u2063cascade-rag-user\u2063"


class ChunkId(str):
    """The id of a chunk registered earlier (`engine.register_chunk(...).id`).

    A composition item of this type is looked up in the registry; an unknown id raises
    `UnknownChunkError`. A plain `str` item is text to register.
    """


@dataclass
class Composition:
    """An explicit RAG prompt, composed into cascade levels by the engine.

    Args:
        query: the user's question (private to the request).
        chunks: ordered context: `Chunk` objects, `ChunkId`s of registered chunks, or text
            (registered as RAG_RESULT chunks).
        system: system prompt text or a SYSTEM_PROMPT chunk; None uses the chat template's
            default (if any).

    Example:
        >>> Composition(query="Who wrote it?", chunks=[doc_a, doc_b], system="Answer briefly.")
    """

    query: str
    chunks: Sequence[Chunk | str] = field(default_factory=list)
    system: str | Chunk | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.query, str):
            raise TypeError(f"Composition.query must be a str, got {type(self.query).__name__}")
        if isinstance(self.chunks, (str, Chunk)):
            raise TypeError("Composition.chunks must be a list of chunks, not a single one")
        for item in self.chunks:
            if not isinstance(item, (str, Chunk)):
                raise TypeError(
                    f"composition chunks must be Chunk, ChunkId or str, got {type(item).__name__}"
                )
        if self.system is not None and not isinstance(self.system, (str, Chunk)):
            raise TypeError(f"system must be str or Chunk, got {type(self.system).__name__}")


class PromptComposer:
    """Builds `PreparedPrompt`s with one tokenizer and one chunk registry.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        registry: where chunks are registered by content hash.
        auto_chunk_min_tokens: smallest piece a plain prompt is cut into.
        use_chunks: False turns every prompt into private tokens (no KV reuse).
    """

    def __init__(
        self,
        tokenizer,
        registry: ChunkRegistry,
        auto_chunk_min_tokens: int = 32,
        use_chunks: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.registry = registry
        self.auto_chunk_min_tokens = auto_chunk_min_tokens
        self.use_chunks = use_chunks
        self._line_end: list[bool] | None = None
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- chunks ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def register_text(
        self, text: str, type: ChunkType = ChunkType.RAG_RESULT, metadata: Mapping | None = None
    ) -> Chunk:
        """Register a text chunk (a blank line is appended unless it ends with a newline)."""
        if not isinstance(text, str):
            raise TypeError(f"chunk text must be str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("chunk text is empty; pass a non-empty string")
        if type is ChunkType.SYSTEM_PROMPT:
            return self._system_chunk(text, metadata)
        body = text if text.endswith("\n") else text + "\n\n"
        return self.registry.register(self._encode(body), type=type, text=text, metadata=metadata)

    def _template_parts(self, system: bool) -> tuple[str, str, str]:
        """(head, between, tail) around the system and user contents in the chat template."""
        if not self.has_chat_template:
            return "", "\n\n" if system else "", ""
        msgs = [{"role": "user", "content": _USER}]
        if system:
            msgs.insert(0, {"role": "system", "content": _SYS})
        rendered = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )
        before_user, tail = rendered.split(_USER)
        if system:
            head, between = before_user.split(_SYS)
        else:
            head, between = "", before_user
        return head, between, tail

    def _system_chunk(self, text: str | None, metadata: Mapping | None = None) -> Chunk | None:
        head, between, _ = self._template_parts(system=text is not None)
        body = head + (text or "") + between
        if not body:
            return None
        return self.registry.register(
            self._encode(body), type=ChunkType.SYSTEM_PROMPT, text=text, metadata=metadata
        )

    # ---- prompts -----------------------------------------------------------------------

    def prepare(self, prompt) -> PreparedPrompt:
        """A `PreparedPrompt` from a str, a list of chat messages, or a `Composition`."""
        if isinstance(prompt, Composition):
            return self._compose(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty; pass non-empty text")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
            return self._split(ids)
        if (
            isinstance(prompt, (list, tuple))
            and prompt
            and all(isinstance(m, Mapping) for m in prompt)
        ):
            return self._split(*self._encode_messages(prompt))
        raise TypeError(
            "prompt must be a non-empty str, a list of {'role', 'content'} messages or a "
            f"Composition; got {type(prompt).__name__}"
        )

    def _encode_messages(self, messages) -> tuple[list[int], set[int]]:
        """Token ids of the rendered conversation, and the token counts at which messages end
        (cut points: a system prompt is a chunk of its own however short it is)."""
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TypeError(f"each message needs str 'role' and 'content', got {dict(m)!r}")
        if not any(m["content"].strip() for m in messages):
            raise ValueError("all messages are empty; pass non-empty content")
        messages = [dict(m) for m in messages]
        if not self.has_chat_template:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            return list(self.tokenizer.encode(text, add_special_tokens=True)), set()
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets: no message cut points
            return self._encode(text), set()
        token_end = {end: i + 1 for i, (_, end) in enumerate(enc["offset_mapping"])}
        cuts = set()
        for i in range(1, len(messages)):
            head = self.tokenizer.apply_chat_template(messages[:i], tokenize=False)
            if text.startswith(head) and len(head) in token_end:
                cuts.add(token_end[len(head)])
        return list(enc["input_ids"]), cuts

    def _compose(self, comp: Composition) -> PreparedPrompt:
        chunks: list[Chunk] = []
        if isinstance(comp.system, Chunk):
            chunks.append(comp.system)
        else:
            system = self._system_chunk(comp.system)
            if system is not None:
                chunks.append(system)
        for item in comp.chunks:
            if isinstance(item, Chunk):
                chunks.append(item)
            elif isinstance(item, ChunkId):
                chunks.append(self.registry.get(item))
            else:
                chunks.append(self.register_text(item, ChunkType.RAG_RESULT))
        _, _, tail = self._template_parts(system=True)
        tail_ids = self._encode(comp.query + tail)
        if not tail_ids:
            raise ValueError("the composition has no query text; pass a non-empty query")
        if not self.use_chunks:
            ids = [t for c in chunks for t in c.token_ids]
            return PreparedPrompt(chunks=(), tail_ids=tuple(ids + tail_ids))
        return PreparedPrompt(chunks=tuple(chunks), tail_ids=tuple(tail_ids))

    def _line_ends(self) -> list[bool]:
        if self._line_end is None:
            vocab = len(self.tokenizer)
            pieces = self.tokenizer.batch_decode([[i] for i in range(vocab)])
            self._line_end = [p.endswith("\n") for p in pieces]
        return self._line_end

    def _split(self, ids: list[int], cuts: set[int] = frozenset()) -> PreparedPrompt:
        """Cut whole-prompt token ids into CONTEXT chunks (the ids are unchanged): at `cuts`
        (token counts where chat messages end) and after line ends once a piece is long
        enough. The last token always stays private."""
        if not self.use_chunks:
            return PreparedPrompt(chunks=(), tail_ids=tuple(ids))
        line_end = self._line_ends()
        min_len = self.auto_chunk_min_tokens
        chunks: list[Chunk] = []
        start = 0
        for i, tok in enumerate(ids[:-1]):
            n = i + 1 - start
            if (i + 1) in cuts or (n >= min_len and tok < len(line_end) and line_end[tok]):
                chunks.append(self.registry.register(ids[start : i + 1], type=ChunkType.CONTEXT))
                start = i + 1
        return PreparedPrompt(chunks=tuple(chunks), tail_ids=tuple(ids[start:]))
