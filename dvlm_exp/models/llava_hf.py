"""The autoregressive LLaVA baselines from llava-hf checkpoints (`llava` = LLaVA-1.5, `llava_next` = NeXT).

transformers does the model: `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`
are built from the checkpoint's config.json (empty weights) and filled from its safetensors files
(hub or 5.x key layout, llava_layout.py; missing / unexpected / mis-shaped keys are an error listed
by name). The vision path is transformers' own: the checkpoint's image processor (AutoProcessor:
CLIP resize + crop for 1.5; anyres tiles for NeXT) and `get_image_features` (CLIP layer -2, CLS
dropped, projector; NeXT: `pack_image_features` with unpad + `image_newline`).

The engine gets the decoder parts (`embed_tokens`, `layers`, `rotary_emb`, `norm`, `lm_head`) of the
transformers language model, whose attention runs through `ATTN_IMPLEMENTATION` (score rows) and
stays causal through the AR engine's explicit causal mask (dvlm_exp/engine/ar.py). `decoding = "ar"`
routes the Generator to the AR engine. The visual block of the prompt (`input_ids == image_token_id`
after expansion) carries `Roles.VISUAL`, so every pruning method works unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dvlm_exp.engine.attention import ATTN_IMPLEMENTATION
from dvlm_exp.engine.state import Roles, Sequence
from dvlm_exp.models import checkpoint as ckpt
from dvlm_exp.models import llava_layout as layout
from dvlm_exp.models.llada_v import resolve_device, resolve_dtype
from dvlm_exp.registry import MODEL_FAMILIES

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _load_weights(files: list[Path]) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@MODEL_FAMILIES.register("llava_1_5")
class LlavaHF(nn.Module):
    """One llava-hf checkpoint, exposed as parts for the engine."""

    family = "llava_1_5"
    model_type = "llava"
    decoding = "ar"

    def __init__(self, hf_model, config):
        super().__init__()
        self.hf = hf_model
        self.config = config
        lm = hf_model.model.language_model
        self.embed_tokens = lm.embed_tokens
        self.layers = lm.layers
        self.rotary_emb = lm.rotary_emb
        self.norm = lm.norm
        self.lm_head = hf_model.lm_head
        self.tokenizer = None
        self.processor = None
        self.image_token_id = int(config.image_token_id)
        tc = config.text_config
        eos = tc.eos_token_id if tc.eos_token_id is not None else 2
        self.special_ids = {"bos": tc.bos_token_id, "eos": eos, "image": self.image_token_id,
                            "pad": getattr(config, "pad_token_id", None)}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        load_tokenizer: bool = True, **_ignored) -> "LlavaHF":
        """`_ignored`: loader options of other families (resize_vocab) that do not apply here."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        path = ckpt.local_dir(path)  # a local folder, or a hub id in the HF cache
        dt = resolve_dtype(dtype)
        raw = ckpt.read_config(path, cls.model_type)
        files = ckpt.weight_files(path)
        if load_tokenizer:
            ckpt.check_tokenizer(path)
            if not any((path / f).is_file() for f in PROCESSOR_FILES):
                raise ckpt.CheckpointError(
                    f"no {' or '.join(PROCESSOR_FILES)} in {path}: copy the processor files of the released "
                    f"llava-hf checkpoint into model.path (the image preprocessing is read from them)")
        config = AutoConfig.from_pretrained(str(path))
        config.text_config._attn_implementation = ATTN_IMPLEMENTATION
        config.vision_config._attn_implementation = "sdpa"
        weights = _load_weights(files)
        lay = layout.layout_of(weights)
        renamed = {}
        for k, v in weights.items():
            if layout.ignorable(k):
                continue
            renamed[layout.hub_to_v5(k) if lay == "hub" else k] = v
        del weights
        with init_empty_weights(include_buffers=False):
            hf = cls._hf_class()(config)
        state = hf.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False))
        expected = set(state)
        if tied:
            expected.discard("lm_head.weight")
        shown = (lambda k: layout.v5_to_hub(k)) if lay == "hub" else (lambda k: k)
        missing = sorted(shown(k) for k in expected - set(renamed))
        unexpected = sorted(shown(k) for k in set(renamed) - set(state))
        mismatched = sorted(f"{shown(k)} {list(renamed[k].shape)} vs {list(state[k].shape)}"
                            for k in expected & set(renamed) if tuple(renamed[k].shape) != tuple(state[k].shape))
        if missing or unexpected or mismatched:
            lines = [f"checkpoint {path} does not match the {raw.get('model_type')} layout ({lay} key names):"]
            for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches (file vs config.json)", mismatched)):
                if items:
                    lines.append(f"  {what} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
            lines.append("  No weight is initialised at random: fix or re-download the checkpoint.")
            raise ckpt.CheckpointError("\n".join(lines))
        hf.load_state_dict(renamed, strict=not tied, assign=True)
        if tied:
            hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
        del renamed
        lm = hf.model.language_model
        # RoPE tables stay float32 whatever the dtype (as transformers' own loader keeps them).
        rope = {n: b.detach().clone().float() for n, b in lm.rotary_emb.named_buffers()}
        dev = resolve_device(device)
        hf.to(device=dev, dtype=dt)
        for n, b in rope.items():
            setattr(lm.rotary_emb, n, b.to(dev))
        hf.eval()
        model = cls(hf, config)
        if load_tokenizer:
            model.attach_processor(path)
        return model

    @staticmethod
    def _hf_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def attach_processor(self, path: str | Path) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(path))
        self.tokenizer = self.processor.tokenizer
        tid = self.tokenizer.convert_tokens_to_ids("<image>")
        if tid != self.image_token_id:
            raise ckpt.CheckpointError(
                f"the tokenizer in {path} maps <image> to {tid} but config.json has image_token_index="
                f"{self.image_token_id}: tokenizer and weights come from different checkpoints")
        if self.tokenizer.eos_token_id is not None:
            self.special_ids["eos"] = int(self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def mask_id(self) -> int:
        return -1  # no mask token in an AR model; the Sequence carries no response slots

    @property
    def banned_ids(self) -> list[int]:
        return []

    @property
    def eos_ids(self) -> list[int]:
        return [int(self.special_ids["eos"])]

    def dims(self) -> dict:
        tc, vc = self.config.text_config, self.config.vision_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        layer = self.config.vision_feature_layer
        n_vis_layers = vc.num_hidden_layers + 1 + layer if isinstance(layer, int) and layer < 0 else vc.num_hidden_layers
        return dict(
            d=tc.hidden_size, m=tc.intermediate_size, layers=tc.num_hidden_layers,
            heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads, head_dim=head_dim,
            vocab=self.lm_head.out_features,
            # CLIP: patches + CLS through the tower; layers up to the feature layer counted
            # (transformers runs the whole tower; the last layers' work is not counted: approximate)
            vision_d=vc.hidden_size, vision_m=vc.intermediate_size, vision_layers=n_vis_layers,
            vision_patches=(vc.image_size // vc.patch_size) ** 2 + 1, patch_size=vc.patch_size,
            mm_hidden=self.hf.model.multi_modal_projector.linear_1.in_features,
        )

    # ------------------------------------------------------------------ vision path
    def _pixels(self, images: list) -> dict:
        return dict(self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt"))

    @torch.no_grad()
    def image_features(self, images: list) -> tuple[list[torch.Tensor], dict]:
        """One [N_vis, d] block per image, from transformers' get_image_features."""
        px = self._pixels(images)
        pv = px["pixel_values"].to(device=self.device, dtype=self.dtype)
        kw = dict(vision_feature_layer=self.config.vision_feature_layer,
                  vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        if "image_sizes" in px:
            kw["image_sizes"] = px["image_sizes"].to(self.device)
        out = self.hf.model.get_image_features(pixel_values=pv, **kw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        views = int(pv.shape[0] * (pv.shape[1] if pv.dim() == 5 else 1))
        if "image_sizes" in px:  # NeXT: only the tiles each image really has go through the tower
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            views = sum(image_size_to_num_patches(s, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                        for s in px["image_sizes"].tolist())
        return [f for f in feats], {"views": views}

    # ------------------------------------------------------------------ prompt
    def prompt_ids(self, question: str, n_images: int = 1, think: str | None = None) -> list[int]:
        """The checkpoint's chat template with one `<image>` per image (expanded in `prepare`)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was loaded without a tokenizer")
        question = question.replace("<image>", "").strip()
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def prepare(self, prompt_ids: list[int], images: list, gen_length: int = 0,
                videos: list | None = None, tower=None, question: str | None = None) -> tuple[Sequence, dict]:
        """Each `<image>` id becomes that image's feature block (Roles.VISUAL). No response slots:
        the AR engine appends generated tokens to its KV cache (`gen_length` is not used here)."""
        if tower is not None:
            raise ValueError(f"{self.family}: prune={tower.name} acts in the vision tower, which this "
                             "baseline's vision path does not expose; use a decoder-layer method")
        if videos:
            raise ValueError(f"{self.family}: video input is not supported by this baseline")
        n_ph = sum(1 for t in prompt_ids if t == self.image_token_id)
        if n_ph != len(images):
            raise ValueError(f"prompt has {n_ph} <image> placeholders but {len(images)} images were given")
        blocks, info = self.image_features(images) if images else ([], {"views": 0})
        pieces, roles, text = [], [], []
        it = iter(blocks)

        def flush():
            if text:
                pieces.append(self.embed_tokens(torch.tensor(text, device=self.device)))
                roles.append(torch.full((len(text),), Roles.TEXT, dtype=torch.int8))
                text.clear()

        for t in prompt_ids:
            if t == self.image_token_id:
                flush()
                blk = next(it).to(self.dtype)
                pieces.append(blk)
                roles.append(torch.full((blk.shape[0],), Roles.VISUAL, dtype=torch.int8))
            else:
                text.append(t)
        flush()
        emb = torch.cat(pieces)
        role = torch.cat(roles).to(self.device)
        P = emb.shape[0]
        seq = Sequence(prompt_embeds=emb, roles=role, positions=torch.arange(P, device=self.device),
                       response_ids=torch.zeros(0, dtype=torch.long, device=self.device), prompt_len0=P,
                       mask_id=self.mask_id)
        info = dict(info, n_visual=int((role == Roles.VISUAL).sum()), prompt_len=P)
        return seq, info

    def expand_ids(self, prompt_ids: list[int], n_visual_per_image: list[int]) -> list[int]:
        """The prompt with each `<image>` repeated as many times as its features (the processor's form)."""
        out, it = [], iter(n_visual_per_image)
        for t in prompt_ids:
            out.extend([t] * next(it) if t == self.image_token_id else [t])
        return out

    def stop_ids(self, stops: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            return []
        return [self.tokenizer.encode(s, add_special_tokens=False) for s in stops if s]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@MODEL_FAMILIES.register("llava_next")
class LlavaNextHF(LlavaHF):
    family = "llava_next"
    model_type = "llava_next"

    @staticmethod
    def _hf_class():
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration
