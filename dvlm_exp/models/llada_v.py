"""LLaDA-V (`llava_llada`, ML-GSAI/LLaDA-V) assembled from transformers parts.

Long file: one model family per file (the registry's rule); the tower, projector, anyres
and prompt code here are what LaViDa reuses, so splitting them would spread one checkpoint layout.

Official layout (HF `save_pretrained` of `LlavaLLaDAModelLM`): LLaMA-named bidirectional
decoder (`model.layers.*`, `model.embed_tokens`, `model.norm`, `lm_head`), SigLIP tower under
`model.vision_tower.vision_tower.vision_model.*` with the last layer already removed,
`model.mm_projector.{0,2}` (mlp2x_gelu) and `model.image_newline`. Every dimension is read
from config.json and the tensor shapes; the tower is built empty and filled from the
checkpoint (never from the hub). Missing or unexpected keys are an error, listed by name.

The engine uses the parts (`embed_tokens`, `layers`, `norm`, `lm_head`, `rotary_emb`);
`prepare()` turns a question and images (or videos) into the engine's `Sequence`.

Video (the official lmms-eval wrapper + the video branch of `prepare_inputs_labels_for_multimodal`):
`max_frames_num` (32) frames at `np.linspace(0, total-1, 32, dtype=int)`, each through the
image preprocessing, tower and projector, bilinear `get_2dPool` (stride 2: 27x27 -> 14x14),
then `image_newline` placed by `mm_newline_position` ("grid": after each pooled row of every
frame, 14 * 15 = 210 tokens per frame). The prompt holds ONE `<image>` for the whole video.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch
from torch import nn
from transformers import LlamaConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from dvlm_exp.engine.attention import ATTN_IMPLEMENTATION
from dvlm_exp.engine.state import Roles, Sequence
from dvlm_exp.models import checkpoint as ckpt
from dvlm_exp.models import llava_image
from dvlm_exp.registry import MODEL_FAMILIES

IMAGE_TOKEN_INDEX = -200
# Official ids (LLaDA tokenizer); the tokenizer is the source of truth when present.
DEFAULT_SPECIAL_IDS = {"bos": 126080, "eos": 126081, "mask": 126336, "start_header": 126346,
                       "end_header": 126347, "eot": 126348}
# SigLIP so400m/14-384 values the official tower hard-codes when no tower config is at hand.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384,
              patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# Official lmms-eval wrapper (`llava_onevision_llada`) defaults for video.
OFFICIAL_MAX_FRAMES_NUM = 32
OFFICIAL_VIDEO_POOL_STRIDE = 2
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def official_to_ours(key: str) -> str:
    for src, dst in (("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
                     ("model.mm_projector.", "mm_projector."),
                     ("model.image_newline", "image_newline"),
                     ("model.", "")):
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def ours_to_official(key: str) -> str:
    for src, dst in (("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                     ("mm_projector.", "model.mm_projector."),
                     ("image_newline", "model.image_newline"),
                     ("lm_head.", "lm_head.")):
        if key.startswith(src):
            return dst + key[len(src):]
    return "model." + key


def llm_config(cfg: dict) -> LlamaConfig:
    llm = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 500000.0)),
                         **(cfg.get("rope_scaling") or {})},
        max_position_embeddings=cfg.get("max_position_embeddings", 16384),
        attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
        tie_word_embeddings=False,
    )
    llm._attn_implementation = ATTN_IMPLEMENTATION
    return llm


def vision_config(path: Path, cfg: dict, weights: dict) -> SiglipVisionConfig:
    """Tower dims from the checkpoint tensors; heads/image size from the tower folder when present."""
    prefix = "model.vision_tower.vision_tower.vision_model."
    needed = [prefix + "embeddings.patch_embedding.weight", prefix + "encoder.layers.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in weights]
    if absent:
        raise ckpt.CheckpointError(
            f"checkpoint {path} does not match the {cfg.get('model_type')} layout: vision-tower key(s) "
            f"{', '.join(absent)} missing (the tower is read from the checkpoint, never downloaded). "
            f"No weight is initialised at random: fix or re-download the checkpoint."
        )
    patch_w = weights[prefix + "embeddings.patch_embedding.weight"]
    hidden, _, patch, _ = patch_w.shape
    n_layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in weights if k.startswith(prefix + "encoder.layers."))
    inter = weights[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    vals = dict(SO400M)
    tower_dir = path / str(cfg.get("mm_vision_tower", ""))
    if cfg.get("mm_vision_tower") and (tower_dir / "config.json").is_file():
        tc = json.loads((tower_dir / "config.json").read_text())
        vals.update({k: tc[k] for k in ("num_attention_heads", "image_size", "hidden_act", "layer_norm_eps") if k in tc})
    elif hidden != SO400M["hidden_size"]:
        vals["num_attention_heads"] = max(1, hidden // 72)
    vals.update(hidden_size=hidden, intermediate_size=inter, patch_size=patch, num_hidden_layers=n_layers)
    vc = SiglipVisionConfig(**vals, vision_use_head=False)
    vc._attn_implementation = "eager"  # the official tower computes attention eagerly
    return vc


class _LazyWeights(dict):
    """name -> tensor for every tensor of the checkpoint files (loaded eagerly, safetensors only)."""

    @classmethod
    def load(cls, files: list[Path]) -> "_LazyWeights":
        from safetensors.torch import load_file

        out = cls()
        for f in files:
            out.update(load_file(str(f)))
        return out


@MODEL_FAMILIES.register("llada_v")
class LLaDAV(nn.Module):
    family = "llada_v"
    model_type = "llava_llada"

    def __init__(self, cfg: dict, vcfg: SiglipVisionConfig):
        super().__init__()
        self.config = cfg
        lc = llm_config(cfg)
        self.llm_config = lc
        d = lc.hidden_size
        self.embed_tokens = nn.Embedding(lc.vocab_size, d)
        self.layers = nn.ModuleList(LlamaDecoderLayer(lc, i) for i in range(lc.num_hidden_layers))
        for layer in self.layers:
            layer.self_attn.is_causal = False  # LLaDA attends bidirectionally
        self.norm = LlamaRMSNorm(d, eps=lc.rms_norm_eps)
        self.lm_head = nn.Linear(d, lc.vocab_size, bias=False)
        self.vision_tower = SiglipVisionModel(vcfg)
        mm_hidden = cfg.get("mm_hidden_size", vcfg.hidden_size)
        if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {cfg.get('mm_projector_type')!r} (only mlp2x_gelu)")
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden, d), nn.GELU(), nn.Linear(d, d))
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.rotary_emb = LlamaRotaryEmbedding(lc)
        self.image_size = vcfg.image_size
        self.patches_per_side = vcfg.image_size // vcfg.patch_size
        self.grid_pinpoints = llava_image.parse_grid_pinpoints(cfg.get("image_grid_pinpoints") or [[self.image_size] * 2], self.image_size)
        ar = str(cfg.get("image_aspect_ratio", "anyres_max_4"))
        self.max_tiles = int(ar.split("anyres_max_")[1]) if ar.startswith("anyres_max_") else None
        self.tokenizer = None
        self.special_ids = dict(DEFAULT_SPECIAL_IDS)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        load_tokenizer: bool = True, resize_vocab: bool = True) -> "LLaDAV":
        from accelerate import init_empty_weights

        path = ckpt.local_dir(path)  # a local folder, or a hub id in the HF cache
        dt = resolve_dtype(dtype)  # a bad option fails before anything is read
        cfg = ckpt.read_config(path, cls.model_type)
        files = ckpt.weight_files(path)
        if load_tokenizer:
            ckpt.check_tokenizer(path)
        weights = _LazyWeights.load(files)
        vcfg = vision_config(path, cfg, weights)
        with init_empty_weights(include_buffers=False):
            model = cls(cfg, vcfg)
        expected = {ours_to_official(k) for k in model.state_dict()}
        missing = sorted(expected - set(weights))
        unexpected = sorted(set(weights) - expected)
        shapes = {ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}
        mismatched = sorted(k for k in expected & set(weights) if tuple(weights[k].shape) != shapes[k])
        if missing or unexpected or mismatched:
            lines = [f"checkpoint {path} does not match the {cls.model_type} layout:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
            if mismatched:
                lines.append(f"  shape mismatches ({len(mismatched)}, file vs config.json): " + ", ".join(
                    f"{k} {list(weights[k].shape)} vs {list(shapes[k])}" for k in mismatched[:20]) + (" ..." if len(mismatched) > 20 else ""))
            lines.append("  No weight is initialised at random: fix or re-download the checkpoint.")
            raise ckpt.CheckpointError("\n".join(lines))
        state = {official_to_ours(k): v for k, v in weights.items()}
        model.load_state_dict(state, strict=True, assign=True)
        del weights, state
        # RoPE tables stay float32 whatever model.dtype is (as in the official and HF loaders):
        # a bf16 inv_freq puts errors of several radians into the angles at positions ~2k-4k.
        rope = {n: b.detach().clone() for n, b in model.rotary_emb.named_buffers()}
        dev = resolve_device(device)
        model.to(device=dev, dtype=dt)
        for n, b in rope.items():
            setattr(model.rotary_emb, n, b.to(dev))
        model.eval()
        if load_tokenizer:
            model.attach_tokenizer(path, resize_vocab=resize_vocab)
        return model

    def attach_tokenizer(self, path: str | Path, resize_vocab: bool = True) -> None:
        from transformers import PreTrainedTokenizerFast

        from dvlm_exp.models.tokenizer_tiny import special_ids_from_tokenizer

        tok = PreTrainedTokenizerFast.from_pretrained(str(path))  # the LLaDA tokenizer class
        self.tokenizer = tok
        self.special_ids = special_ids_from_tokenizer(tok)
        if resize_vocab:
            # The official loader calls resize_token_embeddings(len(tokenizer)); for the dense
            # LLaDA vocabulary that is max id + 1 (126349). Rows beyond it are dropped.
            n = max(tok.get_vocab().values()) + 1
            if n < self.embed_tokens.num_embeddings:
                self.embed_tokens.weight = nn.Parameter(self.embed_tokens.weight[:n].clone(), requires_grad=False)
                self.embed_tokens.num_embeddings = n
                self.lm_head.weight = nn.Parameter(self.lm_head.weight[:n].clone(), requires_grad=False)
                self.lm_head.out_features = n

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
        return self.special_ids["mask"]

    @property
    def banned_ids(self) -> list[int]:
        """Ids the official decoder sets to -inf at masked slots."""
        s = self.special_ids
        return [s["eos"], s["bos"], s["start_header"], s["end_header"]]

    def dims(self) -> dict:
        lc, vc = self.llm_config, self.vision_tower.config
        return dict(
            d=lc.hidden_size, m=lc.intermediate_size, layers=lc.num_hidden_layers,
            heads=lc.num_attention_heads, kv_heads=lc.num_key_value_heads,
            head_dim=lc.hidden_size // lc.num_attention_heads, vocab=self.lm_head.out_features,
            vision_d=vc.hidden_size, vision_m=vc.intermediate_size, vision_layers=vc.num_hidden_layers,
            vision_patches=self.patches_per_side ** 2, patch_size=vc.patch_size,
            mm_hidden=self.mm_projector[0].in_features,
        )

    # ------------------------------------------------------------------ vision path
    @torch.no_grad()
    def encode_views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[V,3,S,S] -> projected patch features [V, P, d] (encoder output before post-LN)."""
        return self.project_views(pixel_values)

    def project_views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`encode_views` with autograd (training, scripts/train_tiny.py)."""
        vt = self.vision_tower
        x = pixel_values.to(device=self.device, dtype=vt.embeddings.patch_embedding.weight.dtype)
        h = vt.embeddings(x)
        h = vt.encoder(inputs_embeds=h).last_hidden_state
        return self.mm_projector(h.to(self.mm_projector[0].weight.dtype))

    def image_features(self, images: list, tower=None, question: str | None = None) -> tuple[list[torch.Tensor], dict]:
        """One [N_vis, d] block per image (anyres for a single image, base view for several).

        `tower`: a pruning method acting in the vision path (`tower_stage` set), with the question."""
        if tower is not None:  # ToMe inside SigLIP, TRIM before the projector: the engine's vision path
            from dvlm_exp.engine.vision import vision_path_features

            return vision_path_features(self, images, tower, question, square=expand_to_square)
        if len(images) == 1:
            px, size_wh = llava_image.process_image(images[0], self.grid_pinpoints, self.image_size)
            feats = self.encode_views(px)
            packed, info = llava_image.pack_image_features(
                feats, size_wh, self.grid_pinpoints, image_size=self.image_size,
                patches_per_side=self.patches_per_side, newline=self.image_newline, max_tiles=self.max_tiles)
            info = dict(info, views=int(px.shape[0]))
            return [packed], info
        # Several images: the official eval forces image_aspect_ratio="pad": one square view each.
        blocks = []
        for img in images:
            sq = expand_to_square(img.convert("RGB"))
            px = llava_image.siglip_preprocess(sq, self.image_size)[None]
            blocks.append(self.encode_views(px)[0])
        return blocks, {"views": len(images)}

    # ------------------------------------------------------------------ video path
    # Frames sampled per video (the official lmms-eval wrapper's `max_frames_num` default);
    # set on the instance (or pass max_frames to load_video_frames) to change it.
    video_max_frames: int = OFFICIAL_MAX_FRAMES_NUM
    # The official video branch calls `get_2dPool(feat)` with its default stride 2 (the
    # config's `mm_spatial_pool_stride`, which the wrapper also forces to 2, is not read there).
    video_pool_stride: int = OFFICIAL_VIDEO_POOL_STRIDE

    @property
    def video_newline_position(self) -> str:
        return str(self.config.get("mm_newline_position") or "one_token")

    @property
    def video_patch_merge_type(self) -> str:
        return str(self.config.get("mm_patch_merge_type") or "flat")

    @torch.no_grad()
    def video_features(self, frames) -> torch.Tensor:
        """Frames ([F,H,W,3] uint8 array/tensor or list of PIL) -> video tokens [N_vis, d].

        Each frame: SigLIP preprocess (as images) -> tower -> projector -> 2x2 bilinear pooling
        (27x27 -> 14x14) -> newline tokens by `mm_newline_position` (see `pack_video_features`).
        Frames are used as given (sampling happens in `load_video_frames`).
        """
        pils = frames_to_pil(frames)
        px = torch.stack([llava_image.siglip_preprocess(im, self.image_size) for im in pils])
        feats = self.encode_views(px)  # [F, 729, d], all frames in one batch as the official code
        pooled = llava_image.pool_video_frame_features(feats, self.patches_per_side, self.video_pool_stride)
        return pack_video_features(pooled, self.image_newline, self.video_newline_position,
                                   self.video_patch_merge_type)

    def num_video_tokens(self, n_frames: int) -> int:
        return num_video_tokens(n_frames, self.patches_per_side, self.video_pool_stride,
                                self.video_newline_position, self.video_patch_merge_type)

    def video_blocks(self, videos: list) -> tuple[list[torch.Tensor], dict]:
        """One [N_vis, d] block per video (paths are loaded with `video_max_frames` frames)."""
        blocks, n_frames = [], []
        for v in videos:
            frames = v.frames if isinstance(v, VideoClip) else (
                load_video_frames(v, self.video_max_frames) if isinstance(v, (str, Path)) else v)
            blk = self.video_features(frames)
            blocks.append(blk)
            n_frames.append(len(frames))
        return blocks, {"views": sum(n_frames), "video_frames": n_frames, "modality": "video"}

    # ------------------------------------------------------------------ prompt
    def prompt_ids(self, question: str, n_images: int = 1, think: str | None = None) -> list[int]:
        from dvlm_exp.models.tokenizer_tiny import build_llada_v_prompt

        if self.tokenizer is None:
            raise RuntimeError("this model was loaded without a tokenizer")
        if n_images > 1:
            question = "\n".join(["<image>"] * (n_images - 1)) + "\n" + question
        return build_llada_v_prompt(self.tokenizer, question, image=n_images > 0, think=think)

    @torch.no_grad()  # not inference_mode: callers may edit the returned state
    def prepare(self, prompt_ids: list[int], images: list, gen_length: int,
                videos: list | None = None, tower=None, question: str | None = None) -> tuple[Sequence, dict]:
        """Splice visual features into the prompt embeddings; append gen_length mask slots.

        Videos come through ``videos=`` or inside ``images`` as `VideoClip` objects or
        video file paths (str / Path, sampled with `load_video_frames`); a prompt holds
        either images or videos, one ``-200`` placeholder per visual.
        """
        images, videos = split_visuals(images, videos)
        n_ph = sum(1 for t in prompt_ids if t == IMAGE_TOKEN_INDEX)
        if videos:  # one placeholder per video (the official wrapper's token_strategy "single")
            if tower is not None:
                raise ValueError(f"prune={tower.name} acts in the vision tower on images only, not on video")
            if n_ph != len(videos):
                raise ValueError(f"prompt has {n_ph} image placeholders but {len(videos)} videos were given")
            blocks, info = self.video_blocks(videos)
        elif n_ph != len(images):
            raise ValueError(f"prompt has {n_ph} image placeholders but {len(images)} images were given")
        else:
            blocks, info = (self.image_features(images, tower=tower, question=question) if images
                            else ([], {"views": 0}))
        pieces, roles = [], []
        text: list[int] = []
        it = iter(blocks)

        def flush():
            if text:
                ids = torch.tensor(text, device=self.device)
                pieces.append(self.embed_tokens(ids))
                roles.append(torch.full((len(text),), Roles.TEXT, dtype=torch.int8))
                text.clear()

        for t in prompt_ids:
            if t == IMAGE_TOKEN_INDEX:
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
        n_vis = int((role == Roles.VISUAL).sum())
        # a vision-path method that shortened the blocks: the unpruned lengths stay the baseline
        dropped = int(info["n_visual_full"]) - n_vis if info.get("n_visual_full") is not None else 0
        seq = Sequence(
            prompt_embeds=emb, roles=role, positions=torch.arange(P, device=self.device),
            response_ids=torch.full((gen_length,), self.mask_id, dtype=torch.long, device=self.device),
            prompt_len0=P + dropped, mask_id=self.mask_id, n_visual0=n_vis + dropped,
        )
        info = dict(info, n_visual=n_vis, prompt_len=P)
        return seq, info

    def stop_ids(self, stops: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            return []
        return [self.tokenizer.encode(s, add_special_tokens=False) for s in stops if s]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def expand_to_square(img, background=(127, 127, 127)):
    """The official `expand2square` (pad mode): centre on a square canvas of the mean colour."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------
