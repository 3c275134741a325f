"""Tiny LaViDa checkpoints (LLaDA or Dream backbone) in the official layout, for tests.

`write_lavida_checkpoint(out_dir, backbone, spec, seed)` builds a `LaViDaLLaDA` / `LaViDaDream`
with random weights from a fixed seed and saves it the way the released checkpoints are laid
out: config.json (`llava_llada` with the OLMo-style LLaDA fields, or `llava_dream` with the
Qwen2-style Dream fields, plus the LLaVA fields), sharded safetensors +
model.safetensors.index.json with the official key names (`model.transformer.blocks.*` for
LLaDA, `model.layers.*` with q/k/v biases for Dream), the tower folder config and an
offline tokenizer carrying the model's special tokens at their official ids. The loader
(`from_pretrained`) reads it back through the same path a real checkpoint takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dvlm_exp.models.tiny import TOWER_DIR, _init_, tower_config

BACKBONES = ("llada", "dream")
DEFAULT_SPEC = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
    vision_hidden_size=16, vision_layers=1, vision_heads=2, vision_intermediate_size=32,
    image_size=384, patch_size=14, max_shard_size="8MB",
)
LLADA_VOCAB = 126464
DREAM_VOCAB = 152064

# --------------------------------------------------------------------------- Dream tokenizer
DREAM_BASE_VOCAB = 151643  # Qwen2 byte-level BPE entries; added tokens start here
# Qwen2.5 added tokens 151643..151664 (special flag as released) + Dream's two.
DREAM_ADDED_TOKENS = (
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False), (151665, "<|beginoftext|>", True), (151666, "<|mask|>", True),
)
# Qwen ChatML with the system message given (what conv_dream renders through the Dream tokenizer).
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_dream_tokenizer(out_dir: str | Path, bpe_vocab: int = 2048, seed: int = 0) -> Path:
    """A small byte-level BPE padded with unreachable fillers to Qwen2's 151643 base entries,
    then Dream's added tokens at their official ids (len(tokenizer) == 151667)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dvlm_exp.models.tokenizer_tiny import _train_bpe, synthetic_corpus

    texts = synthetic_corpus(seed) + ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"] * 20
    spec = json.loads(_train_bpe(texts, bpe_vocab).to_str())
    vocab = spec["model"]["vocab"]
    for tid in range(len(vocab), DREAM_BASE_VOCAB):
        vocab[f"<|tiny_unused_{tid}|>"] = tid
    spec["added_tokens"] = [dict(id=tid, content=c, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=sp) for tid, c, sp in DREAM_ADDED_TOKENS]
    backend = Tokenizer.from_str(json.dumps(spec))
    for tid, c, _ in DREAM_ADDED_TOKENS:
        if backend.token_to_id(c) != tid:
            raise RuntimeError(f"{c!r} got id {backend.token_to_id(c)}, expected {tid}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|beginoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token=None, mask_token="<|mask|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], clean_up_tokenization_spaces=False,
        model_max_length=131072, chat_template=DREAM_CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out), save_jinja_files=False)
    return out


# --------------------------------------------------------------------------- configs
def _llava_fields(s: dict) -> dict:
    return {
        "mm_hidden_size": s["vision_hidden_size"], "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": TOWER_DIR,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
        "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2,
        "mm_pooler_ratio": 2, "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "use_mm_proj": True,
    }


def official_config(backbone: str, spec: dict | None = None) -> dict:
    s = {**DEFAULT_SPEC, **(spec or {})}
    if backbone == "llada":
        return {
            "architectures": ["LlavaLladaForMaskedDiffusion"], "model_type": "llava_llada",
            "d_model": s["hidden_size"], "n_heads": s["num_attention_heads"], "n_kv_heads": s["num_key_value_heads"],
            "n_layers": s["num_hidden_layers"], "mlp_hidden_size": s["intermediate_size"], "mlp_ratio": 4,
            "vocab_size": s.get("vocab_size", LLADA_VOCAB), "embedding_size": s.get("vocab_size", LLADA_VOCAB),
            "max_sequence_length": 4096, "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
            "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rms_norm_eps": 1e-5,
            "include_bias": False, "include_qkv_bias": False, "weight_tying": False, "scale_logits": False,
            "alibi": False, "block_group_size": 1, "input_emb_norm": False, "attention_layer_norm": False,
            "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "init_device": "meta",
            "precision": "amp_bf16", "use_cache": False, "torch_dtype": "float32",
            **_llava_fields(s),
        }
    if backbone == "dream":
        return {
            "architectures": ["LlavaDreamForMaskedDiffusion"], "model_type": "llava_dream",
            "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
            "num_key_value_heads": s["num_key_value_heads"], "vocab_size": s.get("vocab_size", DREAM_VOCAB),
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
            "max_position_embeddings": 131072, "use_sliding_window": False, "sliding_window": None,
            "tie_word_embeddings": False, "mask_token_id": 151666, "pad_token_id": 151643, "bos_token_id": 151665,
            "eos_token_id": 151643, "use_cache": False, "torch_dtype": "float32",
            **_llava_fields(s),
        }
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def write_lavida_checkpoint(out_dir: str | Path, backbone: str, spec: dict | None = None, seed: int = 0) -> Path:
    """Write a tiny random LaViDa checkpoint in the official layout (atomically)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig

    from dvlm_exp.models.lavida import LaViDaDream, LaViDaLLaDA
    from dvlm_exp.models.tokenizer_tiny import build_llada_tokenizer

    s = {**DEFAULT_SPEC, **(spec or {})}
    cls = {"llada": LaViDaLLaDA, "dream": LaViDaDream}.get(backbone)
    if cls is None:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    out_dir = Path(out_dir)
    cfg = official_config(backbone, s)
    tc = tower_config(s)
    vcfg = SiglipVisionConfig(**{k: v for k, v in tc.items() if k not in ("architectures", "model_type", "image_mean")},
                              vision_use_head=False)
    vcfg.num_hidden_layers = s["vision_layers"]
    torch.manual_seed(seed)
    model = cls(cls.translate_config(cfg, out_dir), vcfg)
    _init_(model, seed)
    state = {cls.ours_to_official(k): v.detach().contiguous() for k, v in model.state_dict().items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=s["max_shard_size"])
        for fname, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / TOWER_DIR).mkdir()
        (tmp / TOWER_DIR / "config.json").write_text(json.dumps(tc, indent=2))
        if backbone == "llada":
            build_llada_tokenizer(tmp, vocab_size=cfg["embedding_size"])
        else:
            build_dream_tokenizer(tmp, seed=seed)
        (tmp / "dvlm_tiny.json").write_text(json.dumps({"backbone": backbone, "spec": s, "seed": seed}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
