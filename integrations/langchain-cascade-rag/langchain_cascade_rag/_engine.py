"""What `ChatCascadeRAG` and `CascadeRAGLLM` share: the engine they run on, their sampling
fields, and the translation of LangChain call arguments into engine requests and of engine
outputs into LangChain usage records.

It does not build chat prompts or talk to LangChain callbacks (chat_models.py, llms.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from pydantic import BaseModel, ConfigDict, Field, model_validator

from langchain_cascade_rag._arguments import reject_unknown

# Per-call overrides accepted by invoke/stream/batch (`model.invoke(msgs, temperature=0.7)`).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")

SERVER_HINT = (
    "Pick the model with model= (a path) or engine= (a CascadeEngine); to call a server that "
    "speaks the OpenAI API, use an OpenAI-compatible client, e.g. "
    "langchain_openai.ChatOpenAI(base_url=..., api_key=...)."
)


class CascadeEngineParams(BaseModel):
    """The engine a LangChain model runs on and its default sampling options.

    Pass `engine` to share one `CascadeEngine` (and its chunk cache) between several models;
    otherwise one is built from `model` and `engine_kwargs`. A constructor argument that is
    not a field raises `TypeError` naming it (pydantic would ignore it).
    """

    model_config = ConfigDict(extra="forbid")

    engine: Any = Field(default=None, exclude=True)
    """The `cascade_rag.llm.CascadeEngine` to run on; None builds one from `model`."""

    model: Any = Field(default=None, exclude=True)
    """What to build the engine from when `engine` is None: a model folder, `.safetensors` or
    `.gguf` path, a `cascade_rag.models.loader.LoadedModel`, or None for the default
    SmolLM2-135M-Instruct."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """`cascade_rag.config.EngineConfig` fields for the engine built from `model`, e.g.
    `{"kv_cache_tokens": 8192, "device": "cuda"}`."""

    max_tokens: int | None = 256
    """Most tokens to generate; None lets a request run to the end of the context."""

    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""

    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 turns it off."""

    top_k: int = 0
    """Keep only the `top_k` most likely tokens; 0 turns it off."""

    seed: int | None = None
    """Seed of each request's own generator (reproducible sampling in any batch)."""

    stop: list[str] | None = None
    """Default stop strings; a `stop=` passed to a call replaces them."""

    streaming: bool = False
    """Generate through the streaming path in `invoke`/`generate` (token callbacks fire)."""

    passage_chunks: bool = True
    """Make each passage registered with the engine (`CascadeEmbeddings(engine=...)`) that a
    prompt contains a chunk of its own, so its KV is reused where it comes back (see
    `cascade_rag.passages`; the prompt's token ids do not change). Only active once the
    engine has passages."""

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        reject_unknown(cls, values, "runs the cascade-rag engine", SERVER_HINT)
        return values

    @model_validator(mode="after")
    def _build_engine(self) -> CascadeEngineParams:
        from cascade_rag.llm import CascadeEngine

        if self.engine is None:
            self.engine = CascadeEngine(self.model, **self.engine_kwargs)
        elif not isinstance(self.engine, CascadeEngine):
            raise TypeError(
                f"engine must be a cascade_rag.llm.CascadeEngine, got {type(self.engine).__name__}"
            )
        elif self.model is not None or self.engine_kwargs:
            raise ValueError(
                "pass either engine= (an existing CascadeEngine) or model=/engine_kwargs= "
                "(to build one), not both"
            )
        self.sampling_params()  # bad sampling fields fail here, not at the first call
        return self

    @property
    def model_name(self) -> str:
        """The engine's model identity, `"<name>@<digest>"`."""
        return self.engine.model_name

    @property
    def _default_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_FIELDS} | {"stop": self.stop}

    def sampling_params(self, stop: Sequence[str] | None = None, **overrides: Any):
        """The `SamplingParams` of a call: the model's fields, then per-call overrides.

        `stop` given for a call replaces the model's `stop` field (LangChain's convention).
        """
        from cascade_rag.sampling import SamplingParams

        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        values.update(overrides)
        if values["max_tokens"] is None:
            values["max_tokens"] = self.engine.max_model_len  # the engine clamps to the context
        stop = self.stop if stop is None else stop
        return SamplingParams(stop=tuple(stop or ()), **values)

    def _engine_prompt(self, prompt):
        """The engine prompt for `prompt` (a str or chat messages): with `passage_chunks`
        and passages registered with the engine, a `PreparedPrompt` whose passages are
        chunks; otherwise the prompt itself."""
        if not self.passage_chunks:
            return prompt
        from cascade_rag.passages import compose_prompt

        return compose_prompt(self.engine, prompt)

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: Mapping) -> dict:
        """LangSmith's standard tracing params, honouring per-call overrides."""
        model = kwargs.get("model")
        params: dict[str, Any] = {
            "ls_provider": "cascade_rag",
            "ls_model_name": model if isinstance(model, str) else self.model_name,
            "ls_model_type": model_type,
            "ls_temperature": kwargs.get("temperature", self.temperature),
        }
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params


