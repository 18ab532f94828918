"""Question answering over retrieved passages: retrieve, compose, generate.

Each question becomes a `Composition` of [system prompt | retrieved chunks | "Question: ..."].
The system prompt is one chunk shared by every request, and passages retrieved for several
questions are shared chunks too, so the engine computes their KV once. `ask_many` sends all
questions as one batch, which the engine serves with cascade attention over the shared chunks.

This module does not index documents (see `cascade_rag.retrieval`) or parse command lines
(see `cascade_rag.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade_rag.chunks import Chunk
from cascade_rag.composition import Composition
from cascade_rag.outputs import GenerationOutput, Usage
from cascade_rag.retrieval.retriever import Retriever
from cascade_rag.sampling import SamplingParams

if TYPE_CHECKING:
    from cascade_rag.llm import CascadeEngine

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question in one sentence using the documents "
    "below. If they do not contain the answer, say that you do not know."
)


@dataclass(frozen=True)
class Answer:
    """An answer and where it came from.

    Attributes:
        question: the question asked.
        text: the generated answer.
        sources: the retrieved passages, best first: dicts with "source" (document path),
            "score" (similarity, None if the source gives none) and "chunk_id".
        usage: token counts; `usage.cached_tokens` prompt tokens came from the chunk cache.
    """

    question: str
    text: str
    sources: list[dict[str, Any]]
    usage: Usage


class RAGPipeline:
    """Answer questions from retrieved passages with a `CascadeEngine`.

    Args:
        engine: the engine that generates (and names the chunks).
        retriever: a `Retriever`, or any source a `Retriever` accepts (a `DocumentIndex`, a
            LangChain or LlamaIndex retriever...), wrapped with its defaults.
        system_prompt: instructions shared by every request.
        sampling: sampling parameters for every answer; None is greedy, 256 tokens at most.

    Example:
        >>> engine = CascadeEngine()
        >>> index = DocumentIndex.from_folder("handbook/", engine)
        >>> rag = RAGPipeline(engine, Retriever(engine, index, k=3))
        >>> answer = rag.ask("When does the Central Library open on Saturdays?")
        >>> answer.text, [s["source"] for s in answer.sources], answer.usage.cached_tokens
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

    def ask(self, question: str) -> Answer:
        """Retrieve passages for `question` and answer it.

        Raises:
            ValueError: an empty question, an empty index, or a prompt too long for the model.
        """
        return self.ask_many([question])[0]

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

    async def aask(self, question: str) -> Answer:
        """Async `ask`; concurrent calls join the engine's running batch."""
        question = _check_question(question)
        chunks = await self.retriever.aretrieve(question)
        output = await self.engine.agenerate(self.compose(question, chunks), self.sampling)
        return _answer(question, chunks, output)


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return question.strip()


def _answer(question: str, chunks: list[Chunk], output: GenerationOutput) -> Answer:
    ranked = sorted(chunks, key=lambda c: c.metadata.get("rank", 0))
    sources = [
        {"source": c.metadata.get("source", ""), "score": c.metadata.get("score"), "chunk_id": c.id}
        for c in ranked
    ]
    return Answer(question=question, text=output.text.strip(), sources=sources, usage=output.usage)
