"""Question answering over retrieved passages: retrieve, compose, generate (or stream).

Each question becomes a `Composition` of [system prompt | retrieved chunks | query part].
The system prompt is one chunk shared by every request, and passages retrieved for several
questions are shared chunks too, so the engine computes their KV once. `ask_many` sends all
questions as one batch, which the engine serves with cascade attention over the shared chunks.

Chat history (earlier questions and answers) goes after the chunks, in the request's private
tail, as chat turns of the model's template:

    [system | chunk 1 .. chunk k | Question: q1 <end> assistant: a1 <end> user: Question: q]

so the system prompt and the passages stay the same cacheable chunks whatever was said
before; only the history is computed per request. The template is rendered around
placeholders, so its turn markers become control tokens while the questions and answers are
tokenized as text (an answer that contains "<|im_end|>" stays those characters). Turns that
would not leave room for the answer in the context (or the KV pool) are dropped, oldest
first. Retrieval uses the current question alone.

This module does not index documents (see `cascade_rag.retrieval`), keep a conversation
between calls (the caller passes the history), or parse command lines (see `cascade_rag.cli`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade_rag.chunks import Chunk
from cascade_rag.composition import Composition
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.outputs import GenerationOutput, Usage
from cascade_rag.retrieval.retriever import Retriever
from cascade_rag.sampling import SamplingParams

if TYPE_CHECKING:
    from cascade_rag.llm import CascadeEngine

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question in one sentence using the documents "
    "below. If they do not contain the answer, say that you do not know."
)

# (question, answer) pairs, or {"role": "user" | "assistant", "content": ...} messages.
History = Sequence[tuple[str, str]] | Sequence[Mapping[str, str]]

_SYS = "\u2063cascade-rag-rag-system\u2063"
_DOCS = "\u2063cascade-rag-rag-documents\u2063"


@dataclass(frozen=True)
class Answer:
    """An answer and where it came from.

    Attributes:
        question: the question asked.
        text: the generated answer.
        sources: the retrieved passages, best first: dicts with "source" (document path),
            "score" (similarity, None if the source gives none) and "chunk_id".
        usage: token counts; `usage.cached_tokens` prompt tokens came from the chunk cache.
        history_turns: earlier turns of the history that were in the prompt (the most recent
            ones; older turns were dropped to fit the context).
    """

    question: str
    text: str
    sources: list[dict[str, Any]]
    usage: Usage
    history_turns: int = 0


class RAGPipeline:
    """Answer questions from retrieved passages with a `CascadeEngine`.

    Args:
        engine: the engine that generates (and names the chunks).
        retriever: a `Retriever`, or any source a `Retriever` accepts (a `DocumentIndex`, a
            LangChain or LlamaIndex retriever...), wrapped with its defaults.
        system_prompt: instructions shared by every request.
        sampling: sampling parameters for every answer; None is greedy, 256 tokens at most.

    Every answering method takes an optional `history`: the conversation so far, as
    (question, answer) pairs or as {"role": "user" | "assistant", "content": ...} messages
    (a pair's question is sent as "Question: ..." like the current one; messages as given).

    Example:
        >>> engine = CascadeEngine()
        >>> index = DocumentIndex.from_folder("handbook/", engine)
        >>> rag = RAGPipeline(engine, Retriever(engine, index, k=3))
        >>> answer = rag.ask("When does the Central Library open on Saturdays?")
        >>> answer.text, [s["source"] for s in answer.sources], answer.usage.cached_tokens
        >>> for piece in rag.stream("And on Sundays?", history=[(answer.question, answer.text)]):
        ...     print(piece if isinstance(piece, str) else f"\\n{piece.sources}", end="")
    """

    def __init__(
        self,
        engine: CascadeEngine,
        retriever: Retriever | Any,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        sampling: SamplingParams | None = None,
    ) -> None:
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise ValueError("system_prompt must be a non-empty string")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        self.engine = engine
        self.retriever = (
            retriever if isinstance(retriever, Retriever) else Retriever(engine, retriever)
        )
        self.system_prompt = system_prompt
        self.sampling = sampling if sampling is not None else SamplingParams()

    def compose(self, question: str, chunks: Sequence[Chunk]) -> Composition:
        """The prompt for `question` over `chunks`: [system | chunks | "Question: ..."]."""
        return Composition(
            query=f"Question: {question}", chunks=list(chunks), system=self.system_prompt
        )

    def prepare(
        self, question: str, chunks: Sequence[Chunk], history: History | None = None
    ) -> PreparedPrompt:
        """The tokenized prompt [system | chunks | history turns | question] with all of
        `history` (`ask` and `stream` drop its oldest turns where it does not fit).

        The chunks are those of `engine.prepare(self.compose(question, chunks))`: the same
        with or without history.
        """
        turns = _history_turns(history)
        base = self.engine.prepare(self.compose(question, chunks))
        return self._with_turns(base, turns, question)

    # ---- answering ---------------------------------------------------------------------

    def ask(self, question: str, history: History | None = None) -> Answer:
        """Retrieve passages for `question` and answer it (after the turns of `history`).

        Raises:
            ValueError: an empty question, an empty index, or a prompt too long for the model.
            TypeError: a history that is neither pairs nor messages.
        """
        if history is None:
            return self.ask_many([question])[0]
        question, turns = _check_question(question), _history_turns(history)
        chunks = self.retriever.retrieve(question)
        prompt, used = self._prompt(question, chunks, turns)
        return _answer(question, chunks, self.engine.generate(prompt, self.sampling), used)

    def ask_many(self, questions: Sequence[str]) -> list[Answer]:
        """Answer several questions in one engine batch (shared chunks are computed once)."""
        if isinstance(questions, str):
            raise TypeError("ask_many takes a list of questions; use ask for one")
        questions = [_check_question(q) for q in questions]
        retrieved = [self.retriever.retrieve(q) for q in questions]
        prompts = [self.compose(q, chunks) for q, chunks in zip(questions, retrieved)]
        if not prompts:
            return []
        outputs = self.engine.generate(prompts, self.sampling)
        return [_answer(q, c, o) for q, c, o in zip(questions, retrieved, outputs)]

    async def aask(self, question: str, history: History | None = None) -> Answer:
        """Async `ask`; concurrent calls join the engine's running batch."""
        question, turns = _check_question(question), _history_turns(history)
        chunks = await self.retriever.aretrieve(question)
        prompt, used = self._prompt(question, chunks, turns)
        output = await self.engine.agenerate(prompt, self.sampling)
        return _answer(question, chunks, output, used)

    def stream(self, question: str, history: History | None = None) -> Iterator[str | Answer]:
        """Answer `question`, yielding the answer's text as it is generated, then the `Answer`.

        The text pieces (str) concatenate to `Answer.text` (leading and trailing whitespace
        is not sent). Stopping the iteration early aborts the request.

        Example:
            >>> for piece in rag.stream("When is the Lantern Festival?"):
            ...     if isinstance(piece, str):
            ...         print(piece, end="", flush=True)
            ...     else:
            ...         answer = piece  # sources, usage
        """
        question, turns = _check_question(question), _history_turns(history)
        chunks = self.retriever.retrieve(question)
        prompt, used = self._prompt(question, chunks, turns)
        deltas = self.engine.stream(prompt, self.sampling)
        trim = _StrippedText()
        try:
            for delta in deltas:
                text = trim.feed(delta.text)
                if text:
                    yield text
                if delta.output is not None:
                    yield _answer(question, chunks, delta.output, used)
        finally:
            deltas.close()

    async def astream(
        self, question: str, history: History | None = None
    ) -> AsyncIterator[str | Answer]:
        """Async `stream`."""
        question, turns = _check_question(question), _history_turns(history)
        chunks = await self.retriever.aretrieve(question)
        prompt, used = self._prompt(question, chunks, turns)
        deltas = self.engine.astream(prompt, self.sampling)
        trim = _StrippedText()
        try:
            async for delta in deltas:
                text = trim.feed(delta.text)
                if text:
                    yield text
                if delta.output is not None:
                    yield _answer(question, chunks, delta.output, used)
        finally:
            await deltas.aclose()

    # ---- prompts -----------------------------------------------------------------------

    def _prompt(
        self, question: str, chunks: list[Chunk], turns: list[list[dict[str, str]]]
    ) -> tuple[Composition | PreparedPrompt, int]:
        """The request's prompt with as many of the latest turns as fit, and their number.

        A prompt fits when it leaves `sampling.max_tokens` tokens for the answer in both the
        model's context and the KV pool. With no turn kept the prompt goes to the engine as
        it is (the engine shortens the answer or raises, as for a question without history).
        """
        if not turns:
            return self.compose(question, chunks), 0
        base = self.engine.prepare(self.compose(question, chunks))
        config = self.engine.config
        pool = (config.num_pages - len(base.chunks) - 1) * config.page_size
        budget = min(self.engine.max_model_len, pool) - self.sampling.max_tokens
        for start in range(len(turns)):
            prompt = self._with_turns(base, turns[start:], question)
            if len(prompt.token_ids) <= budget:
                return prompt, len(turns) - start
        return base, 0

    def _with_turns(
        self, base: PreparedPrompt, turns: list[list[dict[str, str]]], question: str
    ) -> PreparedPrompt:
        """`base` (the prompt without history) with `turns` before its question."""
        question_ids = self._tail_ids([], question)
        head = len(base.tail_ids) - len(question_ids)  # > 0 only with the chunk cache off
        assert list(base.tail_ids[head:]) == question_ids, "tokenized as the composer does"
        tail = [*base.tail_ids[:head], *self._tail_ids(turns, question)]
        return PreparedPrompt(chunks=base.chunks, tail_ids=tuple(tail))

    def _tail_ids(self, turns: list[list[dict[str, str]]], question: str) -> list[int]:
        """Token ids after the chunks: earlier turns as chat turns, then the question.

        With a chat template the first turn's question continues the user turn that holds
        the documents, and every later message is a turn of its own; the template's text is
        parsed for control tokens, the messages are not. Without one, turns are plain
        paragraphs ("Answer: ..." for the model's).
        """
        messages = [m for turn in turns for m in turn]
        messages.append({"role": "user", "content": f"Question: {question}"})
        text = self.engine.composer.text
        if not self.engine.composer.has_chat_template:
            plain = "\n\n".join(
                m["content"] if m["role"] == "user" else f"Answer: {m['content']}" for m in messages
            )
            return text.encode_parts([(plain, False)])[0]
        return text.encode_parts(_tail_parts(self.engine.tokenizer, messages))[0]


def _tail_parts(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation after the documents as (text, is_template) parts.

    The template is rendered once with a placeholder per message content (what it writes
    around them is template text) and once with the contents, which must fill the
    placeholders unchanged.
    """
    nonce = secrets.token_hex(8)
    placeholders = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    skeleton = _render(tokenizer, messages, placeholders)
    rendered = _render(tokenizer, messages, [m["content"] for m in messages])
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", skeleton)
    # pieces: ["", "0", template, "1", template, ..., template]
    parts: list[tuple[str, bool]] = []
    if pieces[0] == "" and [int(i) for i in pieces[1::2]] == list(range(len(messages))):
        for message, template in zip(messages, pieces[2::2]):
            parts += [(message["content"], False), (template, True)]
    if not parts or "".join(p for p, _ in parts) != rendered:
        raise ValueError(
            "the model's chat template does not render chat history after the documents as "
            "turns of its own with the messages unchanged; call without history"
        )
    return [p for p in parts if p[0]]


def _render(tokenizer, messages: list[dict[str, str]], contents: list[str]) -> str:
    """The chat template over [system, *messages] (with `contents`), from the documents on."""
    conversation = [{"role": "system", "content": _SYS}] + [
        {"role": m["role"], "content": (_DOCS if i == 0 else "") + c}
        for i, (m, c) in enumerate(zip(messages, contents))
    ]
    rendered = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    _, found, after = rendered.partition(_DOCS)
    if not found:
        raise ValueError("the model's chat template drops message contents; call without history")
    return after


class _StrippedText:
    """Streamed text pieces whose concatenation is the whole text stripped: leading
    whitespace is dropped and trailing whitespace is held back until more text follows."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body) :]
        return body


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return question.strip()


def _history_turns(history: History | None) -> list[list[dict[str, str]]]:
    """History as turns, oldest first: each a user message and the replies that follow it."""
    if history is None:
        return []
    if isinstance(history, (str, Mapping)) or not isinstance(history, Sequence):
        raise TypeError(
            "history must be a list of (question, answer) pairs or of {'role', 'content'} "
            f"messages, got {type(history).__name__}"
        )
    items = list(history)
    if all(isinstance(item, Mapping) for item in items):
        return _message_turns(items)
    turns = []
    for item in items:
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not all(isinstance(text, str) for text in item)
        ):
            raise TypeError(
                "history must be a list of (question, answer) pairs of str or of "
                f"{{'role', 'content'}} messages; got the item {item!r}"
            )
        question, answer = item
        turns.append(
            [
                {"role": "user", "content": f"Question: {_check_question(question)}"},
                {"role": "assistant", "content": answer.strip()},
            ]
        )
    return turns


def _message_turns(messages: list[Mapping]) -> list[list[dict[str, str]]]:
    turns: list[list[dict[str, str]]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise ValueError(
                "history messages need role 'user' or 'assistant' and str content (the system "
                f"prompt is the pipeline's system_prompt); got {dict(message)!r}"
            )
        if not turns and role != "user":
            raise ValueError("history must start with a 'user' message")
        if role == "user":
            turns.append([])
        turns[-1].append({"role": role, "content": content.strip()})
    return turns


def _answer(
    question: str, chunks: list[Chunk], output: GenerationOutput, history_turns: int = 0
) -> Answer:
    ranked = sorted(chunks, key=lambda c: c.metadata.get("rank", 0))
    sources = [
        {"source": c.metadata.get("source", ""), "score": c.metadata.get("score"), "chunk_id": c.id}
        for c in ranked
    ]
    return Answer(
        question=question,
        text=output.text.strip(),
        sources=sources,
        usage=output.usage,
        history_turns=history_turns,
    )
