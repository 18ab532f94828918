"""The disk store of chunk KV: round trips, verification of every field, atomic writes, the
LRU byte budget, and an engine that restarts on a store (same outputs, chunks served from disk,
bad entries computed instead, a full disk or another model's store refused clearly)."""

from __future__ import annotations

import errno
import json
import random

import pytest
import torch

from cascade_rag.chunks import ChunkRegistry, ChunkType
from cascade_rag.engine import kv_store as kv_store_module
from cascade_rag.engine.kv_store import ChunkKVStore, KVStoreError, StoreIdentity
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.testing import save_random_llama

IDENT = StoreIdentity("digest-a", "float32", num_layers=2, num_kv_heads=3, head_dim=4)


def chunk_of(registry: ChunkRegistry, n: int, seed: int):
    rng = random.Random(seed)
    return registry.register([rng.randrange(1000) for _ in range(n)])


def kv_for(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, 4, generator=gen), torch.randn(2, n, 3, 4, generator=gen)


@pytest.fixture
def registry():
    return ChunkRegistry("fake-model|fake-tokenizer")


def test_round_trip_and_misses(tmp_path, registry):
    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    chunk = chunk_of(registry, 7, 0)
    k, v = kv_for(7)
    assert store.load(("sys",), chunk, 10) is None
    size = store.save(("sys",), chunk, 10, k, v)
    assert size > 0 and store.contains(("sys",), chunk)
    got_k, got_v = store.load(("sys",), chunk, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert store.load((), chunk, 10) is None  # another context is another entry
    stats = store.stats()
    assert (stats.entries, stats.loads, stats.misses, stats.saves) == (1, 1, 2, 1)
    assert not list((tmp_path / "kv").rglob("*.tmp")), "no temporary file is left"
    # reopening the folder with the same identity keeps the entries
    again = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    assert again.load(("sys",), chunk, 10) is not None


@pytest.mark.parametrize(
    "field, value", [("model_digest", "digest-b"), ("dtype", "bfloat16"), ("head_dim", 8)]
)
def test_a_store_of_another_identity_is_refused(tmp_path, field, value):
    ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    other = StoreIdentity(**{**IDENT.__dict__, field: value})
    with pytest.raises(ValueError, match=f"made for another {field}.*use another kv_store_dir"):
        ChunkKVStore(tmp_path / "kv", other, max_bytes=2**20)


def test_bad_shapes_and_dtypes_are_refused(tmp_path, registry):
    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    chunk = chunk_of(registry, 5, 0)
    k, v = kv_for(5)
    with pytest.raises(KVStoreError, match="must be"):
        store.save((), chunk, 0, k[:, :4], v[:, :4])
    with pytest.raises(KVStoreError, match="the store holds float32"):
        store.save((), chunk, 0, k.double(), v.double())
    assert store.stats().entries == 0


def _entry_files(store: ChunkKVStore, context, chunk):
    key = store.key(context, chunk.id)
    return store.entries_dir / f"{key}.safetensors", store.entries_dir / f"{key}.json"


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest-json", "manifest-start"])
def test_damaged_entries_do_not_verify(tmp_path, registry, damage):
    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    chunk = chunk_of(registry, 6, 1)
    store.save(("sys",), chunk, 3, *kv_for(6))
    data_path, manifest_path = _entry_files(store, ("sys",), chunk)
    if damage == "flip":
        data = bytearray(data_path.read_bytes())
        data[-5] ^= 0xFF
        data_path.write_bytes(bytes(data))
        match = "sha256 does not match"
    elif damage == "truncate":
        data_path.write_bytes(data_path.read_bytes()[:-10])
        match = "truncated or replaced"
    elif damage == "manifest-json":
        manifest_path.write_text("{not json")
        match = "not valid JSON"
    else:
        m = json.loads(manifest_path.read_text())
        m["start"] = 4
        manifest_path.write_text(json.dumps(m))
        match = "manifest start is 4, expected 3"
    with pytest.raises(KVStoreError, match=match):
        store.load(("sys",), chunk, 3)
    assert store.stats().errors == 1


def test_other_token_ids_with_a_consistent_file_do_not_verify(tmp_path, registry):
    """A forged entry whose file and checksum agree but holds another chunk's tokens."""
    from safetensors.torch import save

    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    chunk = chunk_of(registry, 4, 2)
    store.save((), chunk, 0, *kv_for(4))
    data_path, manifest_path = _entry_files(store, (), chunk)
    k, v = kv_for(4)
    data = save({"k": k, "v": v, "token_ids": torch.tensor([1, 2, 3, 4])})
    data_path.write_bytes(data)
    m = json.loads(manifest_path.read_text())
    m["data_bytes"] = len(data)
    m["data_sha256"] = __import__("hashlib").sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(KVStoreError, match="token ids are not the chunk's"):
        store.load((), chunk, 0)


def test_byte_budget_evicts_least_recently_used(tmp_path, registry):
    chunks = [chunk_of(registry, 8, s) for s in range(4)]
    probe = ChunkKVStore(tmp_path / "probe", IDENT, max_bytes=2**20)
    one = probe.save((), chunks[0], 0, *kv_for(8))
    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=3 * one + one // 2)
    for i, c in enumerate(chunks[:3]):
        store.save((), c, 0, *kv_for(8, i))
    import os
    import time

    now = time.time()
    for i, c in enumerate(chunks[:3]):  # deterministic recency: 0 oldest ... 2 newest
        os.utime(_entry_files(store, (), c)[1], (now - 100 + i, now - 100 + i))
    assert store.load((), chunks[0], 0) is not None  # 0 becomes the most recently used
    store.save((), chunks[3], 0, *kv_for(8, 3))
    assert store.contains((), chunks[0]) and not store.contains((), chunks[1])
    assert store.contains((), chunks[2]) and store.contains((), chunks[3])
    assert store.stats().evictions == 1 and store.stats().bytes <= store.max_bytes
    tiny = ChunkKVStore(tmp_path / "tiny", IDENT, max_bytes=100)
    with pytest.raises(KVStoreError, match="more than the store's whole budget"):
        tiny.save((), chunks[0], 0, *kv_for(8))


def test_a_full_disk_leaves_nothing_behind(tmp_path, registry, monkeypatch):
    store = ChunkKVStore(tmp_path / "kv", IDENT, max_bytes=2**20)
    chunk = chunk_of(registry, 5, 3)
    real = kv_store_module._atomic_write

    def full(path, data):
        if path.suffix == ".json":  # the tensor file made it, the manifest does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(kv_store_module, "_atomic_write", full)
    with pytest.raises(KVStoreError, match="No space left on device"):
        store.save((), chunk, 0, *kv_for(5))
    assert not list(store.entries_dir.iterdir()), "no partial entry"
    assert store.load((), chunk, 0) is None


# ---- an engine restarting on a store ------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_random_llama(
        tmp_path_factory.mktemp("store") / "llama",
        dtype=torch.float32,
        lm_head_scale=30.0,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )


