"""Checks on a checkpoint directory that need no torch: run before any weight loads.

The official LLaDA-V layout (Hugging Face `save_pretrained` of `LlavaLLaDAModelLM`):
config.json (model_type `llava_llada`), model.safetensors or sharded
model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json, tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    pass


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
    return cfg


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist (index-sharded or single)."""
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
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
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
