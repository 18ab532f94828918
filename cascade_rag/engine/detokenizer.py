"""Streaming detokenization and stop strings: token ids in, text that is safe to show out.

`IncrementalDetokenizer` turns generated token ids into text one token at a time with the
prefix/read-offset technique: it decodes a short window of recent tokens and emits only what
the new tokens added, and holds tokens back while the window ends in an incomplete UTF-8
character (decoded as '\\ufffd'), so an emitted piece never changes later. It works with any
tokenizer that has `decode` and is the reference for the fast path.

`DecodeStreamDetokenizer` does the same with the `tokenizers` library's streaming decoder
(`tokenizers.decoders.DecodeStream`, the same window technique in Rust: ~1.5 us per token
against ~10 us), for Hugging Face fast tokenizers whose `decode` is the backend's.
`make_detokenizer` picks it when it applies and falls back to `IncrementalDetokenizer` (slow
tokenizers, a `decode` overridden in Python, a `tokenizers` release without `DecodeStream`).

`StopChecker` finds stop strings in growing text and says how much of the text's tail to hold
back because it could still become the start of a stop string.

`TextStream` combines the two per request: `add(token_id) -> (delta, stopped)` returns only
text that will stay in the final output, and `finish()` flushes what is held back when
generation ends for another reason (EOS, stop token, max_tokens). The deltas plus `finish()`
concatenate to the final text:

    final = decode(generated_ids, skip_special_tokens, clean_up_tokenization_spaces=False)
    cut at the stop string that ends first (ties: the one that starts first), the stop string
    itself kept only with include_stop_str_in_output.

"Ends first" makes the result independent of how the text is split into tokens: it is what
a character-by-character scan would stop at.

The decoder must be prefix-stable (decoding ids[:n] and then ids[n:] from a complete-character
boundary gives the same text as decoding ids at once), which byte-level BPE and SentencePiece
decoders are. One known exception, the same on both paths: a byte-fallback decoder (Llama-2
style `<0xNN>` tokens) shows each byte of a run of byte tokens that is invalid UTF-8 as
'\\ufffd', so a complete character shown before invalid bytes follow it is '\\ufffd' in the
full decode. `clean_up_tokenization_spaces` rewrites text across token boundaries, so it is
always off here. This module does not detect EOS or stop token ids (the scheduler does) and
does not know about chat templates.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

try:  # tokenizers >= 0.21
    from tokenizers import Tokenizer as _BackendTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - old tokenizers: only the reference path
    DecodeStream = None  # type: ignore[assignment,misc]
    _BackendTokenizer = None  # type: ignore[assignment,misc]

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated token, so it keeps its leading space
# with SentencePiece-style decoders that strip a space at the start of a decode.
_NUM_CONTEXT_TOKENS = 5


def _decode_stream_takes_prefill() -> bool:
    """Whether this `DecodeStream` accepts left-context ids (`ids=`, tokenizers >= 0.22)."""
    if DecodeStream is None:
        return False
    try:
        DecodeStream(ids=[], skip_special_tokens=False)
    except TypeError:
        return False
    return True


_PREFILL = _decode_stream_takes_prefill()


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool
    ) -> str: ...


class IncrementalDetokenizer:
    """Decodes generated tokens one at a time into stable text deltas.

    Args:
        tokenizer: A Hugging Face tokenizer (anything with `decode` as in `Tokenizer`).
        prompt_ids: Prompt token ids. If given, up to the last 5 are decoded in front of the
            generated tokens as left context, so a SentencePiece decoder keeps the first
            generated token's leading space (what a continuation of the prompt shows). With
            byte-level BPE the context changes nothing. Leave it None for
            `text == tokenizer.decode(generated_ids)` with every decoder.
        skip_special_tokens: Drop special tokens (EOS, chat markers) from the text.

    Example:
        >>> detok = IncrementalDetokenizer(tokenizer)  # doctest: +SKIP
        >>> [detok.add(t) for t in tokenizer.encode("日本")]  # doctest: +SKIP
        ['', '', '日', '本']
        >>> detok.text  # doctest: +SKIP
        '日本'
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = _left_context(prompt_ids, self._decode)
        self._num_context = len(context)
        # _ids: context + generated. Text of ids[:read_offset] has been emitted; the window
        # ids[prefix_offset:read_offset] is re-decoded to find where the new text begins.
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), cached
        self._text = ""

    @property
    def text(self) -> str:
        """Stable text of the generated tokens so far (without any held-back bytes)."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids added so far (a copy)."""
        return self._ids[self._num_context :]

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be '')."""
        self._ids.append(token_id)
        return self._advance(flush=False)

    def flush(self) -> str:
        """Return the text of held-back tokens even if it ends in an incomplete character.

        Call once generation has ended; afterwards `text` equals the full decode.
        """
        return self._advance(flush=True)

    def _advance(self, flush: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text):
            return ""
        if not flush and new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


def _left_context(prompt_ids: list[int] | None, decode) -> list[int]:
    """The last prompt ids to decode in front of the generated ones ([] if none or unusable)."""
    context = list(prompt_ids[-_NUM_CONTEXT_TOKENS:]) if prompt_ids else []
    if context and decode(context).endswith(_REPLACEMENT_CHAR):
        # The prompt ends inside a character: its tail would merge with generated bytes.
        return []
    return context


def decode_stream_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` whose `decode` is exactly `tokenizer.decode`, else None.

    That holds for a Hugging Face fast tokenizer whose `decode`/`_decode` are transformers'
    own (they call the backend's `decode(ids, skip_special_tokens)` and, with
    `clean_up_tokenization_spaces=False`, change nothing after it). A tokenizer class that
    overrides either in Python, a slow tokenizer, or a `tokenizers` release without
    `DecodeStream` gets None: use `IncrementalDetokenizer`.
    """
    if DecodeStream is None:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, _BackendTokenizer):
        return None
    for name in ("decode", "_decode"):
        owner = next((c for c in type(tokenizer).__mro__ if name in c.__dict__), None)
        if owner is None or not owner.__module__.startswith("transformers.tokenization_utils"):
            return None
    return backend


