"""Passages found inside flat prompts (cascade_rag.passages, PromptComposer.prepare_passages).

On the default model's tokenizer: a composed prompt always has the flat prompt's token ids;
passages become RAG_RESULT chunks (the chunk `PassageIndex.add` registered) only on token
boundaries; longer matches win, each passage once; the text before the first passage starts
with a SYSTEM_PROMPT anchor up to the first message end; an index holds no engine alive; and
with exact prefix reuse a composed prompt answers as its full prefill does.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from cascade_rag.chunks import ChunkType
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.passages import (
    MIN_PASSAGE_CHARS,
    PassageIndex,
    compose_prompt,
    passage_index,
    register_passages,
)
from cascade_rag.sampling import SamplingParams

FERRY = (
    "The F1 ferry crosses to Gull Island every 30 minutes between 6:00 and 22:00; the "
    "crossing takes 12 minutes and a single ticket costs 3 crowns."
)
BIKES = (
    "City bikes can be rented at Central Station for 6 crowns a day. Bikes may be taken on "
    "the ferry free of charge outside the morning rush hour."
)
TRAMS = (
    "Tram line 4 runs from Harbour Gate to the university every ten minutes. A monthly tram "
    "pass costs 45 crowns and is valid on the night trams too."
)


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=4096) as eng:
        register_passages(eng, [FERRY, BIKES, TRAMS])
        yield eng


def messages(context: str, question: str = "How much is the ferry?") -> list[dict]:
    return [
        {"role": "system", "content": "Answer from the context.\nBe brief."},
        {"role": "user", "content": f"Context:\n{context}\n---\nQuestion: {question}"},
    ]


def kinds(prepared: PreparedPrompt) -> list[str]:
    return [c.type.value for c in prepared.chunks]


def test_passages_become_the_registered_chunks_and_ids_do_not_change(engine):
    index = passage_index(engine)
    chunks = {c.text: c for c in index.add([FERRY, BIKES, TRAMS])}  # already held: same chunks
    prompt = messages(f"{BIKES}\n\n{FERRY}")
    prepared, found = index.compose(prompt)
    assert found == 2
    assert prepared.token_ids == engine.prepare(prompt).token_ids
    # [system turn (the anchor) | user turn head | BIKES | "\n\n" | FERRY] + private tail
    assert kinds(prepared) == ["system_prompt", "context", "rag_result", "context", "rag_result"]
    assert prepared.chunks[2].id == chunks[BIKES].id and prepared.chunks[4].id == chunks[FERRY].id
    assert engine.tokenizer.decode(prepared.chunks[0].token_ids).endswith("Be brief.<|im_end|>\n")
    tail = engine.tokenizer.decode(prepared.tail_ids)
    assert tail.startswith("\n---\nQuestion: How much is the ferry?")
    # plain text prompts too (as a completion model sends them)
    text = f"Use the context.\n\n{TRAMS}\n\nQ: how much is a tram pass?\nA:"
    prepared, found = index.compose(text)
    assert found == 1 and prepared.token_ids == engine.prepare(text).token_ids
    assert kinds(prepared) == ["system_prompt", "rag_result"]


def test_longest_match_wins_and_each_passage_is_used_once(engine):
    index = passage_index(engine)
    short = FERRY[: FERRY.index(";")]  # a registered passage inside a longer one
    assert index.add([short])[0] is not None
    text = f"Context:\n{FERRY}\n\nAgain:\n{FERRY}\n\nQ: when?"
    spans = index.find(text)
    assert [text[s:e] for s, e in spans] == [FERRY]  # not `short`, and once
    alone = f"Context:\n{short}.\n\nQ: when?"
    assert [alone[s:e] for s, e in index.find(alone)] == [short]


def test_passages_off_token_boundaries_or_at_the_end_stay_text(engine):
    index = passage_index(engine)
    # " The" is one token: the passage's first character is inside it
    glued = f"Context: {TRAMS}\n\nQ: which tram?"
    assert index.find(glued)  # found as text ...
    prepared, found = index.compose(glued)
    assert found == 0 and prepared.token_ids == engine.prepare(glued).token_ids  # ... not cut
    # the last prompt token is always the request's own
    ending = f"Context:\n{TRAMS}"
    prepared, found = index.compose(ending)
    assert found == 0 and prepared.tail_ids


def test_prompts_without_passages_are_anchored_at_the_first_message_end(engine):
    prompt = [
        {
            "role": "system",
            "content": "\n".join(f"Rule {i}: be brief and polite." for i in range(8)),
        },
        {"role": "user", "content": "Hello there, what can you do?"},
    ]
    prepared, found = passage_index(engine).compose(prompt)
    flat = engine.prepare(prompt)
    assert found == 0 and prepared.token_ids == flat.token_ids
    # the whole system turn is the anchor, where the flat prompt cuts it at line ends
    turn = engine.tokenizer.decode(prepared.chunks[0].token_ids)
    assert prepared.chunks[0].type is ChunkType.SYSTEM_PROMPT
    assert turn.endswith("Rule 7: be brief and polite.<|im_end|>\n")
    assert len(flat.chunks[0]) < len(prepared.chunks[0])


def test_short_texts_and_metadata_lines(engine):
    index = passage_index(engine)
    assert index.add(["x" * (MIN_PASSAGE_CHARS - 1)]) == [None]
    body = "Gull Island has a lighthouse, a bird reserve and one cafe near the pier."
    index.add([f"file_path: /docs/gull.md\nfile_name: gull.md\n\n{body}"])
    # a prompt that renders other metadata lines: the body alone is found
    prompt = messages(f"file_path: /docs/gull.md\n\n{body}", "What is on Gull Island?")
    prepared, found = index.compose(prompt)
    assert found == 1 and prepared.token_ids == engine.prepare(prompt).token_ids
    passage = next(c for c in prepared.chunks if c.type is ChunkType.RAG_RESULT)
    assert passage.text == body
    with pytest.raises(TypeError, match="passage text"):
        index.add([b"bytes"])


def test_compose_prompt_without_an_index_returns_the_prompt(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=1024) as other:
        prompt = messages(FERRY)
        assert passage_index(other) is None
        assert compose_prompt(other, prompt) is prompt
        index = passage_index(other, create=True)
        assert passage_index(other) is index and isinstance(index, PassageIndex)
        assert compose_prompt(other, prompt) is prompt  # an empty index: nothing to find
        index.add([FERRY])
        assert isinstance(compose_prompt(other, prompt), PreparedPrompt)
        index.clear()
        assert len(index) == 0 and compose_prompt(other, prompt) is prompt


def test_chunk_cache_off_gives_one_private_run(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=1024, enable_chunk_cache=False) as off:
        register_passages(off, [FERRY])
        prompt = messages(FERRY)
        prepared = compose_prompt(off, prompt)
        assert prepared.chunks == () and list(prepared.tail_ids) == off.prepare(prompt).token_ids


def test_an_index_does_not_keep_its_engine_alive(default_model):
    other = CascadeEngine(default_model, kv_cache_tokens=1024)
    register_passages(other, [FERRY])
    ref = weakref.ref(other)
    other.close()
    del other
    gc.collect()
    assert ref() is None


def test_composed_prompt_with_cache_reads_answers_as_full_prefill(engine):
    """Exact prefix reuse: a composed prompt whose system turn and first passage come from
    the cache gives the greedy tokens of a full prefill of the same ids."""
    params = SamplingParams(max_tokens=8)
    first = compose_prompt(engine, messages(f"{FERRY}\n\n{BIKES}", "How much is a bike?"))
    second = compose_prompt(engine, messages(f"{FERRY}\n\n{TRAMS}", "How much is a ferry?"))
    engine.generate(first, params)
    cached = engine.generate(second, params)
    head = sum(len(c) for c in second.chunks[:3])  # anchor, user head, FERRY
    assert cached.usage.cached_tokens >= head
    full = engine.generate(PreparedPrompt(chunks=(), tail_ids=tuple(second.token_ids)), params)
    assert full.usage.cached_tokens == 0
    assert cached.token_ids == full.token_ids
