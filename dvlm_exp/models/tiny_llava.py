"""Tiny llava-hf checkpoints (`llava` = LLaVA-1.5, `llava_next` = LLaVA-NeXT) in the hub layout.

`write_checkpoint(out_dir, kind, spec, seed)` builds transformers' own
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` from a small config with
random weights (fixed seed), and writes what the llava-hf repos hold: config.json,
generation_config.json, sharded safetensors + model.safetensors.index.json with the hub key
names (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, `image_newline`; see llava_layout.py), a fast tokenizer with `<image>`
and `<pad>` appended after the base vocabulary (as llava-hf's 32000 / 32001), the processor files
(processor_config.json, preprocessor_config.json, chat template). Both our loader
(`dvlm_exp.models.llava_hf.LlavaHF.from_pretrained`) and transformers' `from_pretrained` read it.

Approximations (documented, tests do not depend on them): the tokenizer is a byte-level BPE
trained on a small corpus, not Vicuna's sentencepiece; the chat template is the llava-1.5-hf
"USER: <image>\\n... ASSISTANT:" form for both kinds (llava-v1.6-vicuna's; the mistral NeXT uses
"[INST] ... [/INST]").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

KINDS = ("llava", "llava_next")
DEFAULT_SPEC = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, bpe_vocab=320,
    vision_hidden_size=32, vision_layers=3, vision_heads=2, vision_intermediate_size=64,
    image_size=56, patch_size=14, max_shard_size="300KB",
)
# llava-1.5-hf's chat template (processor chat_template): images first, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CORPUS_WORDS = ("the a an is are was of to in on at what which how many where who color colour shape "
                 "image picture photo document page table chart red green blue yellow black white square "
                 "circle triangle text number title total date name left right top bottom yes no one two "
                 "three four five answer question describe the the USER ASSISTANT : . , ? ! 0 1 2 3 4 5 6 7 8 9").split()


def spec_hash(kind: str, spec: dict, seed: int) -> str:
    blob = json.dumps({"kind": kind, "spec": spec, "seed": seed, "v": 1}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tokenizer(out_dir: Path, bpe_vocab: int, seed: int = 0):
    """Byte-level BPE: <unk>=0, <s>=1, </s>=2, merges, then <image>, <pad> (llava-hf order)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096, padding_side="left")
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.save_pretrained(str(out_dir))
    return fast


def configs(kind: str, spec: dict, n_tokens: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    s = spec
    S = s["image_size"]
    vocab = 64 * math.ceil(n_tokens / 64)  # padded rows, as 32064 for 32002 tokens
    vc = CLIPVisionConfig(hidden_size=s["vision_hidden_size"], intermediate_size=s["vision_intermediate_size"],
                          num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                          image_size=S, patch_size=s["patch_size"], projection_dim=s["vision_hidden_size"],
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)
    tc = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                     num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                     num_key_value_heads=s["num_key_value_heads"], vocab_size=vocab, rms_norm_eps=1e-5,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=n_tokens - 1,
                     tie_word_embeddings=False)
    common = dict(vision_config=vc, text_config=tc, image_token_index=n_tokens - 2, projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
                  pad_token_id=n_tokens - 1)
    if kind == "llava":
        cfg = LlavaConfig(image_seq_length=(S // s["patch_size"]) ** 2, **common)
        cfg.architectures = ["LlavaForConditionalGeneration"]
    else:
        cfg = LlavaNextConfig(image_grid_pinpoints=[[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]],
                              **common)
        cfg.architectures = ["LlavaNextForConditionalGeneration"]
    return cfg


def _init_(model, seed: int) -> None:
    """Peaky deterministic init so that greedy decoding is not a tie-break lottery."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                val = 0.1 * n
            elif ("norm" in name or "layer_norm" in name) and p.dim() == 1:
                val = 1 + 0.2 * n
            elif name.endswith(("embed_tokens.weight", "image_newline", "class_embedding")):
                val = n
            elif "position_embedding" in name:
                val = 0.5 * n
            elif name == "lm_head.weight":
                val = 2 * n / math.sqrt(p.shape[1])
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                scale = 3.0 if ("self_attn" in name and "language_model" in name) else 1.0
                val = scale * n / math.sqrt(fan_in)
            p.copy_(val)


def _processor(kind: str, tok, spec: dict):
    S, patch = spec["image_size"], spec["patch_size"]
    proc_kw = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_mean=CLIP_MEAN,
                   image_std=CLIP_STD, do_center_crop=True, do_convert_rgb=True)
    if kind == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(**proc_kw)
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                              chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(image_grid_pinpoints=[[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]],
                                    do_pad=True, **proc_kw)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                              chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)


def write_checkpoint(out_dir: str | Path, kind: str = "llava", spec: dict | None = None, seed: int = 0,
                     layout: str = "hub") -> Path:
    """Write a tiny random llava-hf checkpoint (atomically). layout: hub (files as on the hub) | v5."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from dvlm_exp.models.llava_layout import v5_to_hub

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    spec = {**DEFAULT_SPEC, **(spec or {})}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        tok = build_tokenizer(tmp, spec["bpe_vocab"], seed)
        cfg = configs(kind, spec, len(tok))
        torch.manual_seed(seed)
        cls = LlavaForConditionalGeneration if kind == "llava" else LlavaNextForConditionalGeneration
        model = cls(cfg).eval()
        _init_(model, seed)
        rename = v5_to_hub if layout == "hub" else (lambda k: k)
        state = {rename(k): v.detach().contiguous() for k, v in model.state_dict().items()}
        split = split_torch_state_dict_into_shards(state, max_shard_size=spec["max_shard_size"])
        for fname, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        cfg.save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": len(tok) - 1}, indent=2))
        _processor(kind, tok, spec).save_pretrained(str(tmp))
        # The hub repos keep the image processor in its own preprocessor_config.json (transformers
        # 5.x nests it in processor_config.json; both load) under the backend-free class name.
        pc_file = tmp / "processor_config.json"
        pc = json.loads(pc_file.read_text())
        ip = pc.pop("image_processor", None)
        if ip is not None:
            ip["image_processor_type"] = "CLIPImageProcessor" if kind == "llava" else "LlavaNextImageProcessor"
            ip["processor_class"] = pc.get("processor_class")
            (tmp / "preprocessor_config.json").write_text(json.dumps(ip, indent=2))
            pc_file.write_text(json.dumps(pc, indent=2))
        (tmp / "dvlm_tiny.json").write_text(json.dumps({"kind": kind, "spec": spec, "seed": seed, "layout": layout},
                                                       indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_checkpoint(cache_dir: str | Path, spec: dict | None = None, seed: int = 0, kind: str = "llava") -> Path:
    """The tiny checkpoint for (kind, spec, seed) under cache_dir, written once and reused."""
    spec = {**DEFAULT_SPEC, **(spec or {})}
    kind = spec.pop("kind", kind)
    path = Path(cache_dir) / f"tiny-{kind}-{spec_hash(kind, spec, seed)}"
    if not (path / "dvlm_tiny.json").is_file():
        write_checkpoint(path, kind, spec, seed)
    return path