# Video (official: eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py and the video branch
# of prepare_inputs_labels_for_multimodal in train/llava/model/llava_arch.py)
# ---------------------------------------------------------------------------------------------

NEWLINE_POSITIONS = ("grid", "frame", "one_token", "no_token")


@dataclass
class VideoClip:
    """A visual to be treated as a video: sampled frames [F,H,W,3] uint8 (or a list of PIL)."""

    frames: object
    path: str | None = None

    def __len__(self) -> int:
        return len(self.frames)


def is_video(v) -> bool:
    return isinstance(v, (VideoClip, str, Path))


def split_visuals(images, videos=None) -> tuple[list, list]:
    """(images, videos): VideoClip objects and paths inside `images` are videos."""
    images = list(images or [])
    videos = list(videos or [])
    tagged = [v for v in images if is_video(v)]
    if tagged:
        videos += tagged
        images = [v for v in images if not is_video(v)]
    if images and videos:
        raise ValueError("a prompt holds either images or videos, not both "
                         "(the official wrapper decides the modality from the first visual)")
    return images, videos


def sample_frame_indices(total_frames: int, max_frames: int = OFFICIAL_MAX_FRAMES_NUM) -> list[int]:
    """The official wrapper's rule (`load_video`, decord backend, its default):
    ``np.linspace(0, total - 1, max_frames, dtype=int)``: always `max_frames` indices, repeats
    when the video has fewer frames; no fps-based sampling."""
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total {total_frames})")
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    return np.linspace(0, total_frames - 1, max_frames, dtype=int).tolist()


