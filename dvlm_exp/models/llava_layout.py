"""llava-hf checkpoint layout facts that need no torch (config checks import this).

Two key layouts exist for `model_type` `llava` / `llava_next` (transformers
`conversion_mapping.py`, "llava" / "llava_next" rules):

  hub    the files on the hub (llava-hf/llava-1.5-7b-hf, llava-v1.6-*-hf), written by
         transformers 4.x: `language_model.model.*`, `language_model.lm_head.weight`,
         `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`
  v5     `save_pretrained` of transformers 5.x: `model.language_model.*`, `lm_head.weight`,
         `model.vision_tower.*` (CLIPVisionModel has no `vision_model.` level in 5.x),
         `model.multi_modal_projector.*`, `model.image_newline`

The loader maps either onto the 5.x module names of `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration`.
"""

from __future__ import annotations

MODEL_TYPES = ("llava", "llava_next")
# (hub prefix, 5.x module prefix), first match wins
HUB_TO_V5 = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
# Buffers older checkpoints saved that 5.x keeps non-persistent: ignored when present.
IGNORABLE_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")
# Defaults of the text backbones' configs (llava-hf configs list only non-default fields).
_TEXT_DEFAULT_LAYERS = {"llama": 32, "mistral": 32, "qwen2": 28, "vicuna": 32}


def layout_of(keys) -> str:
    keys = set(keys)
    if any(k.startswith("language_model.model.") for k in keys):
        return "hub"
    return "v5"


def hub_to_v5(key: str) -> str:
    for src, dst in HUB_TO_V5:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def v5_to_hub(key: str) -> str:
    for src, dst in HUB_TO_V5:
        if key.startswith(dst):
            return src + key[len(dst):]
    return key


def ignorable(key: str) -> bool:
    return key.endswith(IGNORABLE_SUFFIXES)


def text_num_layers(cfg: dict) -> int:
    """Decoder depth of a llava-hf config.json (nested `text_config`, defaults filled in)."""
    tc = cfg.get("text_config") or {}
    if "num_hidden_layers" in tc:
        return int(tc["num_hidden_layers"])
    return _TEXT_DEFAULT_LAYERS.get(tc.get("model_type", "llama"), 32)
