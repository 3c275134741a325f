"""Checks on a checkpoint directory that need no torch: run before any weight loads.

`model.path` is a local directory or a Hugging Face hub id (`GSAI-ML/LLaDA-V`) already in the
local HF cache: `resolve_hub_id` finds its snapshot offline (`huggingface_hub.snapshot_download(...,
local_files_only=True)`, which follows refs/main in HF_HUB_CACHE / HF_HOME as `from_pretrained`
does), before any check below; an id not in the cache fails with the `hf download` command.

The official LLaDA-V layout (Hugging Face `save_pretrained` of `LlavaLLaDAModelLM`):
config.json (model_type `llava_llada`), model.safetensors or sharded
model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json, tokenizer files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# config.json model_type -> the model= configs that load it (dvlm_exp implements each itself)
MODEL_CONFIGS = {"llava_llada": "model=llada_v (LLaDA-V) or model=lavida_llada (LaViDa-LLaDA)",
                 "llava_dream": "model=lavida_dream", "llava": "model=llava_1_5", "llava_next": "model=llava_next"}
# safetensors dtype -> bytes per element (the format's spec); others are not size-checked
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER = 100_000_000  # safetensors refuses headers above 100 MB


class CheckpointError(ValueError):
    pass


def is_hub_id(path: str) -> bool:
    """`org/name` as the hub spells a model repo id (huggingface_hub.utils.validate_repo_id), and not
    an existing file or folder: a local path always wins, as in `from_pretrained`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    s = str(path)
    if s.count("/") != 1 or s.startswith((".", "~")) or Path(s).expanduser().exists():
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def resolve_hub_id(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The cached snapshot folder of hub model `repo_id` (its refs/main), offline, from `cache_dir`
    (default: the hub's own, HF_HUB_CACHE / HF_HOME); a `CheckpointError` giving the download
    command when the cache does not hold it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="model", cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"model.path={repo_id} is not a local directory, and the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            f"does not hold the hub model {repo_id}: download it on a machine with internet with "
            f"`hf download {repo_id}` (into that cache: HF_HUB_CACHE / HF_HOME choose it; model.path={repo_id} then "
            f"resolves offline), or point model.path at a local copy of the checkpoint"
        ) from e


def read_config(path: str | Path, model_type: str | tuple[str, ...]) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"model.path={path} is not a directory. Download the checkpoint (e.g. "
            f"`huggingface-cli download GSAI-ML/LLaDA-V --local-dir {path}`) on a machine with "
            f"internet, or point model.path at an existing copy."
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: model.path must hold a Hugging Face checkpoint (config.json + safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} is not a JSON object: re-download the checkpoint's config.json")
    types = (model_type,) if isinstance(model_type, str) else model_type
    if cfg.get("model_type") not in types:
        raise CheckpointError(
            f"{cfg_file} has model_type={cfg.get('model_type')!r}, expected {' or '.join(map(repr, types))}: "
            f"model.path points at a different model family than model={types[0]}"
        )
    if "auto_map" in cfg:  # transformers would import the checkpoint's own .py files (trust_remote_code)
        amap = cfg["auto_map"]
        names = ", ".join(map(str, amap)) if isinstance(amap, dict) else repr(amap)
        use = MODEL_CONFIGS.get(str(cfg.get("model_type")), f"the model= config of model_type {cfg.get('model_type')!r}")
        raise CheckpointError(
            f"{cfg_file} has \"auto_map\" ({names}): it asks to run the checkpoint's own Python code "
            f"(trust_remote_code), and dvlm_exp never runs remote code. Its own loader for model_type "
            f"{cfg.get('model_type')!r} is {use}: delete the \"auto_map\" key from config.json (the .py files "
            f"may stay; nothing imports them), or point model.path at a copy without it"
        )
    return cfg


def local_dir(path: str | Path) -> Path:
    """The folder a model path names: a hub id (`is_hub_id`) is its snapshot in the local HF cache
    (`resolve_hub_id`), anything else the path itself. The models' `from_pretrained` start here."""
    return resolve_hub_id(str(path)) if is_hub_id(str(path)) else Path(path)


def check_safetensors(file: str | Path) -> None:
    """A safetensors file's header, read without torch or the safetensors library (8-byte
    little-endian header length, a JSON header of name -> dtype / shape / data_offsets): the file
    must be at least as long as 8 + header length + the largest end offset. Reads the header only."""
    file = Path(file)
    size = file.stat().st_size
    redo = "re-download it (or copy it again from the original checkpoint)"
    if size < 8:
        raise CheckpointError(f"{file} is truncated: {size} bytes, less than a safetensors header length; {redo}")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise CheckpointError(f"{file} is not a safetensors file (its first 8 bytes give a header of {n} bytes); {redo}")
        if size < 8 + n:
            raise CheckpointError(f"{file} is truncated: {size} bytes, header says at least {8 + n}; {redo}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            shape = info["shape"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop) or not isinstance(shape, list):
                raise ValueError(f"{name}: bad data_offsets {info['data_offsets']} or shape {shape}")
            width = DTYPE_BYTES.get(info["dtype"])
            if width is not None:
                count = 1
                for d in shape:
                    count *= int(d)
                if count * width != stop - begin:
                    raise ValueError(f"{name}: {info['dtype']} {shape} needs {count * width} bytes, data_offsets give {stop - begin}")
            end = max(end, stop)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
        raise CheckpointError(f"{file} has a corrupt safetensors header ({type(e).__name__}: {e}); {redo}") from e
    if size < 8 + n + end:
        raise CheckpointError(f"{file} is truncated: {size} bytes, header says {8 + n + end}; {redo}")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist (index-sharded or single) and to be
    complete (`check_safetensors`: headers only, no tensor data is read)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (ValueError, KeyError, TypeError) as e:  # ValueError covers JSONDecodeError
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                                  f"re-download it with the shards") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard(s) listed in {index.name} are missing from {path}: {', '.join(missing)}. "
                f"Re-download the checkpoint."
            )
        files = [path / s for s in shards]
        for f in files:
            check_safetensors(f)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        check_safetensors(single)
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only pickle weights (.bin/.pt); dvlm_exp loads safetensors only")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def check_tokenizer(path: str | Path) -> None:
    path = Path(path)
    missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"tokenizer file(s) {', '.join(missing)} missing in {path}: copy the tokenizer of the "
            f"released checkpoint into model.path"
        )