def _prompts(engine, rng_seed: int = 0):
    rng = random.Random(rng_seed)
    vocab = engine.model_config.vocab_size

    def ids(n):
        return [rng.randrange(1, vocab) for _ in range(n)]

    system = engine.register_token_chunk(ids(12), ChunkType.SYSTEM_PROMPT)
    docs = [engine.register_token_chunk(ids(n)) for n in (20, 9, 31)]
    orders = ([0, 1], [2, 0, 1], [1, 2])
    return [PreparedPrompt((system, *(docs[i] for i in o)), tuple(ids(3))) for o in orders]


def test_engine_restart_serves_chunks_from_disk(llama_folder, tmp_path, caplog):
    options = dict(
        kv_cache_tokens=2048,
        page_size=8,
        chunk_reuse="anywhere",
        recompute_tokens=4,
        kv_store_dir=str(tmp_path / "kv"),
    )
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with CascadeEngine(str(llama_folder), **options) as first:
        prompts = _prompts(first)
        cold = [first.generate(p, params) for p in prompts]
        assert first._core.store.stats().entries == 4  # system prompt and three documents
    with CascadeEngine(str(llama_folder), **options) as second:  # a restart
        prompts = _prompts(second)
        warm = [second.generate(p, params) for p in prompts]
        stats = second.stats()
        assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
        assert stats.kv_cache.disk_hit_tokens == 12 + 20 + 9 + 31
        assert warm[0].usage.cached_tokens == 12 + 20 + 9 - 4
        assert stats.computed_prompt_tokens < sum(len(p.token_ids) for p in prompts) // 2
    # a damaged entry is computed instead (same output), the others still load
    store = ChunkKVStore(tmp_path / "kv", second._core.store.identity, max_bytes=2**30)
    system, doc0 = prompts[0].chunks[0], prompts[0].chunks[1]
    data_path = store.entries_dir / f"{store.key((system.id,), doc0.id)}.safetensors"
    data = bytearray(data_path.read_bytes())
    data[-3] ^= 0x55
    data_path.write_bytes(bytes(data))
    with CascadeEngine(str(llama_folder), **options) as third:
        prompts = _prompts(third)
        again = [third.generate(p, params) for p in prompts]
        assert [o.token_ids for o in again] == [o.token_ids for o in cold]
        assert third.stats().kv_cache.disk_hit_tokens == 12 + 9 + 31
    assert "not loaded from the KV store" in caplog.text and "sha256" in caplog.text


def test_engine_keeps_serving_when_the_store_cannot_write(llama_folder, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise KVStoreError("writing its KV failed: [Errno 28] No space left on device")

    monkeypatch.setattr(ChunkKVStore, "save", full)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with CascadeEngine(
        str(llama_folder),
        kv_cache_tokens=2048,
        chunk_reuse="anywhere",
        kv_store_dir=str(tmp_path / "kv"),
    ) as engine:
        prompts = _prompts(engine)
        outs = engine.generate(prompts, params)
        assert all(len(o.token_ids) == 4 for o in outs)
        assert engine.stats().kv_cache.num_nodes == 4  # the in-memory cache is unaffected


def test_engine_refuses_a_store_of_another_model(llama_folder, tmp_path):
    root = tmp_path / "kv"
    ChunkKVStore(root, StoreIdentity("another-model", "float32", 3, 2, 16), max_bytes=2**20)
    with pytest.raises(ValueError, match="made for another model_digest"):
        CascadeEngine(
            str(llama_folder), kv_cache_tokens=2048, chunk_reuse="anywhere", kv_store_dir=root
        )


def test_store_needs_reuse_anywhere():
    from cascade_rag.config import EngineConfig

    with pytest.raises(ValueError, match="only chunk_reuse='anywhere' uses"):
        EngineConfig(kv_store_dir="kv")
    with pytest.raises(TypeError, match="kv_store_dir must be a path"):
        EngineConfig(chunk_reuse="anywhere", kv_store_dir=3)
    with pytest.raises(ValueError, match="kv_store_bytes=0 is out of range"):
        EngineConfig(chunk_reuse="anywhere", kv_store_dir="kv", kv_store_bytes=0)
