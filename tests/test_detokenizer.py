"""The DecodeStream fast path of engine/detokenizer.py against its Python reference.

`DecodeStreamDetokenizer` (the tokenizers library's streaming decoder) must give the same deltas,
token for token, as `IncrementalDetokenizer`, and `TextStream` the same `(delta, stopped)` pairs
with either one, so the final text stays `decode(generated_ids)` cut at the stop string. Checked
with hypothesis on random ids (special tokens, byte soup that is no valid UTF-8, prompt context)
for four tokenizers: the default model's (SmolLM2, byte-level BPE), a byte-level BPE trained here,
a SentencePiece-style Metaspace BPE, and a Llama-style BPE with byte fallback and a stripped
leading space. The older tests in test_sampling.py keep covering the reference.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cascade_rag.engine.detokenizer import (
    DecodeStreamDetokenizer,
    IncrementalDetokenizer,
    TextStream,
    decode_stream_backend,
    make_detokenizer,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café crème brûlée à Zürich",
    "日本語のテキストです。世界こんにちは",
    "party 🎉😀 time 👍🏽 🚀 and 👩‍👧 done",
    "Стоп-слова и многобайтовые символы",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
]
ASCII_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "the answer is in the retrieved documents",
    "stop strings may span tokens ### END",
]
SPECIALS = ["<eos>", "<|im_start|>", "<|im_end|>"]


def _fast(tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    assert decode_stream_backend(fast) is not None
    return fast


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return _fast(tok)


def _metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style: '▁' marks spaces, the decoder drops the first token's space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *SPECIALS], show_progress=False
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return _fast(tok)


def _llama_style_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 style: byte-fallback tokens <0x..> for characters outside the vocabulary (here
    every non-ASCII one, so multi-byte characters always span tokens), and a decoder that
    strips one leading space of the whole text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", *SPECIALS], show_progress=False
    )
    tok.train_from_iterator(ASCII_SENTENCES * 3, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return _fast(Tokenizer.from_str(json.dumps(spec)))


def _smollm2() -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    from cascade_rag.models.loader import convert_gguf, default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(convert_gguf(default_model_path())))
    assert decode_stream_backend(tokenizer) is not None
    return tokenizer


_BUILDERS = {
    "smollm2": _smollm2,
    "byte_level_bpe": _byte_level_bpe,
    "metaspace_bpe": _metaspace_bpe,
    "llama_style_bpe": _llama_style_bpe,
}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def tokenizer(request):
    return _BUILDERS[request.param]()


def _prefix_stable(tokenizer, decoded: str) -> bool:
    """False where the decoder itself is not prefix-stable: byte fallback turns every byte of a
    run of byte tokens into '\ufffd' once the run is invalid UTF-8, including a complete
    character already shown (the module docstring's known exception; both paths agree)."""
    if id(tokenizer) not in _BYTE_FALLBACK:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        _BYTE_FALLBACK[id(tokenizer)] = bool(spec["model"].get("byte_fallback"))
    return not (_BYTE_FALLBACK[id(tokenizer)] and "\ufffd" in decoded)


_BYTE_FALLBACK: dict[int, bool] = {}


def _deltas(detok, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def _special_ids(tokenizer) -> list[int]:
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    special = sorted(i for i, token in added.items() if token.special)
    assert special
    return special


def _ids(tokenizer, data, label: str, max_size: int) -> list[int]:
    """Random ids: tokens of real text (split characters, spaces) mixed with any vocab id."""
    vocab = len(tokenizer)
    text_ids = tokenizer.encode(data.draw(st.sampled_from(SENTENCES)), add_special_tokens=False)
    pieces = st.one_of(
        st.integers(0, vocab - 1),
        st.sampled_from(text_ids),
        st.sampled_from(_special_ids(tokenizer)),
    )
    return data.draw(st.lists(pieces, max_size=max_size), label=label)


# ---- detokenizer: fast == reference, delta for delta ----------------------------------------


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_decode_stream_deltas_equal_reference(tokenizer, data):
    ids = _ids(tokenizer, data, "ids", 40)
    prompt = _ids(tokenizer, data, "prompt", 8) if data.draw(st.booleans()) else None
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    fast = make_detokenizer(tokenizer, prompt, skip)
    assert isinstance(fast, DecodeStreamDetokenizer)
    reference = IncrementalDetokenizer(tokenizer, prompt, skip)
    got, expected = _deltas(fast, ids), _deltas(reference, ids)
    assert got == expected, (ids, prompt, skip)
    assert fast.text == reference.text and fast.token_ids == ids
    full = tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    if prompt is None and _prefix_stable(tokenizer, full):  # the module's promise
        assert "".join(got) == full


@pytest.mark.parametrize("text", SENTENCES)
def test_encoded_text_streams_back_without_replacement_chars(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    fast = make_detokenizer(tokenizer)
    deltas = _deltas(fast, ids)
    assert deltas == _deltas(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas), deltas


def test_multibyte_characters_split_across_tokens_are_held_back():
    tok = _llama_style_bpe()
    ids = tok.encode("ok 日本 🎉", add_special_tokens=False)
    byte_tokens = [i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_tokens) == 3 + 3 + 4, "test needs byte-fallback pieces"
    detok = DecodeStreamDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == "ok 日本 🎉" and not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= len(byte_tokens) - 3  # each character waits for its last byte
    # Generation ending inside a character: flush shows what the full decode shows.
    cut = ids[: ids.index(byte_tokens[-1])]
    detok = DecodeStreamDetokenizer(tok)
    text = "".join(detok.add(i) for i in cut)
    assert text + detok.flush() == tok.decode(cut) and tok.decode(cut).endswith("\ufffd")
    assert detok.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer):
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [start] + tokenizer.encode(" café 日本", add_special_tokens=False) + [end]
    for skip in (True, False):
        deltas = _deltas(make_detokenizer(tokenizer, skip_special_tokens=skip), ids)
        assert deltas == _deltas(IncrementalDetokenizer(tokenizer, None, skip), ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in "".join(deltas)) is not skip


def test_sentencepiece_prompt_context_keeps_the_leading_space():
    tok = _metaspace_bpe()
    prompt = tok.encode("The quick", add_special_tokens=False)
    ids = tok.encode("brown fox", add_special_tokens=False)
    continued = DecodeStreamDetokenizer(tok, prompt_ids=prompt)
    assert "".join(_deltas(continued, ids)) == " brown fox"
    assert "".join(_deltas(DecodeStreamDetokenizer(tok), ids)) == "brown fox"


def test_prompt_ending_inside_a_character_is_not_used_as_context():
    tok = _llama_style_bpe()
    ids = tok.encode("日本", add_special_tokens=False)
    prompt, generated = ids[:2], ids[2:]  # the prompt ends after 2 of 日's 3 bytes
    fast = DecodeStreamDetokenizer(tok, prompt_ids=prompt)
    reference = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert _deltas(fast, generated) == _deltas(reference, generated)
    assert fast.text == tok.decode(generated)


def test_a_decoder_that_is_not_prefix_stable_falls_back_to_the_reference():
    vocab = {"a": 0, "b": 1, "c": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = [0, 1, 1, 2, 0, 2]  # decode([a, b, b]) = "Xb" does not start with decode([a])
    fast = DecodeStreamDetokenizer(hf)
    assert _deltas(fast, ids) == _deltas(IncrementalDetokenizer(hf), ids)
    assert fast._fallback is not None


def test_make_detokenizer_falls_back_where_decode_is_not_the_backends():
    class Overridden(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    base = _byte_level_bpe()
    custom = Overridden(tokenizer_object=base.backend_tokenizer, eos_token="<eos>")
    assert decode_stream_backend(custom) is None
    ids = custom.encode("café", add_special_tokens=False)
    detok = make_detokenizer(custom)
    assert isinstance(detok, IncrementalDetokenizer)
    assert "".join(_deltas(detok, ids)) == "CAFÉ"
    assert isinstance(make_detokenizer(base, use_decode_stream=False), IncrementalDetokenizer)
    with pytest.raises(ValueError, match="make_detokenizer"):
        DecodeStreamDetokenizer(custom)


# ---- TextStream: stop strings on the fast path -----------------------------------------------


def _expected(text: str, stop: tuple[str, ...], include: bool) -> str:
    """Reference: cut at the stop string that ends first (ties: the longest)."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stop if s in text]
    if not hits:
        return text
    end, _, s = min(hits)
    return text[:end] if include else text[: end - len(s)]


def _run(stream: TextStream, ids: list[int], min_tokens: int) -> tuple[list, int]:
    out = []
    for n, token_id in enumerate(ids, start=1):
        out.append(stream.add(token_id, check_stop=n > min_tokens))
        if out[-1][1]:
            return out, n
    out.append((stream.finish(), False))
    return out, len(ids)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_text_stream_fast_equals_reference_with_stop_strings(tokenizer, data):
    ids = _ids(tokenizer, data, "ids", 40)
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    substring = st.builds(
        lambda a, n: full[a : a + n], st.integers(0, max(len(full) - 1, 0)), st.integers(1, 5)
    ).filter(bool)
    fixed = st.sampled_from(["é", "世界", "😀", "###", "\n\n", " the", "<|im_end|>"])
    stop = tuple(data.draw(st.lists(substring | fixed if full else fixed, max_size=3)))
    include = data.draw(st.booleans(), label="include")
    min_tokens = data.draw(st.integers(0, 3), label="min_tokens")
    kw = dict(stop=stop, include_stop_str_in_output=include, skip_special_tokens=skip)
    fast = TextStream(tokenizer, **kw)
    reference = TextStream(tokenizer, use_decode_stream=False, **kw)
    assert isinstance(fast._detokenizer, DecodeStreamDetokenizer)
    got, consumed = _run(fast, ids, min_tokens)
    assert got == _run(reference, ids, min_tokens)[0]
    assert fast.text == reference.text == "".join(d for d, _ in got)
    decoded = tokenizer.decode(ids[:consumed], skip_special_tokens=skip)
    if min_tokens == 0 and _prefix_stable(tokenizer, decoded):
        assert fast.text == _expected(decoded, stop, include)


def test_stop_string_spanning_tokens_and_characters(tokenizer):
    text = "日本語のテキストです。世界こんにちは"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stop, include in [("す。世", False), ("す。世", True), ("スト", False), ("は", True)]:
        kw = dict(stop=(stop,), include_stop_str_in_output=include)
        fast = TextStream(tokenizer, **kw)
        got, consumed = _run(fast, ids, 0)
        assert got == _run(TextStream(tokenizer, use_decode_stream=False, **kw), ids, 0)[0]
        assert fast.text == _expected(text, (stop,), include) and fast.stop_str == stop
        assert stop in tokenizer.decode(ids[:consumed])  # stopped once the stop was stable
        assert not any("\ufffd" in d for d, _ in got)


# ---- StopChecker: the regex scans against their definitions ----------------------------------


def _find_reference(text: str, stop: tuple[str, ...], include: bool):
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if not hits:
        return None
    end, start, s = min(hits)
    return (end if include else start), s


def _safe_length_reference(text: str, stop: tuple[str, ...]) -> int:
    held = [n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])]
    return len(text) - max(held, default=0)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab#.\n世😀", max_size=12),
    stop=st.lists(st.text(alphabet="ab#.\n世😀", min_size=1, max_size=5), max_size=4),
    include=st.booleans(),
)
def test_stop_checker_equals_its_definition(text, stop, include):
    from cascade_rag.engine.detokenizer import StopChecker

    checker = StopChecker(tuple(stop), include)
    assert checker.find(text) == _find_reference(text, tuple(stop), include)
    assert checker.safe_length(text) == _safe_length_reference(text, tuple(stop))
