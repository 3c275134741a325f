"""LaViDa (jacklishufan/LaViDa) with its two backbones, assembled from transformers parts.

Long file: one file for the LaViDa family (both backbones share the scaffolding here).

Both share LLaDA-V's LLaVA-NeXT scaffolding (`LLaDAV` supplies the tower, projector, anyres
tiling, unpad, newline, sequence assembly and the engine-facing parts); only LaViDa's
differences live here (read in LaViDa 284ef5c, `llava/model/llava_arch.py`,
`llava/conversation.py`, `llava/mm_utils.py`, the lmms-eval wrappers
`eval/lmms_eval/models/llava_llada.py` / `llava_dream.py`):

* **Vision.** SigLIP v1 so400m/14-384 in the same tower code (last layer dropped, 729
  patches per view, encoder output before post-LN). `image_aspect_ratio="anyres"` with the
  five pinpoints `[(384,768),(768,384),(768,768),(1152,384),(384,1152)]` (training scripts),
  and ``ALWASY_DO_2DPOOL`` (on by default): EVERY view -- base and tiles -- goes through
  `get_2dPool(stride=2)` before the merge; the wrappers force `mm_spatial_pool_mode="bilinear"`,
  i.e. `F.interpolate(size=ceil(27/2)=14)` -> 196 tokens per view (not the paper's "2x2 average
  pooling", which would give 169). The merge then runs on the pooled 14x14 grids: base 196
  tokens, tiles as (rows*14, cols*14), `unpad_image` with the original size, newline column,
  no anyres_max downscale ("anyres", not "anyres_max_N"). A single-view input takes the
  official single-view branch: 196 + one newline. Several images: the wrappers force
  `image_aspect_ratio="pad"`, `process_images` then stacks a 4-D tensor, which takes the plain
  `encode_images` path: 729 flat tokens per image, no pooling, no newline (as LLaDA-V).
* **LLaDA backbone keys** are the original OLMo names (`model.transformer.wte`, `blocks.{i}.
  {attn_norm, ff_norm, q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out}`, `ln_f`,
  `ff_out`), mapped onto `LlamaDecoderLayer`s (shared/reference/models.md section 2.2; `ff_proj`
  is the gate, block-level `ff_out` the down projection, top-level `ff_out` the LM head).
  config.json is the OLMo-style LLaDA config (`d_model`, `n_layers`, ...) plus LLaVA fields.
* **Dream backbone**: Qwen2 layers (q/k/v biases, grouped KV heads, `model.layers.*` names as
  `Qwen2ForCausalLM`), bidirectional, and SHIFTED logits: answer slot i is predicted at
  sequence position i-1 (`logit_shift = 1`, read by the engine), so the first answer token
  comes from the last prompt token, which is text ("\\n" after `<|im_start|>assistant`) and
  never pruned (pruning drops VISUAL tokens only; `prepare` checks the role).
* **Prompts.** Template `llada`: LLaDA-V's system prompt through the LLaDA chat template
  (LLaMA-3 style); template `dream`: the same system prompt through Qwen ChatML. The wrappers
  put ``" ".join(["<image>"] * n) + "\\n"`` before the question (no think suffix) and split with
  `tokenizer_image_token` (whose BOS-offset rule drops the first token after each `<image>`
  for the LLaDA tokenizer, whose chat template starts with BOS; the Dream template has no BOS).
* **Generation.** No stop strings and no banned ids (the wrappers pass no stopping criteria
  for images and the samplers ban nothing); the whole answer is decoded with
  `skip_special_tokens`, `lstrip('!')`, (Dream) `replace('<|im_end|>\\n', '')`, `strip()`; no
  trailing-period strip. LLaDA backbone: the LLaDA low-confidence loop (`MaskedDiffusionSampler`).
  Dream backbone: `dvlm_exp.decoding.sampler_dream.DreamSampler` (`_sample`: `maskgit_plus`,
  `topk_margin`, `entropy`, `alg_temp`, `linspace(1, eps, steps+1)` or LaViDa's shift schedule).

Not reproduced: the Prefix-DLM cache (`prefix_lm=True`; every step here is a full forward, the
`prefix_lm=False` path), and for Dream+prefix the first answer token fixed from the prefill.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dvlm_exp.engine.attention import ATTN_IMPLEMENTATION
from dvlm_exp.engine.state import Roles
from dvlm_exp.models import checkpoint as ckpt
from dvlm_exp.models import llava_image
from dvlm_exp.models import llada_v
from dvlm_exp.models.llada_v import IMAGE_TOKEN_INDEX, LLaDAV, _LazyWeights, expand_to_square
from dvlm_exp.registry import MODEL_FAMILIES

# scripts/train/exps/cluster/llada-hd-*-s2.sh (--image_grid_pinpoints), as (width, height).
LAVIDA_GRID_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
LAVIDA_POOL_STRIDE = 2  # get_2dPool's default stride, applied to every view
SYSTEM_PROMPT = (  # conv_llava_llada / conv_dream .system
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# Dream tokenizer (Dream-org/Dream-v0-Instruct-7B; shared/reference/models.md section 4).
DREAM_SPECIAL_TOKENS = {"eos": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
                        "bos": "<|beginoftext|>", "mask": "<|mask|>"}
DREAM_SPECIAL_IDS = {"eos": 151643, "im_start": 151644, "im_end": 151645, "bos": 151665, "mask": 151666}


# ------------------------------------------------------------------------------------------
# Key maps
# ------------------------------------------------------------------------------------------

_VISION_PREFIXES = (("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                    ("model.mm_projector.", "mm_projector."),
                    ("model.image_newline", "image_newline"))
# OLMo block module -> LlamaDecoderLayer module (ML-GSAI/LLaDA-V rename_checkpoint.py).
OLMO_BLOCK_TO_LLAMA = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",   # the SiLU-gated branch
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",    # inside a block ff_out is the down projection ...
}
OLMO_TOP_TO_LLAMA = {
    "model.transformer.wte.": "embed_tokens.",
    "model.transformer.ln_f.": "norm.",
    "model.transformer.ff_out.": "lm_head.",  # ... at transformer level it is the LM head
}
_LLAMA_BLOCK_TO_OLMO = {v: k for k, v in OLMO_BLOCK_TO_LLAMA.items()}


def olmo_to_ours(key: str) -> str:
    for src, dst in _VISION_PREFIXES + tuple(OLMO_TOP_TO_LLAMA.items()):
        if key.startswith(src):
            return dst + key[len(src):]
    prefix = "model.transformer.blocks."
    if key.startswith(prefix):
        i, rest = key[len(prefix):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in OLMO_BLOCK_TO_LLAMA:
            return f"layers.{i}.{OLMO_BLOCK_TO_LLAMA[module]}.{param}"
    raise KeyError(f"no LaViDa-LLaDA mapping for checkpoint key {key!r}")


def ours_to_olmo(key: str) -> str:
    for dst, src in _VISION_PREFIXES + tuple(OLMO_TOP_TO_LLAMA.items()):
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith("layers."):
        i, rest = key[len("layers."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        return f"model.transformer.blocks.{i}.{_LLAMA_BLOCK_TO_OLMO[module]}.{param}"
    raise KeyError(f"no LaViDa-LLaDA mapping for parameter {key!r}")


# ------------------------------------------------------------------------------------------
# Prompt helpers
# ------------------------------------------------------------------------------------------


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's `mm_utils.tokenizer_image_token`: encode the chunks between `<image>`s with
    `tokenizer(chunk)`; if the first chunk starts with BOS, keep one BOS and drop the first
    token of every chunk (and of every `-200` separator pair), as the official code does."""
    chunks = [list(tokenizer(c).input_ids) for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: list[int] = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend(([IMAGE_TOKEN_INDEX] * (offset + 1))[offset:])  # the separator loses `offset` too
        ids.extend(chunk[offset:])
    return ids


def render_dream_chat(messages: list[dict]) -> str:
    """Qwen ChatML as the Dream chat template renders it (system message given; generation
    prompt appended): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` ... ``<|im_start|>assistant\\n``."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + "<|im_start|>assistant\n"


def user_content(question: str, n_images: int) -> str:
    """The lmms-eval wrappers: ``" ".join(["<image>"] * n) + "\\n" + context`` (no think suffix)."""
    return question if n_images == 0 else " ".join(["<image>"] * n_images) + "\n" + question


# ------------------------------------------------------------------------------------------
# Shared LaViDa behaviour
# ------------------------------------------------------------------------------------------


class _LaViDa:
    """LaViDa's differences from LLaDA-V, shared by both backbones (mixed in before LLaDAV)."""

    family = "lavida"
    template = "llada"
    strips_period = False  # the LaViDa wrappers only strip whitespace
    pool_stride = LAVIDA_POOL_STRIDE
    logit_shift = 0

    # --------------------------------------------------------------- config / keys
    @staticmethod
    def lavida_vision_defaults(cfg: dict) -> dict:
        out = dict(cfg)
        out.setdefault("image_aspect_ratio", "anyres")
        if not out.get("image_grid_pinpoints"):
            out["image_grid_pinpoints"] = LAVIDA_GRID_PINPOINTS
        out.setdefault("mm_patch_merge_type", "spatial_unpad")
        return out

    @classmethod
    def translate_config(cls, raw: dict, path: Path) -> dict:  # pragma: no cover - per backbone
        raise NotImplementedError

    @staticmethod
    def ours_to_official(key: str) -> str:  # pragma: no cover - per backbone
        raise NotImplementedError

    @staticmethod
    def official_to_ours(key: str) -> str:  # pragma: no cover - per backbone
        raise NotImplementedError

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        load_tokenizer: bool = True, resize_vocab: bool = True):
        from accelerate import init_empty_weights

        path = ckpt.local_dir(path)  # a local folder, or a hub id in the HF cache
        dt = llada_v.resolve_dtype(dtype)  # a bad option fails before anything is read
        raw = ckpt.read_config(path, cls.model_type)
        cfg = cls.translate_config(raw, path)
        files = ckpt.weight_files(path)
        if load_tokenizer:
            ckpt.check_tokenizer(path)
        weights = _LazyWeights.load(files)
        vcfg = llada_v.vision_config(path, raw, weights)
        with init_empty_weights(include_buffers=False):
            model = cls(cfg, vcfg)
        check_keys(path, cls.model_type, {cls.ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()},
                   weights)
        state = {cls.official_to_ours(k): v for k, v in weights.items()}
        model.load_state_dict(state, strict=True, assign=True)
        del weights, state
        # RoPE tables stay float32 whatever model.dtype is (as LLaDAV.from_pretrained).
        rope = {n: b.detach().clone() for n, b in model.rotary_emb.named_buffers()}
        dev = llada_v.resolve_device(device)
        model.to(device=dev, dtype=dt)
        for n, b in rope.items():
            setattr(model.rotary_emb, n, b.to(dev))
        model.eval()
        if load_tokenizer:
            model.attach_tokenizer(path, resize_vocab=resize_vocab)
        return model

    def _resize_to_tokenizer(self, tok) -> None:
        """The wrappers' `resize_token_embeddings(len(tokenizer))` (max id + 1 for these dense
        vocabularies): LM-head / embedding rows beyond it are dropped."""
        n = max(tok.get_vocab().values()) + 1
        if n < self.embed_tokens.num_embeddings:
            self.embed_tokens.weight = nn.Parameter(self.embed_tokens.weight[:n].clone(), requires_grad=False)
            self.embed_tokens.num_embeddings = n
            self.lm_head.weight = nn.Parameter(self.lm_head.weight[:n].clone(), requires_grad=False)
            self.lm_head.out_features = n

    # --------------------------------------------------------------- vision
    @property
    def anyres(self) -> bool:
        ar = str(self.config.get("image_aspect_ratio", "anyres"))
        return ar == "anyres" or ar.startswith("anyres_max")

    @property
    def pooled_side(self) -> int:
        return math.ceil(self.patches_per_side / self.pool_stride)

    def image_features(self, images: list, tower=None, question: str | None = None) -> tuple[list[torch.Tensor], dict]:
        """One [N_vis, d] block per image: pooled anyres for one image, 729 flat per image else."""
        if tower is not None:  # the study's LaViDa ports of ToMe / TRIM: views unpooled (engine/vision.py)
            from dvlm_exp.engine.vision import vision_path_features

            return vision_path_features(self, images, tower, question, square=expand_to_square)
        if len(images) == 1 and self.anyres:
            px, size_wh = llava_image.process_image(images[0], self.grid_pinpoints, self.image_size)
            feats = self.encode_views(px)  # [V, 729, d]
            pooled = llava_image.pool_video_frame_features(feats, self.patches_per_side, self.pool_stride)
            V = pooled.shape[0]
            if V == 1:  # official single-view branch: the view plus one newline
                nl = self.image_newline.to(pooled.dtype).reshape(1, -1)
                return [torch.cat([pooled[0], nl])], {"views": 1, "base": pooled.shape[1]}
            packed, info = llava_image.pack_image_features(
                pooled, size_wh, self.grid_pinpoints, image_size=self.image_size,
                patches_per_side=self.pooled_side, newline=self.image_newline, max_tiles=self.max_tiles)
            return [packed], dict(info, views=V)
        blocks = []
        for img in images:  # "pad": one square view per image, 729 tokens, no pooling
            sq = expand_to_square(img.convert("RGB"))
            blocks.append(self.encode_views(llava_image.siglip_preprocess(sq, self.image_size)[None])[0])
        return blocks, {"views": len(images)}

    def num_image_tokens(self, size_wh) -> int:
        """Visual tokens of one anyres image from its size alone (pooled grid, unpad, newline)."""
        return llava_image.num_visual_tokens(size_wh, self.grid_pinpoints, self.image_size,
                                             patches_per_side=self.pooled_side, max_tiles=self.max_tiles)

    # --------------------------------------------------------------- prompt / output
    def render_prompt(self, content: str) -> str:
        raise NotImplementedError

    def prompt_ids(self, question: str, n_images: int = 1, think: str | None = None) -> list[int]:
        """The wrappers' prompt ids (`think` is ignored: LaViDa's wrappers add no suffix)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was loaded without a tokenizer")
        return tokenizer_image_token(self.render_prompt(user_content(question, n_images)), self.tokenizer)

    def prepare(self, prompt_ids, images, gen_length, videos=None, tower=None, question=None):
        seq, info = LLaDAV.prepare(self, prompt_ids, images, gen_length, videos, tower=tower, question=question)
        if self.logit_shift and (seq.roles.numel() == 0 or int(seq.roles[-1]) != Roles.TEXT):
            # The shifted head predicts answer slot 0 from the last prompt token: it must be a
            # text token (pruning only ever drops visual ones).
            raise ValueError("the prompt must end with a text token for a shifted-logit model")
        return seq, info

    def stop_ids(self, stops: list[str]) -> list[list[int]]:
        """None: the official wrappers pass no stopping criteria for images (the answer runs
        to gen_length and special tokens are dropped at decode)."""
        return []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).lstrip("!")


def check_keys(path: Path, model_type: str, expected_shapes: dict, weights: dict) -> None:
    """Missing / unexpected / mis-shaped keys of a checkpoint, listed by official name."""
    expected = set(expected_shapes)
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    mismatched = sorted(k for k in expected & set(weights) if tuple(weights[k].shape) != expected_shapes[k])
    if not (missing or unexpected or mismatched):
        return

    def listed(keys, fmt=str):
        return ", ".join(fmt(k) for k in keys[:20]) + (" ..." if len(keys) > 20 else "")

    lines = [f"checkpoint {path} does not match the {model_type} layout:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + listed(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + listed(unexpected))
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}, file vs config.json): " + listed(
            mismatched, lambda k: f"{k} {list(weights[k].shape)} vs {list(expected_shapes[k])}"))
    lines.append("  No weight is initialised at random: fix or re-download the checkpoint.")
    raise ckpt.CheckpointError("\n".join(lines))


# ------------------------------------------------------------------------------------------
# LaViDa-LLaDA
# ------------------------------------------------------------------------------------------

# OLMo options the LLaMA-layer mapping supports, with the released LLaDA-8B values.
_OLMO_REQUIRED = {"block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu", "swiglu"),
                  "include_bias": (False,), "include_qkv_bias": (False, None), "weight_tying": (False,),
                  "rope": (True,), "alibi": (False,), "scale_logits": (False,), "input_emb_norm": (False,),
                  "attention_layer_norm": (False,), "block_group_size": (1,)}


@MODEL_FAMILIES.register("lavida_llada")
class LaViDaLLaDA(_LaViDa, LLaDAV):
    family = "lavida_llada"
    model_type = "llava_llada"
    template = "llada"

    @classmethod
    def translate_config(cls, raw: dict, path: Path) -> dict:
        """OLMo-style LLaDA config -> the HF names `LLaDAV` builds from (original keys kept)."""
        if "d_model" not in raw:
            hint = (" It has HF-LLaMA names (hidden_size, model.layers.*): that is LLaDA-V's layout, use model=llada_v."
                    if "hidden_size" in raw else "")
            raise ckpt.CheckpointError(f"{path}/config.json has no 'd_model': not an OLMo-style LaViDa-LLaDA config.{hint}")
        bad = [f"{k}={raw[k]!r} (supported: {', '.join(map(repr, ok))})" for k, ok in _OLMO_REQUIRED.items()
               if k in raw and raw[k] not in ok]
        if bad:
            raise ckpt.CheckpointError(f"{path}/config.json: unsupported LLaDA option(s): {'; '.join(bad)}")
        try:
            d, n_heads, n_layers = int(raw["d_model"]), int(raw["n_heads"]), int(raw["n_layers"])
        except KeyError as e:
            raise ckpt.CheckpointError(f"{path}/config.json lacks {e.args[0]!r}: not a complete LLaDA config") from e
        n_kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else n_heads)
        out = cls.lavida_vision_defaults(raw)
        out.update(
            hidden_size=d, num_attention_heads=n_heads, num_hidden_layers=n_layers, num_key_value_heads=int(n_kv),
            intermediate_size=int(raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d),
            vocab_size=int(raw.get("embedding_size") or raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=float(raw.get("rope_theta", 500000.0)),
            max_position_embeddings=int(raw.get("max_sequence_length", 4096)), hidden_act="silu",
            rope_scaling=None, attention_bias=False,
        )
        return out

    ours_to_official = staticmethod(ours_to_olmo)
    official_to_ours = staticmethod(olmo_to_ours)

    def attach_tokenizer(self, path, resize_vocab: bool = True) -> None:
        LLaDAV.attach_tokenizer(self, path, resize_vocab=resize_vocab)

    @property
    def banned_ids(self) -> list[int]:
        """LaViDa's LLaDA `generate` bans nothing (LLaDA-V bans EOS/BOS/headers)."""
        return []

    def render_prompt(self, content: str) -> str:
        from dvlm_exp.models.tokenizer_tiny import render_llada_chat

        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_llada_chat(messages, bos_token=self.tokenizer.bos_token)