class DecodeStreamDetokenizer:
    """`IncrementalDetokenizer` on the `tokenizers` library's `DecodeStream` (same results).

    `DecodeStream.step` decodes the window of recent tokens in Rust and returns the new text,
    or None while the window ends in an incomplete character (or the token added no text, as
    a skipped special token). This class only keeps the ids and two offsets (for `flush`).

    Args:
        tokenizer: A Hugging Face fast tokenizer that `decode_stream_backend` accepts.
        prompt_ids: As in `IncrementalDetokenizer` (prefilling the stream needs tokenizers
            >= 0.22; `make_detokenizer` falls back otherwise).
        skip_special_tokens: Drop special tokens from the text.

    Raises:
        ValueError: `decode_stream_backend(tokenizer)` is None (use `make_detokenizer`).

    Example:
        >>> detok = DecodeStreamDetokenizer(tokenizer)  # doctest: +SKIP
        >>> [detok.add(t) for t in tokenizer.encode("日本")]  # doctest: +SKIP
        ['', '', '日', '本']
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        backend = decode_stream_backend(tokenizer)
        if backend is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no tokenizers backend whose decode is its own "
                "(or tokenizers has no DecodeStream); use make_detokenizer()"
            )
        self._tokenizer = tokenizer
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        context = _left_context(prompt_ids, self._decode)
        if context and not _PREFILL:
            raise ValueError("DecodeStream with prompt context needs tokenizers >= 0.22")
        self._context = context
        self._stream = (
            DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            if context
            else DecodeStream(skip_special_tokens=skip_special_tokens)
        )
        # _ids: context + generated. Text of ids[:read_offset] has been emitted; that of
        # ids[prefix_offset:read_offset] is the window before it (re-decoded only by flush).
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []
        self._fallback: IncrementalDetokenizer | None = None

    @property
    def text(self) -> str:
        """Stable text of the generated tokens so far (without any held-back bytes)."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids added so far (a copy)."""
        return self._ids[len(self._context) :]

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be '')."""
        self._ids.append(token_id)
        if self._fallback is not None:
            return self._keep(self._fallback.add(token_id))
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # noqa: BLE001 - the window's text does not extend the emitted one
            return self._fall_back()
        if piece is None:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Return the text of held-back tokens even if it ends in an incomplete character.

        Call once generation has ended; afterwards `text` equals the full decode.
        """
        if self._fallback is not None:
            return self._keep(self._fallback.flush())
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(window[: self._read_offset - self._prefix_offset])
        new_text = self._decode(window)
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._keep(new_text[len(prefix_text) :])

    def _fall_back(self) -> str:
        """Go on with `IncrementalDetokenizer` after the stream refused a step (a decoder that
        is not prefix-stable); return what the reference's text adds to the emitted text."""
        reference = IncrementalDetokenizer(
            self._tokenizer, self._context or None, self._skip_special_tokens
        )
        for token_id in self.token_ids:
            reference.add(token_id)
        self._fallback = reference
        emitted = self.text
        if not reference.text.startswith(emitted):
            raise RuntimeError(
                f"decoder is not prefix-stable: emitted {emitted!r}, the reference decodes "
                f"{reference.text!r}"
            )
        return self._keep(reference.text[len(emitted) :])

    def _keep(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


def make_detokenizer(
    tokenizer: Tokenizer,
    prompt_ids: list[int] | None = None,
    skip_special_tokens: bool = True,
    use_decode_stream: bool = True,
) -> IncrementalDetokenizer | DecodeStreamDetokenizer:
    """`DecodeStreamDetokenizer` where it applies (see `decode_stream_backend`), else
    `IncrementalDetokenizer`; both give the same deltas. Arguments as in
    `IncrementalDetokenizer`; `use_decode_stream=False` forces the reference."""
    fast = use_decode_stream and decode_stream_backend(tokenizer) is not None
    if fast and (_PREFILL or not prompt_ids):
        return DecodeStreamDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)


