"""The embedder is identified by the content of its model files, not its folder's name.

The identity function is tested on small folders; one test loads the real all-MiniLM-L6-v2
twice, from two folders of the same name whose weights differ, and checks that an index built
with one refuses to load with the other.
"""

from __future__ import annotations

import os
import shutil

import pytest

from cascade_rag.chunks import ChunkRegistry, ChunkType
from cascade_rag.retrieval import DocumentIndex, Embedder, Passage
from cascade_rag.retrieval import embedder as embedder_module
from cascade_rag.retrieval.embedder import default_embedder_path, model_folder_identity


def model_folder(path, weights: bytes = b"weights-1"):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return path


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed by model_folder_identity, in order."""
    calls = []
    real = embedder_module._file_sha256

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(embedder_module, "_file_sha256", counting)
    return calls


def test_identity_comes_from_content_not_the_folder_name(tmp_path, hashed):
    cache = tmp_path / "cache"
    a = model_folder(tmp_path / "a" / "all-MiniLM-L6-v2")
    b = model_folder(tmp_path / "b" / "all-MiniLM-L6-v2", weights=b"weights-2")
    copy = model_folder(tmp_path / "elsewhere" / "renamed")
    ids = {name: model_folder_identity(p, cache) for name, p in (("a", a), ("b", b), ("c", copy))}
    assert ids["a"] != ids["b"]  # same folder name, other weights
    assert ids["a"] == ids["c"]  # same files, another name and place
    assert ids["a"].startswith("sha256:") and len(ids["a"]) == len("sha256:") + 32

    (a / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert model_folder_identity(a, cache) != ids["a"]  # configs count, not only weights


def test_identity_is_cached_by_size_and_mtime_and_ignores_what_is_not_loaded(tmp_path, hashed):
    cache = tmp_path / "cache"
    a = model_folder(tmp_path / "model")
    first = model_folder_identity(a, cache)
    assert sorted(hashed) == ["config.json", "config.json", "model.safetensors"]
    hashed.clear()
    assert model_folder_identity(a, cache) == first and hashed == []  # from the sidecar

    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_folder_identity(a, cache) == first  # rehashed: same content, same identity
    assert hashed == ["model.safetensors"]

    hashed.clear()
    (a / "README.md").write_text("a model card")
    (a / ".cache").mkdir()
    (a / ".cache" / "download.lock").write_text("x")
    (a / "onnx").mkdir()
    (a / "onnx" / "model.onnx").write_bytes(b"another backend's copy")
    assert model_folder_identity(a, cache) == first and hashed == []

    unwritable = tmp_path / "a-file"  # a cache dir that cannot be created: hash every time
    unwritable.write_text("")
    assert model_folder_identity(a, unwritable) == first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no model files"):
        model_folder_identity(empty, cache)


class ByteEngine:
    def __init__(self) -> None:
        self.registry = ChunkRegistry("byte-model|bytes:256")

    def register_chunk(self, text, type=ChunkType.RAG_RESULT, metadata=None):
        return self.registry.register(list(text.encode()), type=type, text=text, metadata=metadata)


def test_an_index_refuses_another_model_of_the_same_name(tmp_path):
    from safetensors.torch import load_file, save_file

    source = default_embedder_path()
    a, b = tmp_path / "a" / source.name, tmp_path / "b" / source.name
    shutil.copytree(source, a)
    shutil.copytree(source, b)
    weights = load_file(b / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] * 1.5  # another model: same name, shapes and configs
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})

    cache = tmp_path / "cache"
    one, other = Embedder(a, cache_dir=cache), Embedder(b, cache_dir=cache)
    assert one.name == other.name == "model"
    assert one.identity != other.identity
    assert one.identity == Embedder(cache_dir=cache).identity  # the bundled files, copied

    engine = ByteEngine()
    index = DocumentIndex(engine, one)
    index.add_passages([Passage("The ferry leaves at noon.", "a.txt")], show_progress=False)
    index.save(tmp_path / "idx")
    assert len(DocumentIndex.load(tmp_path / "idx", engine, one)) == 1
    with pytest.raises(ValueError, match="another model under the same name") as info:
        DocumentIndex.load(tmp_path / "idx", engine, other)
    assert one.identity in str(info.value) and other.identity in str(info.value)
