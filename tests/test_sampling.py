"""Tests for cascade_rag.sampling (Sampler, SamplingParams) and engine/detokenizer.py.

Tokenizers are built here: a byte-level BPE trained on a few multilingual sentences (its merges
split multi-byte characters across tokens), a fake byte tokenizer for exact control over token
boundaries, and a tiny SentencePiece-style (Metaspace) tokenizer.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cascade_rag.engine.detokenizer import IncrementalDetokenizer, StopChecker, TextStream
from cascade_rag.sampling import Sampler, SamplingParams, make_generator

# ---------------------------------------------------------------------------------------------
# Sampler


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators=None) -> torch.Tensor:
    generators = generators if generators is not None else [None] * len(params)
    return Sampler().sample(logits, params, generators)


def _logits_with_ties(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    # Put the row maximum at 3 positions per row so argmax must pick the first.
    for row in range(batch):
        cols = torch.randperm(vocab, generator=g)[:3]
        logits[row, cols] = logits[row].max() + 1.0
    return logits


def test_greedy_equals_argmax_first_index_on_ties():
    logits = _logits_with_ties(batch=8, vocab=50, seed=0)
    out = _sample(logits, [SamplingParams()] * 8)
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.argmax(logits, dim=-1))
    for row in range(8):
        tied = (logits[row] == logits[row].max()).nonzero().flatten()
        assert len(tied) == 3 and out[row] == tied.min()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_and_tiny_top_p_equal_greedy(temperature):
    logits = _logits_with_ties(batch=16, vocab=64, seed=1)
    greedy = torch.argmax(logits, dim=-1)
    for params in (
        SamplingParams(temperature=temperature, top_k=1),
        SamplingParams(temperature=temperature, top_p=1e-6),
        SamplingParams(temperature=temperature, top_k=7, top_p=1e-6),
    ):
        for step in range(5):
            generators = [make_generator(100 * step + i) for i in range(16)]
            assert torch.equal(_sample(logits, [params] * 16, generators), greedy), params


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    vocab, steps = 40, 30
    g = torch.Generator().manual_seed(2)
    row_logits = torch.randn(steps, vocab, generator=g) * 2  # the seeded request's logits
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)

    def run_alone() -> list[int]:
        gen = make_generator(target.seed)
        return [_sample(row_logits[s : s + 1], [target], [gen]).item() for s in range(steps)]

    alone = run_alone()
    assert alone == run_alone()
    assert len(set(alone)) > 3  # really sampling, not collapsed to greedy

    others = [
        SamplingParams(),
        SamplingParams(temperature=1.0),  # global RNG
        SamplingParams(temperature=0.5, seed=99),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    for position in (0, 2, 4):
        gen = make_generator(target.seed)
        other_gens = [make_generator(p.seed) for p in others]
        batched = []
        for s in range(steps):
            logits = torch.randn(len(others) + 1, vocab, generator=g)
            logits[position] = row_logits[s]
            params = others[:position] + [target] + others[position:]
            gens = other_gens[:position] + [gen] + other_gens[position:]
            batched.append(_sample(logits, params, gens)[position].item())
        assert batched == alone, f"seeded row at position {position} changed its samples"

    different_seed = make_generator(4321)
    other = [
        _sample(row_logits[s : s + 1], [target], [different_seed]).item() for s in range(steps)
    ]
    assert other != alone


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, f"sampled filtered-out tokens: {counts.tolist()}"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept",
    [
        (1.0, 0, 1.0, [0, 1, 2, 3, 4, 5]),
        (0.6, 0, 1.0, [0, 1, 2, 3, 4, 5]),
        (2.0, 3, 1.0, [0, 1, 2]),
        # temperature 1 probs: .48 .26 .14 .08 .03 .01; .48 + .26 < .8 so top_p .8 keeps three
        (1.0, 0, 0.8, [0, 1, 2]),
        (1.0, 0, 0.7, [0, 1]),
        (1.0, 4, 0.5, [0, 1]),
    ],
)
def test_sampled_distribution_matches_filtered_softmax(temperature, top_k, top_p, kept):
    logits = torch.tensor([2.0, 1.4, 0.8, 0.2, -0.8, -2.0])
    vocab, rows, draws = logits.numel(), 4000, 5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(0)
    batch = logits.repeat(rows, 1)
    samples = torch.cat([_sample(batch, [params] * rows) for _ in range(draws)])
    counts = torch.bincount(samples, minlength=vocab).float()

    probs = torch.zeros(vocab)
    probs[kept] = torch.softmax(logits[kept] / temperature, dim=-1)
    stat = _chi_square(counts, probs)
    # df <= 5; P(chi2_5 > 30) ~ 1.5e-5, and the draw is seeded.
    assert stat < 30, f"chi-square {stat:.1f}: counts {counts.tolist()} vs probs {probs.tolist()}"


def test_sampling_global_rng_and_greedy_rows_mix():
    logits = _logits_with_ties(batch=6, vocab=30, seed=3)
    params = [SamplingParams(), SamplingParams(temperature=1.0)] * 3
    torch.manual_seed(5)
    first = _sample(logits, params)
    torch.manual_seed(5)
    assert torch.equal(first, _sample(logits, params))
    assert torch.equal(first[0::2], torch.argmax(logits[0::2], dim=-1))


def test_sampler_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="one of each per row"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        Sampler().sample(torch.zeros(5), [SamplingParams()], [None])


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"temperature": math.nan}, "temperature=nan"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -2}, "top_k=-2"),
        ({"stop": ("ok", "")}, "empty string"),
        ({"stop": ["ok", 3]}, "stop string 3 is a int"),
        ({"stop": 5}, "stop=5"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_stop():
    assert SamplingParams(stop="###").stop == ("###",)
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])
    assert params.stop == ("a", "b") and params.stop_token_ids == (3, 4)
    assert hash(params) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)))
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.1).is_greedy


# ---------------------------------------------------------------------------------------------
# Detokenizer and stop strings

SENTENCES = [
    "héllo wörld, naïve café crème brûlée",
    "日本語のテキストです。世界こんにちは",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧 family",
    "the quick brown fox ### jumps\n\nover",
    "Ünïcödé façade São Paulo Zürich",
]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose merges split multi-byte characters across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<eos>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class ByteTokenizer:
    """Fake tokenizer: each token is a byte string; decoding joins and decodes as UTF-8."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.special_ids = {i for i, p in enumerate(pieces) if p == b"<eos>"}

    def ids(self, *pieces: bytes | str) -> list[int]:
        return [self.pieces.index(p.encode() if isinstance(p, str) else p) for p in pieces]

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        assert not clean_up_tokenization_spaces
        keep = [i for i in token_ids if not (skip_special_tokens and i in self.special_ids)]
        return b"".join(self.pieces[i] for i in keep).decode("utf-8", errors="replace")


