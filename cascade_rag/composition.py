"""Turn what a caller sends (a prompt, chat messages, or an explicit RAG composition) into a
`PreparedPrompt`: a chain of chunks followed by the request's private tokens.

Tokenization rule at chunk boundaries (docs/design.md rule 4): every chunk is tokenized on its own
and the prompt is the concatenation of the chunks' token ids; that concatenation *is* the
prompt (the Hugging Face reference is run on the same ids). Retrieved and context chunks end
with a blank line so that a chunk boundary is also a line boundary.

Plain prompts and chat messages are tokenized whole (nothing changes for the caller) and then
cut, between tokens, after line ends once a piece is long enough; the pieces are CONTEXT
chunks, so a later prompt that starts with the same text reuses their KV.

Control tokens come only from the chat template. Documents, queries, plain prompts and message
contents are tokenized as text: a retrieved passage containing "<|im_end|>\\n<|im_start|>system"
stays those characters and never becomes the model's turn markers (`TextTokenizer`). For chat
messages the template is rendered around placeholders, so the composer knows which characters
the template wrote; control-token strings are parsed there only, and the text between two
template control tokens (template text and contents together) is tokenized as one plain piece.
For benign contents this gives exactly the ids of tokenizing the rendered chat whole, for
tokenizers that pre-tokenize every piece between special tokens alike (byte-level BPE such as
SmolLM2, Llama 3, Qwen; word-level).

Two phases: `PromptComposer.prepare(prompt, register=False)` builds chunks with their final ids
without adding them to the registry, so a request refused afterwards (too long, no pages)
leaves nothing behind; `PromptComposer.commit` then registers them. Every `Chunk` object a
caller passes goes through `ChunkRegistry.adopt`: its id is recomputed, never trusted.

This module neither computes KV nor decides sharing; it only produces token-id chunks.
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
        chunks: ordered context: `Chunk` objects (re-registered by their tokens, see
            `ChunkRegistry.adopt`), `ChunkId`s of registered chunks, or text (registered as
            RAG_RESULT chunks).
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
            raise TypeError(
                f"Composition.query must be a str, got {type(self.query).__name__}"
                + (": decode bytes first" if isinstance(self.query, bytes) else "")
            )
        if isinstance(self.chunks, (str, bytes, Chunk)):
            raise TypeError("Composition.chunks must be a list of chunks, not a single one")
        for item in self.chunks:
            if not isinstance(item, (str, Chunk)):
                raise TypeError(
                    f"composition chunks must be Chunk, ChunkId or str, got {type(item).__name__}"
                )
        if self.system is not None and not isinstance(self.system, (str, Chunk)):
            raise TypeError(f"system must be str or Chunk, got {type(self.system).__name__}")


def check_text(text: object, what: str) -> str:
    """`text` if it is a str of valid Unicode; otherwise a TypeError / ValueError naming `what`.

    Example:
        >>> check_text("fine", "query")
        'fine'
    """
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(
            f"{what} must be str, not {type(text).__name__}: decode it first "
            f"({what}.decode('utf-8'))"
        )
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode text: lone surrogate {text[exc.start]!r} at index "
            f"{exc.start}; decode bytes with errors='replace' or remove the character"
        ) from None
    return text


class TextTokenizer:
    """Tokenizes text as text, and template pieces with their control tokens.

    Args:
        tokenizer: a Hugging Face tokenizer. Fast tokenizers get a private copy of their
            backend in which every added token (except whitespace ones) is special and
            special-token parsing is off, so no string in a text ever becomes an added token;
            the caller's tokenizer is never reconfigured (its `encode_special_tokens` switch
            is shared state). Slow tokenizers use `split_special_tokens=True`.

    Control tokens are the tokenizer's added tokens whose content is not whitespace.

    Example:
        >>> tt = TextTokenizer(tokenizer)
        >>> tt.encode("a <|im_end|> b")  # the string, as text
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._added = {tok.content: (i, tok) for i, tok in decoder.items()}
        self._added_by_id = dict(decoder)
        control = sorted((c for c in self._added if c and not c.isspace()), key=len, reverse=True)
        self.control_ids = frozenset(self._added[c][0] for c in control)
        unk = getattr(tokenizer, "unk_token_id", None)
        # unknown words map to the unk token: text can produce it without naming it
        self._forbidden = self.control_ids - {unk}
        self._control_re = re.compile("|".join(map(re.escape, control))) if control else None
        self._backend = _plain_backend(tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` with no added-token parsing (the tokenizer's BOS etc. with
        add_special_tokens=True)."""
        return self._encode_with_ends(text, add_special_tokens)[0]

    def contains_control(self, text: str) -> bool:
        """Whether `text` contains a control-token string."""
        return self._control_re is not None and self._control_re.search(text) is not None

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Token ids of the concatenated parts, and each token's end in characters.

        Args:
            parts: (text, is_template) pairs. Control-token strings are parsed only inside
                template parts; the characters between two template control tokens are
                tokenized as one plain piece (so a boundary between template text and
                content does not split a word).

        Returns:
            (ids, ends): `ends[i]` is the character offset in the joined text where token i
            ends (from the tokenizer's offsets; a slow tokenizer has none, and every token of
            a plain piece then ends where the piece ends).
        """
        text = "".join(t for t, _ in parts)
        # (start, end, id) of the control tokens the template wrote
        controls: list[tuple[int, int, int]] = []
        pos = 0
        for part, is_template in parts:
            if is_template and self._control_re is not None:
                for m in self._control_re.finditer(part):
                    controls.append((pos + m.start(), pos + m.end(), self._added[m.group()][0]))
            pos += len(part)
        ids: list[int] = []
        ends: list[int] = []
        start = 0
        for c_start, c_end, c_id in [*controls, (len(text), len(text), -1)]:
            piece_end = c_start
            if c_id >= 0 and self._added_token(c_id).lstrip:
                while piece_end > start and text[piece_end - 1].isspace():
                    piece_end -= 1
            if piece_end > start:
                piece_ids, piece_ends = self._encode_with_ends(text[start:piece_end], False)
                ids.extend(piece_ids)
                ends.extend(start + e for e in piece_ends)
            if c_id < 0:
                break
            ids.append(c_id)
            ends.append(c_end)
            start = c_end
            if self._added_token(c_id).rstrip:
                while start < len(text) and text[start].isspace():
                    start += 1
        return ids, ends

    def _added_token(self, token_id: int) -> Any:
        return self._added_by_id[token_id]

    def _encode_with_ends(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        if self._backend is not None:
            enc = self._backend.encode(text, add_special_tokens=add_special_tokens)
            ids, ends = list(enc.ids), [e for _, e in enc.offsets]
            from_text = [i for i, m in zip(enc.ids, enc.special_tokens_mask) if not m]
        else:
            from_text = list(
                self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            )
            ids = from_text
            if add_special_tokens:
                ids = list(self.tokenizer.build_inputs_with_special_tokens(from_text))
            ends = [len(text)] * len(ids)
        bad = self._forbidden.intersection(from_text)
        if bad:  # a vocabulary that spells a control token from plain bytes
            raise ValueError(
                f"the tokenizer turns plain text into control token id {min(bad)} "
                f"({text[:60]!r}...); it cannot keep this text apart from its control tokens"
            )
        return ids, ends


_plain_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_plain_backends_lock = threading.Lock()


def _plain_backend(tokenizer: Any):
    """A private copy of a fast tokenizer's backend that never parses added tokens, or None
    for a slow tokenizer. Cached per tokenizer (and its vocabulary size)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    key = len(tokenizer)
    with _plain_backends_lock:
        try:
            cached = _plain_backends.get(tokenizer)
        except TypeError:  # not weak-referenceable
            cached = None
        if cached is not None and cached[0] == key:
            return cached[1]
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    for tok in data.get("added_tokens", []):
        if not tok["content"].isspace():
            tok["special"] = True
    data["truncation"] = None
    data["padding"] = None
    plain = Tokenizer.from_str(json.dumps(data))
    plain.encode_special_tokens = True  # special tokens in a text stay text
    with _plain_backends_lock:
        try:
            _plain_backends[tokenizer] = (key, plain)
        except TypeError:
            pass
    return plain


class PromptComposer:
    """Builds `PreparedPrompt`s with one tokenizer and one chunk registry.

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        registry: where chunks are registered by content hash.
        auto_chunk_min_tokens: smallest piece a plain prompt is cut into.
        use_chunks: False turns every prompt into private tokens (no KV reuse).

    Example:
        >>> composer = PromptComposer(tokenizer, registry)
        >>> planned = composer.prepare(Composition(query="Where is Plum?", chunks=[doc]),
        ...                            register=False)   # nothing registered yet
        >>> prepared = composer.commit(planned)          # now it is
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
        self.text = TextTokenizer(tokenizer)
        self._line_end: list[bool] | None = None
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- chunks ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.text.encode(text)

    def _chunk(
        self,
        ids: Sequence[int],
        type: ChunkType,
        text: str | None,
        metadata: Mapping | None,
        register: bool,
    ) -> Chunk:
        if register:
            return self.registry.register(ids, type=type, text=text, metadata=metadata)
        return self.registry.chunk_for(ids, type=type, text=text, metadata=metadata)

    def register_text(
        self,
        text: str,
        type: ChunkType = ChunkType.RAG_RESULT,
        metadata: Mapping | None = None,
        *,
        register: bool = True,
    ) -> Chunk:
        """Register a text chunk (a blank line is appended unless it ends with a newline).

        The text is tokenized as text (no control tokens); a SYSTEM_PROMPT chunk is wrapped
        in the chat template's system turn, whose control tokens come from the template.

        Args:
            text: the chunk's text.
            type: a `ChunkType` or its value string.
            metadata: extras kept with the chunk.
            register: False returns the chunk without adding it to the registry.

        Raises:
            TypeError: text is not a str (bytes: decode first), metadata not a mapping.
            ValueError: empty text, lone surrogates, an unknown type.
        """
        check_text(text, "chunk text")
        if not text.strip():
            raise ValueError("chunk text is empty; pass a non-empty string")
        try:
            chunk_type = ChunkType(type)
        except ValueError:
            valid = ", ".join(t.value for t in ChunkType)
            raise ValueError(f"unknown chunk type {type!r}; use one of: {valid}") from None
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"chunk metadata must be a mapping, got {builtins.type(metadata).__name__}"
            )
        if chunk_type is ChunkType.SYSTEM_PROMPT:
            return self._system_chunk(text, metadata, register)
        body = text if text.endswith("\n") else text + "\n\n"
        return self._chunk(self._encode(body), chunk_type, text, metadata, register)

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

    def _system_chunk(
        self, text: str | None, metadata: Mapping | None = None, register: bool = True
    ) -> Chunk | None:
        head, between, _ = self._template_parts(system=text is not None)
        parts = [(head, True), (text or "", False), (between, True)]
        ids, _ = self.text.encode_parts(parts)
        if not ids:
            return None
        return self._chunk(ids, ChunkType.SYSTEM_PROMPT, text, metadata, register)

    # ---- prompts -----------------------------------------------------------------------

    def prepare(self, prompt, *, register: bool = True) -> PreparedPrompt:
        """A `PreparedPrompt` from a str, a list of chat messages, or a `Composition`.

        Args:
            prompt: plain text (tokenized as text, with the tokenizer's BOS if it adds one),
                chat messages (rendered with the chat template), a `Composition`, or a
                `PreparedPrompt` (its chunks adopted by the registry).
            register: False leaves the registry untouched: the chunks have their final ids
                and tokens but are not held; `commit` registers them.

        Raises:
            TypeError: a prompt of another type (bytes: decode first), a message that is not
                a mapping or whose role / content is not a str.
            ValueError: empty text, invalid Unicode (lone surrogates), a message field that
                contains control-token strings where the template would parse them, a
                `Chunk` whose id this registry holds for other tokens.
            UnknownChunkError: a `ChunkId` that is not registered.

        Example:
            >>> planned = composer.prepare("Some long text ...", register=False)
            >>> all(c.id not in composer.registry for c in planned.chunks)
            True
        """
        planned = self._plan(prompt)  # registers nothing, whatever goes wrong
        return self.commit(planned) if register else planned

    def _plan(self, prompt) -> PreparedPrompt:
        if isinstance(prompt, PreparedPrompt):
            if not self.use_chunks:
                return PreparedPrompt(chunks=(), tail_ids=tuple(prompt.token_ids))
            chunks = tuple(self.registry.adopt(c, register=False) for c in prompt.chunks)
            return PreparedPrompt(chunks=chunks, tail_ids=prompt.tail_ids)
        if isinstance(prompt, Composition):
            return self._compose(prompt)
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if not prompt.strip():
                raise ValueError("prompt is empty; pass non-empty text")
            return self._split(self.text.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError(
                f"prompt must be a str, not {type(prompt).__name__}: decode it first "
                "(prompt.decode('utf-8'))"
            )
        if isinstance(prompt, (list, tuple)) and prompt:
            for i, m in enumerate(prompt):
                if not isinstance(m, Mapping):
                    raise TypeError(
                        "prompt must be a non-empty str, a list of {'role', 'content'} messages "
                        f"or a Composition; message {i} is a {type(m).__name__}"
                    )
            ids, cuts = self._encode_messages(prompt)
            return self._split(ids, cuts)
        raise TypeError(
            "prompt must be a non-empty str, a list of {'role', 'content'} messages or a "
            f"Composition; got {type(prompt).__name__}"
        )

    def commit(self, prepared: PreparedPrompt) -> PreparedPrompt:
        """Register the chunks of a prompt prepared with register=False.

        Returns the prompt with the registry's canonical chunk objects (a chunk registered
        meanwhile by another request is shared, not duplicated). Every chunk is checked
        before any is registered, so a refused prompt registers nothing.

        Raises:
            ValueError: a chunk whose id this registry holds for other tokens.
        """
        if not isinstance(prepared, PreparedPrompt):
            raise TypeError(f"commit() takes a PreparedPrompt, got {type(prepared).__name__}")
        for chunk in prepared.chunks:
            self.registry.adopt(chunk, register=False)
        chunks = tuple(self.registry.adopt(chunk) for chunk in prepared.chunks)
        return PreparedPrompt(chunks=chunks, tail_ids=prepared.tail_ids)

    def _encode_messages(self, messages) -> tuple[list[int], set[int]]:
        """Token ids of the rendered conversation, and the token counts at which messages end
        (cut points: a system prompt is a chunk of its own however short it is)."""
        messages = [dict(m) for m in messages]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str):
                raise TypeError(f"message {i} needs a str 'role', got {m.get('role')!r:.60}")
            check_text(m.get("content"), f"message {i} content")
            for key, value in m.items():
                if key != "content" and isinstance(value, str):
                    check_text(value, f"message {i} {key}")
                    if self.text.contains_control(value):
                        raise ValueError(
                            f"message {i} {key} {value!r:.60} contains a control-token string; "
                            "only message contents may hold arbitrary text"
                        )
        if not any(m["content"].strip() for m in messages):
            raise ValueError("all messages are empty; pass non-empty content")
        if not self.has_chat_template:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            return self.text.encode(text, add_special_tokens=True), set()
        parts = self._render_parts(messages)
        ids, ends = self.text.encode_parts(parts)
        text = "".join(p for p, _ in parts)
        token_end = {end: i + 1 for i, end in enumerate(ends)}
        cuts = set()
        for i in range(1, len(messages)):
            head = self.tokenizer.apply_chat_template(messages[:i], tokenize=False)
            if text.startswith(head) and len(head) in token_end:
                cuts.add(token_end[len(head)])
        return ids, cuts

    def _render_parts(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_template) parts: which characters the chat
        template wrote and which are message contents."""
        nonce = secrets.token_hex(8)
        marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        placeholders = [
            {**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)
        ]
        skeleton = self.tokenizer.apply_chat_template(
            placeholders, tokenize=False, add_generation_prompt=True
        )
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        pieces = marker.split(skeleton)  # [template, index, template, index, ..., template]
        parts: list[tuple[str, bool]] = [(pieces[0], True)]
        pos = len(pieces[0])
        ok = rendered.startswith(pieces[0])
        for k in range(1, len(pieces), 2):
            if not ok:
                break
            content = messages[int(pieces[k])]["content"]
            after = pieces[k + 1]
            # the template may strip a content (e.g. `| trim`); anything else is not tracked
            for shown in dict.fromkeys((content, content.strip())):
                if rendered.startswith(shown + after, pos):
                    parts += [(shown, False), (after, True)]
                    pos += len(shown) + len(after)
                    break
            else:
                ok = False
        if not ok or pos != len(rendered):
            raise ValueError(
                "the chat template changes message contents in a way the composer cannot "
                "follow, so it cannot tell contents from template text; pass a Composition "
                "or plain text instead"
            )
        return [p for p in parts if p[0]]

    def _compose(self, comp: Composition) -> PreparedPrompt:
        chunks: list[Chunk] = []
        if isinstance(comp.system, Chunk):
            chunks.append(self.registry.adopt(comp.system, register=False))
        else:
            if comp.system is not None:
                check_text(comp.system, "system prompt")
            system = self._system_chunk(comp.system, register=False)
            if system is not None:
                chunks.append(system)
        for item in comp.chunks:
            if isinstance(item, Chunk):
                chunks.append(self.registry.adopt(item, register=False))
            elif isinstance(item, ChunkId):
                chunks.append(self.registry.get(item))
            else:
                chunks.append(self.register_text(item, ChunkType.RAG_RESULT, register=False))
        check_text(comp.query, "query")
        _, _, tail = self._template_parts(system=True)
        tail_ids, _ = self.text.encode_parts([(comp.query, False), (tail, True)])
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
        if not ids:
            raise ValueError("the prompt has no tokens; pass non-empty text")
        if not self.use_chunks:
            return PreparedPrompt(chunks=(), tail_ids=tuple(ids))
        line_end = self._line_ends()
        min_len = self.auto_chunk_min_tokens
        chunks: list[Chunk] = []
        start = 0
        for i, tok in enumerate(ids[:-1]):
            n = i + 1 - start
            if (i + 1) in cuts or (n >= min_len and tok < len(line_end) and line_end[tok]):
                chunks.append(self.registry.chunk_for(ids[start : i + 1], ChunkType.CONTEXT))
                start = i + 1
        return PreparedPrompt(chunks=tuple(chunks), tail_ids=tuple(ids[start:]))

    # ---- passages inside plain prompts -------------------------------------------------

    def prepare_passages(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        find: Callable[[str], Sequence[tuple[int, int]]],
    ) -> tuple[PreparedPrompt, int]:
        """`prepare(prompt, register=False)` of a str or chat messages, with the passages that
        `find` locates in the prompt's text made RAG_RESULT chunks of their own.

        The token ids are exactly those of `prepare(prompt)`: the prompt is tokenized whole
        and only cut differently. A passage becomes a chunk where a token starts at its first
        character and one ends at its last; otherwise it stays part of the text around it.
        The text before the first passage starts with a SYSTEM_PROMPT chunk, the anchor of
        reuse anywhere: up to the first message end if there is one (the system turn, however
        long), else up to where `prepare` first cuts; the rest of it is cut as `prepare` cuts
        (at message ends, and after line ends once a piece is long enough). The text between
        two passages is one CONTEXT chunk; the text after the last passage is the request's
        private tail (a passage that ends the prompt is not made a chunk: the last token stays
        private). A prompt without passages is cut the same way, the last token private.

        Args:
            prompt: plain text or chat messages, as `prepare` takes them.
            find: gets the text the ids are tokenized from (for chat messages the rendered
                conversation, control-token strings included) and returns increasing,
                non-overlapping (start, end) character spans of passages.

        Returns:
            (prepared, number of passages made chunks). Nothing is registered; `commit`
            (or the engine, when the prompt is submitted) registers the chunks.

        Raises:
            the errors of `prepare` for a bad prompt.

        Example:
            >>> text = "Context:\\nPlum is the capital of Zorbia.\\nQuestion: what is Plum?"
            >>> start = text.index("Plum")
            >>> planned, found = composer.prepare_passages(text, lambda t: [(start, start + 30)])
            >>> found, planned.chunks[-1].type.value
            (1, 'rag_result')
        """
        text, ids, ends, cuts = self._encode_with_ends(prompt)
        if not self.use_chunks:
            return PreparedPrompt(chunks=(), tail_ids=tuple(ids)), 0
        token_count = {0: 0}  # character offset -> tokens that end at or before it
        for i, end in enumerate(ends):
            token_count[end] = i + 1
        spans: list[tuple[int, int, int, int]] = []  # (first token, end token, start, end)
        for start, end in find(text):
            a, b = token_count.get(start), token_count.get(end)
            if a is None or b is None or a >= b or b >= len(ids):
                continue
            if spans and a < spans[-1][1]:
                continue
            spans.append((a, b, start, end))
        if not spans:
            return self._split_anchored(ids, cuts), 0
        chunks: list[Chunk] = []
        head_end = spans[0][0]
        if head_end:
            start = 0
            for cut in [*self._head_cut_points(ids, head_end, cuts), head_end]:
                if cut > start:
                    kind = ChunkType.CONTEXT if chunks else ChunkType.SYSTEM_PROMPT
                    chunks.append(self.registry.chunk_for(ids[start:cut], kind))
                    start = cut
        for i, (a, b, start, end) in enumerate(spans):
            if i and a > spans[i - 1][1]:
                chunks.append(self.registry.chunk_for(ids[spans[i - 1][1] : a], ChunkType.CONTEXT))
            chunks.append(self.registry.chunk_for(ids[a:b], ChunkType.RAG_RESULT, text[start:end]))
        return PreparedPrompt(chunks=tuple(chunks), tail_ids=tuple(ids[spans[-1][1] :])), len(spans)

    def _encode_with_ends(
        self, prompt: str | Sequence[Mapping[str, str]]
    ) -> tuple[str, list[int], list[int], set[int]]:
        """(text, ids, ends, cuts) of a str or chat messages: the ids `prepare` gives, the
        text they are tokenized from, each token's end in characters, and the message ends
        (token counts) where `prepare` cuts."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            if not prompt.strip():
                raise ValueError("prompt is empty; pass non-empty text")
            ids, ends = self.text._encode_with_ends(prompt, True)
            return prompt, ids, ends, set()
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise TypeError(
                "prompt must be a non-empty str or a list of {'role', 'content'} messages; got "
                f"{type(prompt).__name__}"
            )
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping):
                raise TypeError(f"message {i} must be a mapping, got {type(m).__name__}")
        ids, cuts = self._encode_messages(prompt)  # checks the messages
        messages = [dict(m) for m in prompt]
        if self.has_chat_template:
            parts = self._render_parts(messages)
            again, ends = self.text.encode_parts(parts)
            text = "".join(p for p, _ in parts)
        else:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            again, ends = self.text._encode_with_ends(text, True)
        assert again == ids, "the rendered text tokenizes to the prompt's ids"
        return text, ids, ends, cuts

    def _cut_points(self, ids: list[int], lo: int, hi: int, cuts: set[int]) -> list[int]:
        """Where `_split` would cut ids[lo:hi]: token counts in (lo, hi] at `cuts` and after
        line ends once a piece has `auto_chunk_min_tokens` tokens."""
        line_end = self._line_ends()
        points: list[int] = []
        start = lo
        for i in range(lo, hi):
            tok = ids[i]
            n = i + 1 - start
            if (i + 1) in cuts or (
                n >= self.auto_chunk_min_tokens and tok < len(line_end) and line_end[tok]
            ):
                points.append(i + 1)
                start = i + 1
        return points

    def _head_cut_points(self, ids: list[int], hi: int, cuts: set[int]) -> list[int]:
        """Cut points of ids[:hi] whose first piece is the anchor: it ends at the first
        message end before `hi` if there is one, else where `_split` first cuts."""
        message_ends = sorted(c for c in cuts if 0 < c <= hi)
        if not message_ends:
            return self._cut_points(ids, 0, hi, cuts)
        first = message_ends[0]
        return [first, *self._cut_points(ids, first, hi, cuts)]

    def _split_anchored(self, ids: list[int], cuts: set[int]) -> PreparedPrompt:
        """A prompt without passages, cut as `prepare_passages` cuts the text before a
        passage: the anchor (a SYSTEM_PROMPT chunk) first, the last token private."""
        chunks: list[Chunk] = []
        start = 0
        for cut in self._head_cut_points(ids, len(ids) - 1, cuts):
            kind = ChunkType.CONTEXT if chunks else ChunkType.SYSTEM_PROMPT
            chunks.append(self.registry.chunk_for(ids[start:cut], kind))
            start = cut
        return PreparedPrompt(chunks=tuple(chunks), tail_ids=tuple(ids[start:]))