# ------------------------------------------------------------------------------------------
# LaViDa-Dream
# ------------------------------------------------------------------------------------------


def dream_llm_config(cfg: dict):
    from transformers import Qwen2Config

    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (Dream attends to the whole sequence)")
    qc = Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 1000000.0)),
                         **(cfg.get("rope_scaling") or {})},
        max_position_embeddings=cfg.get("max_position_embeddings", 32768), use_sliding_window=False,
        tie_word_embeddings=False,
    )
    qc._attn_implementation = ATTN_IMPLEMENTATION
    return qc


@MODEL_FAMILIES.register("lavida_dream")
class LaViDaDream(_LaViDa, LLaDAV):
    family = "lavida_dream"
    model_type = "llava_dream"
    template = "dream"
    logit_shift = 1  # Dream predicts token i+1 at position i: slot i's logits come from position i-1

    def __init__(self, cfg: dict, vcfg):
        from transformers import SiglipVisionModel
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

        nn.Module.__init__(self)
        self.config = cfg
        qc = dream_llm_config(cfg)
        self.llm_config = qc
        d = qc.hidden_size
        self.embed_tokens = nn.Embedding(qc.vocab_size, d)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(qc, i) for i in range(qc.num_hidden_layers))
        for layer in self.layers:
            layer.self_attn.is_causal = False  # Dream attends bidirectionally
        self.norm = Qwen2RMSNorm(d, eps=qc.rms_norm_eps)
        self.lm_head = nn.Linear(d, qc.vocab_size, bias=False)
        self.vision_tower = SiglipVisionModel(vcfg)
        if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {cfg.get('mm_projector_type')!r} (only mlp2x_gelu)")
        mm_hidden = cfg.get("mm_hidden_size", vcfg.hidden_size)
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden, d), nn.GELU(), nn.Linear(d, d))
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.rotary_emb = Qwen2RotaryEmbedding(qc)
        self.image_size = vcfg.image_size
        self.patches_per_side = vcfg.image_size // vcfg.patch_size
        self.grid_pinpoints = llava_image.parse_grid_pinpoints(cfg["image_grid_pinpoints"], self.image_size)
        ar = str(cfg.get("image_aspect_ratio", "anyres"))
        self.max_tiles = int(ar.split("anyres_max_")[1]) if ar.startswith("anyres_max_") else None
        self.tokenizer = None
        self.special_ids = {**DREAM_SPECIAL_IDS,
                            **{k: int(cfg[f"{k}_token_id"]) for k in ("mask", "bos", "eos") if cfg.get(f"{k}_token_id") is not None}}

    @classmethod
    def translate_config(cls, raw: dict, path: Path) -> dict:
        if "d_model" in raw:
            raise ckpt.CheckpointError(f"{path}/config.json has OLMo names (d_model): that is LaViDa-LLaDA, use model=lavida_llada")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if k not in raw]
        if missing:
            raise ckpt.CheckpointError(f"{path}/config.json lacks {', '.join(map(repr, missing))}: not a complete Dream config")
        if raw.get("use_sliding_window"):
            raise ckpt.CheckpointError(f"{path}/config.json: use_sliding_window=true is not supported")
        return cls.lavida_vision_defaults(raw)

    # Dream's LLM keys are exactly Qwen2ForCausalLM's, i.e. LLaDA-V's HF naming.
    ours_to_official = staticmethod(llada_v.ours_to_official)
    official_to_ours = staticmethod(llada_v.official_to_ours)

    @property
    def sampler_class(self):
        from dvlm_exp.decoding.sampler_dream import DreamSampler

        return DreamSampler

    @property
    def banned_ids(self) -> list[int]:
        return []

    def attach_tokenizer(self, path, resize_vocab: bool = True) -> None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        vocab = tok.get_vocab()
        ids = {}
        for name, token in DREAM_SPECIAL_TOKENS.items():
            if token not in vocab:
                raise ValueError(f"tokenizer in {path} has no {name} token {token!r}; is it the Dream tokenizer?")
            ids[name] = int(vocab[token])
        cfg_mask = self.config.get("mask_token_id")
        if cfg_mask is not None and int(cfg_mask) != ids["mask"]:
            raise ValueError(f"config.json mask_token_id={cfg_mask} but the tokenizer's {DREAM_SPECIAL_TOKENS['mask']} is {ids['mask']}")
        self.tokenizer = tok
        self.special_ids = ids
        if resize_vocab:
            self._resize_to_tokenizer(tok)

    def render_prompt(self, content: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_dream_chat(messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).lstrip("!").replace("<|im_end|>\n", "")