class StopChecker:
    """Finds stop strings in text that grows at its end.

    Works on a window rather than the whole text: the caller passes the text it has not yet
    released followed by the new text, and releases only `safe_length(window)` characters, so
    any stop string that ends in new text starts inside the window.

    Args:
        stop: Stop strings (non-empty).
        include_stop_str_in_output: Keep the matched stop string in the output.

    Example:
        >>> checker = StopChecker(("###",), include_stop_str_in_output=False)
        >>> checker.find("ab##")  # no stop yet
        >>> checker.safe_length("ab##")  # "##" could start "###"
        2
        >>> checker.find("ab###c")  # (cut, matched stop)
        (2, '###')
    """

    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool = False) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={stop!r} must hold non-empty strings only")
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # One regex call per token instead of a Python loop over stop strings and lengths.
        self._any_stop, self._stop_prefix_at_end = _stop_patterns(self.stop)
        self._max_held = max((len(s) for s in self.stop), default=1) - 1

    def find(self, text: str) -> tuple[int, str] | None:
        """Return `(cut, stop_string)` for the stop string ending first in `text`, else None.

        `text[:cut]` is the output up to the stop: cut at its start, or after its end when
        `include_stop_str_in_output`. Among stop strings ending at the same place the longest
        (the one starting first) wins.
        """
        if self._any_stop is None or self._any_stop.search(text) is None:
            return None  # the common case: one regex scan
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            start = text.find(s)
            if start >= 0:
                candidate = (start + len(s), start, s)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        assert best is not None
        end, start, s = best
        return (end if self.include_stop_str_in_output else start), s

    def safe_length(self, text: str) -> int:
        """Length of the longest prefix of `text` whose release can never be undone.

        The rest is the longest tail of `text` that is a proper prefix of some stop string.
        """
        if self._stop_prefix_at_end is None:
            return len(text)
        # the leftmost start of a tail that is a proper prefix is the longest such tail
        match = self._stop_prefix_at_end.search(text, max(0, len(text) - self._max_held))
        return len(text) if match is None else match.start()


