"""Tiny LLaDA-V checkpoints in the exact official layout, for tests and the CPU default.

`write_checkpoint(out_dir, spec, seed)` builds an `LLaDAV` with random weights from a fixed
seed, saves it the way the released checkpoint is laid out (config.json with
model_type `llava_llada`, sharded safetensors + model.safetensors.index.json with official
key names, the vision-tower folder config, an offline-built tokenizer carrying the official
special ids) and `LLaDAV.from_pretrained` loads it back through the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

# LLaDA-V-shaped but small. Visual-token counts stay real (384-px views, 27x27 patches).
DEFAULT_SPEC = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=128, vocab_size=126464,
    vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_intermediate_size=64,
    image_size=384, patch_size=14, max_shard_size="16MB",
)
TOWER_DIR = "siglip_tiny_patch14_384"


def spec_hash(spec: dict, seed: int) -> str:
    blob = json.dumps({"spec": spec, "seed": seed, "v": 1}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def official_config(spec: dict) -> dict:
    s = {**DEFAULT_SPEC, **spec}
    S = s["image_size"]
    return {
        "architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada",
        "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"], "vocab_size": s["vocab_size"],
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
        "attention_bias": False, "tie_word_embeddings": False, "max_position_embeddings": 16384,
        "bos_token_id": 126080, "eos_token_id": 126081, "use_cache": False, "torch_dtype": "float32",
        "mm_hidden_size": s["vision_hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": TOWER_DIR, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_4",
        "image_grid_pinpoints": [[S * i, S * j] for i in range(1, 7) for j in range(1, 7)],
        "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear",
        "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "use_mm_proj": True,
    }


def tower_config(spec: dict) -> dict:
    s = {**DEFAULT_SPEC, **spec}
    return {
        "architectures": ["SigLipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": s["vision_hidden_size"], "intermediate_size": s["vision_intermediate_size"],
        # The official tower drops its last layer at load: the folder holds one more.
        "num_hidden_layers": s["vision_layers"] + 1, "num_attention_heads": s["vision_heads"],
        "image_size": s["image_size"], "patch_size": s["patch_size"], "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "num_channels": 3, "image_mean": [0.5, 0.5, 0.5],
    }


def _init_(model, seed: int) -> None:
    """Deterministic init (the golden checkpoint's recipe): peaky attention so that different
    masked slots predict different tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                val = 0.1 * n
            elif "norm" in name and p.dim() == 1:
                val = 1 + 0.2 * n
            elif name in ("embed_tokens.weight", "image_newline"):
                val = n
            elif "position_embedding" in name:
                val = 0.5 * n
            elif name == "lm_head.weight":
                val = 2 * n / math.sqrt(p.shape[1])
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                scale = 3.0 if ("self_attn" in name and not name.startswith("vision_tower")) else 1.0
                val = scale * n / math.sqrt(fan_in)
            p.copy_(val)


def build_model(spec: dict | None = None, seed: int = 0, init: str = "peaky"):
    """An `LLaDAV` of the given dims: init "peaky" (the golden checkpoint's recipe) or
    "train" (PyTorch / transformers default init under `seed`, for training)."""
    import torch
    from transformers import SiglipVisionConfig

    from dvlm_exp.models.llada_v import LLaDAV

    spec = {**DEFAULT_SPEC, **(spec or {})}
    tc = tower_config(spec)
    vcfg = SiglipVisionConfig(**{k: v for k, v in tc.items() if k not in ("architectures", "model_type", "image_mean")},
                              vision_use_head=False)
    vcfg.num_hidden_layers = spec["vision_layers"]
    torch.manual_seed(seed)
    model = LLaDAV(official_config(spec), vcfg)
    if init == "peaky":
        _init_(model, seed)
    elif init != "train":
        raise ValueError(f"init must be 'peaky' or 'train', got {init!r}")
    return model


def write_checkpoint(out_dir: str | Path, spec: dict | None = None, seed: int = 0, model=None,
                     tokenizer_dir: str | Path | None = None, meta: dict | None = None) -> Path:
    """Write a tiny LLaDA-V checkpoint in the official layout (atomically): random weights from
    `seed`, or the given (trained) `model`; the tokenizer is built offline, or copied from
    `tokenizer_dir`; `meta` goes into dvlm_tiny.json."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from dvlm_exp.models.llada_v import ours_to_official
    from dvlm_exp.models.tokenizer_tiny import build_llada_tokenizer

    spec = {**DEFAULT_SPEC, **(spec or {})}
    out_dir = Path(out_dir)
    cfg = official_config(spec)
    tc = tower_config(spec)
    if model is None:
        model = build_model(spec, seed)
    state = {ours_to_official(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if tokenizer_dir is not None:  # e.g. a compact tokenizer: its special ids are the truth
        from transformers import PreTrainedTokenizerFast

        from dvlm_exp.models.tokenizer_tiny import special_ids_from_tokenizer

        ids = special_ids_from_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)))
        cfg.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=spec["max_shard_size"])
        for fname, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
        (tmp / TOWER_DIR).mkdir()
        (tmp / TOWER_DIR / "config.json").write_text(json.dumps(tc, indent=2))
        if tokenizer_dir is None:
            build_llada_tokenizer(tmp, vocab_size=spec["vocab_size"])
        else:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
        (tmp / "dvlm_tiny.json").write_text(json.dumps({"spec": spec, "seed": seed, **(meta or {})}, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_checkpoint(cache_dir: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    """The tiny checkpoint for (spec, seed) under cache_dir, written once and reused."""
    spec = {**DEFAULT_SPEC, **(spec or {})}
    path = Path(cache_dir) / f"tiny-{spec_hash(spec, seed)}"
    if not (path / "dvlm_tiny.json").is_file():
        write_checkpoint(path, spec, seed)
    return path
