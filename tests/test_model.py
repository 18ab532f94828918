"""Our Llama-family model and loader against Hugging Face transformers on the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from cascade_rag.models import loader
from cascade_rag.models.config import ModelConfig
from cascade_rag.models.llama import LlamaForCausalLM, compute_inv_freq
from cascade_rag.models.loader import LoadedModel, convert_gguf, load_model

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # medium band within head_dim 16's wavelengths
}
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, head_dim=16, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **TINY, head_dim=16, rope_parameters=LLAMA3_ROPE
    ),
    "llama_attention_bias": lambda: transformers.LlamaConfig(
        **TINY, head_dim=24, attention_bias=True
    ),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, rope_theta=1000000.0),
}


class DenseCausalAttention:
    """Test backend: plain causal softmax attention per sequence; ignores the KV caches.

    `seq_lens` splits the flat token batch into sequences (one sequence if None).
    """

    def __init__(self, seq_lens: list[int] | None = None) -> None:
        self.seq_lens = seq_lens

    def plan(self, metadata) -> None:
        pass

    def forward(self, q, k, v, k_cache, v_cache):
        # q: [num_tokens, num_qo_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        seq_lens = self.seq_lens or [q.shape[0]]
        assert sum(seq_lens) == q.shape[0]
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        outs = []
        for qs, ks, vs in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True):
            n = qs.shape[0]
            scores = torch.einsum("qhd,khd->hqk", qs, ks) * qs.shape[-1] ** -0.5
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", probs, vs))
        return torch.cat(outs)


def _hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    hf_config = HF_CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that they are tested too
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def _no_caches(config: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty(0), torch.empty(0)) for _ in range(config.num_layers)]


def _ours(hf_model) -> LlamaForCausalLM:
    config = ModelConfig.from_hf(hf_model.config)
    return LlamaForCausalLM.from_state_dict(config, hf_model.state_dict())


def _our_logits(model, input_ids, positions, attn) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(input_ids, positions, _no_caches(model.config), attn)
        return model.compute_logits(hidden)


def _hf_logits(hf_model, input_ids, positions) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(input_ids[None], position_ids=positions[None]).logits[0].float()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    err = (ours - ref).abs()
    assert err.max() <= atol, f"{what}: max err {err.max():.3e}, mean err {err.mean():.3e}"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("offset", [0, 37])
def test_logits_match_transformers(name, offset):
    hf_model = _hf_model(name)
    model = _ours(hf_model)
    torch.manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (23,))
    positions = torch.arange(23) + offset  # e.g. a chunk that starts mid-request
    ours = _our_logits(model, input_ids, positions, DenseCausalAttention())
    ref = _hf_logits(hf_model, input_ids, positions)
    _assert_close(ours, ref, 1e-5, f"{name} offset {offset}")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_ragged_batch_matches_per_sequence(name):
    hf_model = _hf_model(name, seed=3)
    model = _ours(hf_model)
    torch.manual_seed(4)
    seq_lens = [5, 1, 11]
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in seq_lens]
    input_ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    ours = _our_logits(model, input_ids, positions, DenseCausalAttention(seq_lens))
    for i, (seq, rows) in enumerate(zip(seqs, ours.split(seq_lens), strict=True)):
        ref = _hf_logits(hf_model, seq, torch.arange(len(seq)))
        _assert_close(rows, ref, 1e-5, f"{name} sequence {i}")


def test_parameter_names_equal_hf():
    for name in HF_CONFIGS:
        hf_model = _hf_model(name)
        ours = LlamaForCausalLM(ModelConfig.from_hf(hf_model.config))
        assert set(ours.state_dict()) == set(hf_model.state_dict()), name


def test_inv_freq_bitwise_equal_transformers():
    for name in ("llama", "llama3_rope", "qwen3"):
        hf_model = _hf_model(name)
        ours = compute_inv_freq(ModelConfig.from_hf(hf_model.config))
        assert torch.equal(ours, hf_model.model.rotary_emb.inv_freq), name


def test_inv_freq_stays_float32_on_cast():
    model = _ours(_hf_model("llama3_rope")).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, compute_inv_freq(model.config))


def test_tied_lm_head_shares_embedding():
    model = _ours(_hf_model("llama"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = _ours(_hf_model("qwen3"))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_forward_rejects_bad_shapes():
    model = _ours(_hf_model("llama"))
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_tokens"):
        model(ids[None], torch.arange(4)[None], _no_caches(model.config), DenseCausalAttention())
    with pytest.raises(ValueError, match="per layer"):
        model(ids, torch.arange(4), [], DenseCausalAttention())


# ---- ModelConfig.from_hf ----


def test_from_hf_legacy_and_v5_rope_fields_agree():
    legacy = {
        "model_type": "llama",
        **TINY,
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
        "eos_token_id": [5, 7],
    }
    v5 = transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE, eos_token_id=[5, 7])
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 8.0
    assert a.eos_token_ids == [5, 7]
    assert a.head_dim == 16  # hidden_size // num_attention_heads when absent
    assert ModelConfig.from_hf(v5.to_dict()) == b


def test_from_hf_architecture_flags():
    qwen2 = ModelConfig.from_hf(HF_CONFIGS["qwen2"]())
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = ModelConfig.from_hf(HF_CONFIGS["qwen3"]())
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
    assert qwen3.rope_theta == 1000000.0
    llama = ModelConfig.from_hf({"model_type": "llama", **TINY})
    assert llama.rope_theta == 10000.0 and llama.rope_scaling is None
    assert llama.max_position_embeddings == 256


@pytest.mark.parametrize(
    "hf_config, match",
    [
        ({"model_type": "mistral", **TINY}, "mistral"),
        ({"model_type": "llama", **TINY, "hidden_act": "gelu"}, "gelu"),
        ({"model_type": "llama", **TINY, "mlp_bias": True}, "mlp_bias"),
        (
            {"model_type": "llama", **TINY, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
            "yarn",
        ),
        (
            {
                "model_type": "qwen2",
                **TINY,
                "use_sliding_window": True,
                "sliding_window": 16,
                "max_window_layers": 1,
            },
            "sliding",
        ),
    ],
)
def test_from_hf_rejects_unsupported(hf_config, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(hf_config)


def test_model_config_validates():
    base = dict(
        architecture="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    ModelConfig(**base)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(**{**base, "architecture": "gpt2"})
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(**{**base, "head_dim": 15})
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig(**{**base, "rope_scaling": {"factor": 8.0}})


# ---- loader ----


@pytest.fixture(autouse=True)
def _own_cache_dir(request, tmp_path_factory, monkeypatch):
    """Loader tests write digests and conversions to a fresh cache, not the user's; tests of
    the real default model keep the normal cache (its conversion takes ~30 s)."""
    if "default_model" not in request.fixturenames:
        monkeypatch.setenv("CASCADE_RAG_CACHE", str(tmp_path_factory.mktemp("cache")))


def _save_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        folder
    )


def _saved_hf_folder(tmp_path: Path, name: str, **save_kwargs) -> tuple[object, Path]:
    hf_model = _hf_model(name)
    folder = tmp_path / name
    hf_model.save_pretrained(folder, **save_kwargs)
    _save_tiny_tokenizer(folder)
    return hf_model, folder


def _check_loaded(lm: LoadedModel, hf_model) -> None:
    torch.manual_seed(2)
    input_ids = torch.randint(0, TINY["vocab_size"], (9,))
    positions = torch.arange(9)
    ours = _our_logits(lm.model, input_ids, positions, DenseCausalAttention())
    _assert_close(ours, _hf_logits(hf_model, input_ids, positions), 1e-5, "loaded model")
    assert lm.config == ModelConfig.from_hf(hf_model.config)
    assert lm.tokenizer("a b").input_ids == [1, 2]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_load_model_from_folder(tmp_path, name):
    hf_model, folder = _saved_hf_folder(tmp_path, name)
    lm = load_model(folder)
    _check_loaded(lm, hf_model)
    assert lm.model_dir == folder
    assert lm.model_id.startswith(f"{name}@")
    assert load_model(str(folder)).model_id == lm.model_id  # stable


def test_load_model_sharded_folder(tmp_path):
    hf_model, folder = _saved_hf_folder(tmp_path, "qwen2", max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    _check_loaded(load_model(folder), hf_model)


def test_load_model_single_safetensors_file(tmp_path):
    hf_model, folder = _saved_hf_folder(tmp_path, "llama3_rope")
    lm = load_model(folder / "model.safetensors")
    _check_loaded(lm, hf_model)
    assert lm.model_dir == folder


def test_load_model_dtype(tmp_path):
    _, folder = _saved_hf_folder(tmp_path, "llama")
    lm = load_model(folder, dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16
    hidden = lm.model(
        torch.arange(4), torch.arange(4), _no_caches(lm.config), DenseCausalAttention()
    )
    assert hidden.dtype == torch.bfloat16
    assert lm.model.compute_logits(hidden).dtype == torch.float32


def test_model_id_follows_content_not_file_times(tmp_path):
    _, folder = _saved_hf_folder(tmp_path, "llama")
    weights = folder / "model.safetensors"
    before = load_model(folder).model_id
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_model(folder).model_id == before  # touched, not changed
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    after_weights = load_model(folder).model_id
    assert after_weights != before
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).model_id != after_weights


def test_load_model_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"unknown model format.*weights\.bin"):
        load_model(odd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(empty)
    _, folder = _saved_hf_folder(tmp_path, "llama")
    (folder / "config.json").rename(folder / "config.json.bak")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(folder)
    (folder / "config.json.bak").rename(folder / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(folder)


def test_from_state_dict_rejects_mismatch():
    hf_model = _hf_model("llama")
    config = ModelConfig.from_hf(hf_model.config)
    sd = dict(hf_model.state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        LlamaForCausalLM.from_state_dict(config, sd)
    sd = dict(hf_model.state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        LlamaForCausalLM.from_state_dict(config, sd)


# ---- gguf conversion cache (converter faked; the real one runs in test_default_model) ----


def _fake_gguf(tmp_path: Path) -> Path:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_gguf_cache_converts_once(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(loader, "_convert_gguf_to_folder", fake_convert)
    gguf = _fake_gguf(tmp_path)
    first = convert_gguf(gguf, tmp_path / "cache")
    assert convert_gguf(gguf, tmp_path / "cache") == first
    assert len(calls) == 1 and (first / "config.json").is_file()
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert convert_gguf(gguf, tmp_path / "cache") == first  # keyed by content, not mtime
    gguf.write_bytes(b"GGUF, changed")
    assert convert_gguf(gguf, tmp_path / "cache") != first
    assert len(calls) == 2


def test_gguf_cache_crash_leaves_no_entry(tmp_path, monkeypatch):
    def crashing_convert(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(loader, "_convert_gguf_to_folder", crashing_convert)
    gguf = _fake_gguf(tmp_path)
    models_dir = tmp_path / "cache" / "models"
    with pytest.raises(RuntimeError, match="crashed"):
        convert_gguf(gguf, tmp_path / "cache")
    assert [p for p in models_dir.iterdir() if p.is_dir()] == []
    # a temp folder left by a killed process is removed by the next conversion
    digest = loader.file_sha256(gguf, tmp_path / "cache")
    stale = models_dir / f".tiny-{digest[:16]}-v1.tmp-dead"
    stale.mkdir()
    monkeypatch.setattr(
        loader, "_convert_gguf_to_folder", lambda g, out: (out / "config.json").write_text("{}")
    )
    target = convert_gguf(gguf, tmp_path / "cache")
    assert not stale.exists()
    assert [p for p in models_dir.iterdir() if p.is_dir()] == [target]


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_RAG_CACHE", str(tmp_path / "c"))
    assert loader.default_cache_dir() == tmp_path / "c"


# ---- the real default model (SmolLM2-135M-Instruct) ----


def test_default_model_matches_transformers(default_model):
    lm = default_model
    assert lm.config.architecture == "llama" and lm.config.num_layers == 30
    assert (lm.config.num_qo_heads, lm.config.num_kv_heads, lm.config.head_dim) == (9, 3, 64)
    messages = [
        {"role": "system", "content": "Answer from the context. Context: Paris is in France."},
        {"role": "user", "content": "Which country is Paris in?"},
    ]
    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, list):  # transformers 5 may return a BatchEncoding
        prompt = prompt["input_ids"]
    input_ids = torch.tensor(prompt)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        lm.model_dir, dtype=torch.float32
    ).eval()

    positions = torch.arange(len(input_ids))
    ours = _our_logits(lm.model, input_ids, positions, DenseCausalAttention())
    ref = _hf_logits(hf_model, input_ids, positions)
    _assert_close(ours, ref, 1e-3, "SmolLM2 prompt logits")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    # greedy, recomputing the whole sequence each step, must equal HF's generate token for token
    max_new = 12
    ids = input_ids
    for _ in range(max_new):
        logits = _our_logits(lm.model, ids, torch.arange(len(ids)), DenseCausalAttention())
        ids = torch.cat([ids, logits[-1].argmax()[None]])
        if int(ids[-1]) in lm.config.eos_token_ids:
            break
    with torch.inference_mode():
        ref_ids = hf_model.generate(input_ids[None], max_new_tokens=max_new, do_sample=False)[0]
    answer = lm.tokenizer.decode(ids[len(input_ids) :])
    assert ids.tolist() == ref_ids.tolist(), answer
    assert "France" in answer


@pytest.mark.parametrize(
    "arch,extra",
    [("llama", {}), ("qwen2", dict(attention_bias=True)), ("qwen3", dict(qk_norm=True))],
)
def test_fused_gpu_path_matches_reference_ops(arch, extra):
    """fuse_for_speed (used with the FlashInfer backend) computes the same function."""
    import copy

    cfg = ModelConfig(
        architecture=arch, vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2,
        num_qo_heads=4, num_kv_heads=2, head_dim=16, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    fused = copy.deepcopy(ref)
    fused.fuse_for_speed()
    fused.fuse_for_speed()  # idempotent
    assert fused.model.layers[0].self_attn.qkv_weight is not None
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in ref.parameters())
    ids, pos = torch.randint(0, 100, (9,)), torch.arange(9)
    caches = [(None, None)] * cfg.num_layers
    a = ref(ids, pos, caches, DenseCausalAttention())
    b = fused(ids, pos, caches, DenseCausalAttention())
    err = (a - b).abs()
    assert err.max() < 1e-5, f"max {err.max():.3g} mean {err.mean():.3g}"