def _resolve_path(path) -> str:
    if isinstance(path, (list, tuple)):
        path = path[0]
    return str(path)


def count_video_frames(path) -> int:
    """Frames a full decode yields (used when the container's frame count is missing or wrong)."""
    import av

    with av.open(_resolve_path(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _decode_frames(path: str, wanted: set[int]) -> dict[int, np.ndarray]:
    import av

    got: dict[int, np.ndarray] = {}
    last = max(wanted)
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(stream)):
            if i > last:
                break
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
    return got


def load_video_frames(path, max_frames: int = OFFICIAL_MAX_FRAMES_NUM) -> np.ndarray:
    """Sampled frames [max_frames, H, W, 3] uint8 of a video file, decoded with PyAV.

    Indices follow `sample_frame_indices` (the official decord rule) over the container's frame
    count, or over a full decode count when the container reports none or too many.
    """
    import av

    path = _resolve_path(path)
    with av.open(path) as c:
        total = int(c.streams.video[0].frames or 0)
    if total <= 0:
        total = count_video_frames(path)
    idx = sample_frame_indices(total, max_frames)
    got = _decode_frames(path, set(idx))
    if len(got) < len(set(idx)):  # metadata over-reported the length: count what decodes
        total = count_video_frames(path)
        idx = sample_frame_indices(total, max_frames)
        got = _decode_frames(path, set(idx))
    return np.stack([got[i] for i in idx])


def frames_to_pil(frames) -> list:
    """[F,H,W,3] uint8 array/tensor or a sequence of PIL images / HxWx3 arrays -> list of PIL RGB."""
    from PIL import Image

    if isinstance(frames, VideoClip):
        frames = frames.frames
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    out = []
    for f in frames:
        if isinstance(f, Image.Image):
            out.append(f)
            continue
        f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3:
            raise ValueError(f"video frames must be HxWx3 uint8, got {f.dtype} {tuple(f.shape)}")
        out.append(Image.fromarray(f))
    if not out:
        raise ValueError("a video needs at least one frame")
    return out


def pack_video_features(pooled: torch.Tensor, newline: torch.Tensor | None,
                        newline_position: str = "grid", patch_merge_type: str = "spatial_unpad") -> torch.Tensor:
    """Pooled frame features [F, s*s, C] -> video tokens [N, C] with the official newline rule.

    ``mm_patch_merge_type`` "flat": frames flattened, no newline. "spatial*":
      grid:      per frame, each of the s rows followed by a newline -> F*s*(s+1)
      frame:     each frame's s*s tokens followed by one newline -> F*(s*s+1)
      one_token: all frames, then one newline if "unpad" is in the merge type -> F*s*s (+1)
      no_token:  all frames flattened -> F*s*s
    """
    n_frames, n_tok, C = pooled.shape
    if patch_merge_type == "flat":
        return pooled.reshape(-1, C)
    if not patch_merge_type.startswith("spatial"):
        raise ValueError(f"unexpected mm_patch_merge_type {patch_merge_type!r}")
    if newline_position not in NEWLINE_POSITIONS:
        raise ValueError(f"unexpected mm_newline_position {newline_position!r}")
    if newline_position == "no_token":
        return pooled.reshape(-1, C)
    nl = newline.to(dtype=pooled.dtype, device=pooled.device).reshape(1, C)
    if newline_position == "one_token":
        flat = pooled.reshape(-1, C)
        return torch.cat([flat, nl]) if "unpad" in patch_merge_type else flat
    if newline_position == "frame":
        col = nl.reshape(1, 1, C).expand(n_frames, 1, C)
        return torch.cat([pooled, col], dim=1).reshape(-1, C)
    side = int(math.isqrt(n_tok))
    if side * side != n_tok:
        raise ValueError(f"grid newline needs square frames, got {n_tok} tokens per frame")
    grid = pooled.reshape(n_frames, side, side, C)
    col = nl.reshape(1, 1, 1, C).expand(n_frames, side, 1, C)
    return torch.cat([grid, col], dim=2).reshape(-1, C)


def num_video_tokens(n_frames: int, patches_per_side: int = 27, stride: int = OFFICIAL_VIDEO_POOL_STRIDE,
                     newline_position: str = "grid", patch_merge_type: str = "spatial_unpad") -> int:
    """Video-token count from sizes alone (same rule as `pack_video_features`)."""
    side = math.ceil(patches_per_side / stride)
    per = side * side
    if patch_merge_type == "flat" or newline_position == "no_token":
        return n_frames * per
    if newline_position == "grid":
        return n_frames * side * (side + 1)
    if newline_position == "frame":
        return n_frames * (per + 1)
    if newline_position == "one_token":
        return n_frames * per + (1 if "unpad" in patch_merge_type else 0)
    raise ValueError(f"unexpected mm_newline_position {newline_position!r}")