@functools.lru_cache(maxsize=256)
def _stop_patterns(stop: tuple[str, ...]) -> tuple[re.Pattern | None, re.Pattern | None]:
    """(any stop string, a proper prefix of a stop string that ends the text), None if none."""
    if not stop:
        return None, None
    any_stop = re.compile("|".join(re.escape(s) for s in stop))
    prefixes = sorted({s[:n] for s in stop for n in range(1, len(s))}, key=len, reverse=True)
    if not prefixes:  # only one-character stops: nothing is ever held back
        return any_stop, None
    return any_stop, re.compile("(?:" + "|".join(re.escape(p) for p in prefixes) + r")\Z")


class TextStream:
    """Streams one request's generated text: detokenization plus stop strings.

    Args:
        tokenizer: A Hugging Face tokenizer (see `Tokenizer`).
        stop: Stop strings, e.g. `SamplingParams.stop`.
        include_stop_str_in_output: Keep the matched stop string at the end of the text.
        prompt_ids: Optional prompt ids used as left context (see `IncrementalDetokenizer`).
        skip_special_tokens: Drop special tokens from the text.
        use_decode_stream: Detokenize with `DecodeStream` where it applies (see
            `make_detokenizer`); False forces the Python reference (same text, slower).

    Example:
        >>> stream = TextStream(tokenizer, stop=("\\n\\n",))  # doctest: +SKIP
        >>> for token_id in generated:  # doctest: +SKIP
        ...     delta, stopped = stream.add(token_id)
        ...     send(delta)
        ...     if stopped:
        ...         break
        ... else:
        ...     send(stream.finish())
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        use_decode_stream: bool = True,
    ) -> None:
        self._detokenizer = make_detokenizer(
            tokenizer, prompt_ids, skip_special_tokens, use_decode_stream
        )
        self._checker = StopChecker(tuple(stop), include_stop_str_in_output)
        self._released = ""  # concatenation of everything returned so far
        self._pending = ""  # stable text held back because it may begin a stop string
        self._finished = False
        self.stop_str: str | None = None
        """The stop string that ended generation, or None."""

    @property
    def finished(self) -> bool:
        """Whether a stop string was found or `finish()` was called."""
        return self._finished

    @property
    def text(self) -> str:
        """Text released so far; the final output text once `finished`."""
        return self._released

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids added so far."""
        return self._detokenizer.token_ids

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Append one generated token.

        With `check_stop` False (before `min_tokens` are generated) stop strings are not
        looked for in this token's text.

        Returns:
            `(delta, stopped)`: text that is now safe to show (it is never withdrawn), and
            whether a stop string appeared. After `stopped` the stream is finished: stop
            generating and do not call `finish()` for more text (it returns '').
        """
        if self._finished:
            raise RuntimeError("TextStream.add() after the stream finished; start a new stream")
        return self._release(self._detokenizer.add(token_id), check_stop)

    def finish(self) -> str:
        """End the stream for a reason other than a stop string; return the held-back text.

        Includes incomplete trailing characters (as '\\ufffd', as a full decode shows them).
        Calling it again, or after a stop string, returns ''.
        """
        if self._finished:
            return ""
        delta, stopped = self._release(self._detokenizer.flush())
        if stopped:
            return delta
        self._finished = True
        rest = self._pending
        self._pending = ""
        self._released += rest
        return delta + rest

    def _release(self, new_text: str, check_stop: bool = True) -> tuple[str, bool]:
        if not self._checker.stop:  # nothing to look for or hold back
            self._released += new_text
            return new_text, False
        window = self._pending + new_text
        if not check_stop:
            self._pending = ""
            self._released += window
            return window, False
        match = self._checker.find(window)
        if match is not None:
            cut, self.stop_str = match
            delta = window[:cut]
            self._pending = ""
            self._finished = True
        else:
            safe = self._checker.safe_length(window)
            delta, self._pending = window[:safe], window[safe:]
        self._released += delta
        return delta, self._finished