def split_call_kwargs(owner: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Split a call's keyword arguments into (sampling overrides, `chunks`).

    Raises:
        TypeError: an argument the model does not understand (e.g. `tools=` or `model=`),
            instead of silently ignoring it.
    """
    rest = dict(kwargs)
    rest.pop("stream", None)  # LangChain's own switch between the generate and stream paths
    chunks = rest.pop("chunks", None)
    overrides = {name: rest.pop(name) for name in SAMPLING_FIELDS if name in rest}
    if rest:
        raise TypeError(
            f"{owner} got unexpected keyword arguments {sorted(rest)}; a call accepts "
            f"chunks= and the sampling fields {list(SAMPLING_FIELDS)} (the model and engine "
            "are fixed when the model is built)"
        )
    return overrides, chunks


def composition_chunks(engine, chunks: Any) -> list:
    """Turn a `chunks=` argument into `Composition.chunks`.

    Accepts a list of cascade `Chunk`s, `ChunkId`s, texts, or LangChain `Document`s. A
    Document that carries the `chunk_id` of a chunk still registered in `engine` with the same
    text (as `CascadeRAGRetriever` returns them) reuses that chunk's exact tokens; any other
    Document is registered by its `page_content`.
    """
    from cascade_rag.chunks import Chunk, UnknownChunkError

    if isinstance(chunks, (str, Document, Chunk)) or not isinstance(chunks, Sequence):
        raise TypeError(
            f"chunks must be a list of Chunk, ChunkId, str or Document, got "
            f"{type(chunks).__name__}; wrap a single one in a list"
        )
    items: list = []
    for item in chunks:
        if isinstance(item, Document):
            chunk = None
            chunk_id = item.metadata.get("chunk_id")
            if isinstance(chunk_id, str):
                try:
                    chunk = engine.get_chunk(chunk_id)
                except UnknownChunkError:
                    chunk = None
            if chunk is not None and chunk.text == item.page_content:
                items.append(chunk)
            else:
                items.append(item.page_content)
        elif isinstance(item, (str, Chunk)):
            items.append(item)  # a ChunkId is a str the composer looks up
        else:
            raise TypeError(
                f"chunks items must be Chunk, ChunkId, str or Document, got {type(item).__name__}"
            )
    return items


def usage_metadata(usage) -> UsageMetadata:
    """LangChain's usage record of one engine `Usage`: cached prompt tokens are `cache_read`."""
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def token_usage(usage) -> dict[str, int]:
    """OpenAI-style token counts (completion models' `generation_info` / `llm_output`), with
    `recomputed_tokens` (chunk_reuse="anywhere": reused chunk tokens computed again)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "recomputed_tokens": usage.recomputed_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