def _stream_all(stream: TextStream, ids: list[int]) -> tuple[list[str], int]:
    """Feed ids until a stop; return (deltas including finish(), number of ids consumed)."""
    deltas = []
    for n, token_id in enumerate(ids, start=1):
        delta, stopped = stream.add(token_id)
        deltas.append(delta)
        if stopped:
            assert stream.finish() == ""
            return deltas, n
    deltas.append(stream.finish())
    return deltas, len(ids)


def _expected(text: str, stop: tuple[str, ...], include: bool) -> str:
    """Reference: cut at the stop string that ends first (ties: the longest)."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stop if s in text]
    if not hits:
        return text
    end, _, s = min(hits)
    return text[:end] if include else text[: end - len(s)]


@pytest.mark.parametrize(
    "text",
    [
        "naïve café crème brûlée",
        "日本語のテキストです。世界",
        "party 🎉😀 time 👍🏽 🚀 and 👩‍👧",
        "mixed: Zürich 東京 🎉!",
    ],
)
def test_detokenizer_multibyte_deltas_concatenate_to_decode(bpe, text):
    ids = bpe.encode(text)
    pieces = [bpe.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "test needs characters split across tokens"
    detok = IncrementalDetokenizer(bpe)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text and detok.token_ids == ids
    assert not any("\ufffd" in d for d in deltas), deltas


def test_detokenizer_prompt_context_and_special_tokens(bpe):
    prompt = bpe.encode("<|im_start|>user\n日本語<eos><|im_start|>assistant\n")
    ids = bpe.encode("世界 😀 café") + [bpe.eos_token_id]
    with_context = IncrementalDetokenizer(bpe, prompt_ids=prompt)
    deltas = [with_context.add(i) for i in ids] + [with_context.flush()]
    assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=True) == "世界 😀 café"
    keep_special = IncrementalDetokenizer(bpe, skip_special_tokens=False)
    assert "".join([keep_special.add(i) for i in ids]) == "世界 😀 café<eos>"


def test_detokenizer_prompt_ending_inside_a_character():
    tok = ByteTokenizer([b"a", "é".encode()[:1], "é".encode()[1:], b"b"])
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.ids("a", "é".encode()[:1]))
    assert [detok.add(i) for i in tok.ids("é".encode()[1:], "b")] == ["", "\ufffdb"]
    assert detok.text == tok.decode(tok.ids("é".encode()[1:], "b"))


def test_detokenizer_sentencepiece_leading_space():
    vocab = {"▁Hello": 0, "▁world": 1, "<unk>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    plain = IncrementalDetokenizer(sp)
    assert [plain.add(i) for i in (0, 1, 0)] == ["Hello", " world", " Hello"]
    assert plain.text == sp.decode([0, 1, 0])
    # With the prompt as context, the first generated token keeps its space (a continuation).
    continued = IncrementalDetokenizer(sp, prompt_ids=[0])
    assert [continued.add(i) for i in (1, 0)] == [" world", " Hello"]


def test_detokenizer_flush_shows_incomplete_character():
    tok = ByteTokenizer([b"ok ", "😀".encode()[:2], "😀".encode()[2:]])
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in tok.ids("ok ", "😀".encode()[:2])] == ["ok ", ""]
    assert detok.flush() == "\ufffd"
    assert detok.text == tok.decode(tok.ids("ok ", "😀".encode()[:2]))


def test_stop_string_spanning_tokens(bpe):
    text = "the quick brown fox ### jumps\n\nover"
    ids = bpe.encode(text)
    for stop, include, expected in [
        ("fox #", False, "the quick brown "),
        ("fox #", True, "the quick brown fox #"),
        ("\n\no", False, "the quick brown fox ### jumps"),
        ("k b", True, "the quick b"),
    ]:
        boundaries = {len(bpe.decode(ids[:n])) for n in range(len(ids) + 1)}
        start = text.index(stop)
        assert any(start < b < start + len(stop) for b in boundaries), "stop must span tokens"
        stream = TextStream(bpe, stop=(stop,), include_stop_str_in_output=include)
        deltas, consumed = _stream_all(stream, ids)
        assert "".join(deltas) == stream.text == expected
        assert stream.finished and stream.stop_str == stop
        # Stopped at the token that completes the stop string.
        assert stop in bpe.decode(ids[:consumed]) and stop not in bpe.decode(ids[: consumed - 1])


def test_stop_string_prefix_is_held_back_until_it_completes():
    tok = ByteTokenizer([b"a", b"#", b"##", b"b"])
    stream = TextStream(tok, stop=("###",))
    assert stream.add(tok.ids("a")[0]) == ("a", False)
    assert stream.add(tok.ids("#")[0]) == ("", False)  # "#" could start "###": held
    assert stream.add(tok.ids("##")[0]) == ("", True)  # "###": no '#' was ever shown
    assert stream.text == "a" and stream.stop_str == "###" and stream.finish() == ""


def test_held_back_text_is_released_when_stop_cannot_match():
    tok = ByteTokenizer([b"a", b"#", b"##", b"b", b"#b", b"<eos>"])
    stream = TextStream(tok, stop=("###",))
    assert stream.add(tok.ids("a")[0]) == ("a", False)
    assert stream.add(tok.ids("##")[0]) == ("", False)  # could become "###"
    assert stream.add(tok.ids("b")[0]) == ("##b", False)  # cannot any more
    assert stream.add(tok.ids("#")[0]) == ("", False)
    assert stream.add(tok.ids("<eos>")[0]) == ("", False)  # skipped special token
    assert stream.finish() == "#"  # generation ended for another reason: flush
    assert stream.text == "a##b#" and stream.stop_str is None and stream.finished
    assert stream.finish() == ""
    with pytest.raises(RuntimeError, match="after the stream finished"):
        stream.add(0)


def test_stop_inside_one_token_and_include_stop_str():
    tok = ByteTokenizer([b"x", b"yEND", b"z", b"ENDz"])
    for include, expected in [(False, "xy"), (True, "xyEND")]:
        stream = TextStream(tok, stop=("END",), include_stop_str_in_output=include)
        assert stream.add(0) == ("x", False)
        assert stream.add(1) == (expected[1:], True)
        assert stream.text == expected and stream.stop_str == "END"


def test_stop_that_ends_first_wins():
    checker = StopChecker(("abcd", "bc", "xbc"))
    assert checker.find("xabcd") == (2, "bc")  # "bc" ends before "abcd"
    assert checker.find("xbcd") == (0, "xbc")  # same end: the longer one
    assert StopChecker(("abcd", "bc"), include_stop_str_in_output=True).find("abcd") == (3, "bc")
    assert checker.find("xab") is None
    assert checker.safe_length("zzab") == 2 and checker.safe_length("zzx") == 2
    assert checker.safe_length("zz") == 2 and StopChecker(()).safe_length("abc") == 3
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(("",))


def test_stop_string_with_multibyte_characters(bpe):
    text = "日本語のテキストです。世界こんにちは"
    ids = bpe.encode(text)
    stream = TextStream(bpe, stop=("。世",))
    deltas, _ = _stream_all(stream, ids)
    assert "".join(deltas) == "日本語のテキストです"
    assert not any("\ufffd" in d for d in deltas)


# Hypothesis: random ids (including special tokens and byte soup that is not valid UTF-8).


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_stream_property_deltas_equal_truncated_decode(bpe, data):
    vocab = len(bpe)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    full = bpe.decode(ids, skip_special_tokens=True)
    # Stop strings: substrings of the text (so they hit) and a few short fixed ones.
    substring = st.builds(
        lambda a, n: full[a : a + n], st.integers(0, max(len(full) - 1, 0)), st.integers(1, 4)
    ).filter(bool)
    fixed = st.sampled_from(["a", "é", "世界", "😀", "##", "\n\n", " th"])
    stop = tuple(data.draw(st.lists(substring | fixed if full else fixed, max_size=3)))
    include = data.draw(st.booleans(), label="include")
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6), label="prompt")

    stream = TextStream(bpe, stop=stop, include_stop_str_in_output=include, prompt_ids=prompt)
    released = ""
    for n, token_id in enumerate(ids, start=1):
        delta, stopped = stream.add(token_id)
        released += delta
        # Shown text never reaches into a stop string or an incomplete character.
        assert (
            _expected(bpe.decode(ids[:n], skip_special_tokens=True), stop, True).startswith(
                released
            )
            or stopped
        )
        if stopped:
            break
    released += stream.finish()
    consumed = ids[:n] if ids else []
    expected = _expected(bpe.decode(consumed, skip_special_tokens=True), stop, include)
    assert released == stream.text == expected
    if "\ufffd" not in expected:
        assert "\ufffd" not in released
