"""A SigLIP text tower as a model part (TRIM's question encoder) and TRIM's vision path.

LLaDA-V's checkpoint has no text tower: `model.text_tower_path` points at a SigLIP checkpoint
folder in the google/siglip-so400m-patch14-384 layout (config.json with `text_config`, weights
with `text_model.*` keys, the SentencePiece tokenizer), or at a hub id already in the HF cache.
The dMLLM study's TRIM port (Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe,
`LLaDA-V/eval/llava_trim/model/multimodal_encoder/siglip_encoder.py`, `SigLipVisionTower`) loads
the text model of that checkpoint (`_init_text_side_mandatory`, float32) and encodes the question
with `_encode_texts_chunked`, which `TextTower.encode` re-states:

  ids = tokenizer(text.strip(), add_special_tokens=False); windows of max_position_embeddings
  minus the tokenizer's special-token count; each window -> build_inputs_with_special_tokens,
  right-padded to max_position_embeddings with the pad id (attention mask 0 there); the text
  model's `pooler_output` per window; the mean over windows.
The study's LaViDa port (`LaViDa/eval/llava_trim/.../siglip_encoder.py`) differs in two places, the
arguments `strip=False` (the lmms-eval context as it comes) and `embedding="first_token"`
(`last_hidden_state[:, 0]`: its output check finds no `text_embeds` and the text model no
`text_projection`, and it never asks for `pooler_output`).

`dvlm_exp.engine.vision.trim_image_features` is the vision path for `tower_stage == "output"` (dvlm_exp/pruning/trim.py):
the tower's features of the selected layer per 384px view, the method's per-view reduction, the
projector on the zero-padded [V, N, d] features (as the port's `encode_images`), and the port's
`llava_arch.prepare_inputs_labels_for_multimodal` cut.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

DOWNLOAD_HINT = ("a SigLIP checkpoint with its text tower, e.g. `hf download google/siglip-so400m-patch14-384 "
                 "--local-dir /path/to/siglip-so400m-patch14-384` on a machine with internet")


class TextTowerError(ValueError):
    pass


def text_tower_facts(path) -> dict:
    """Check a text-tower folder without torch: config.json with a SigLIP `text_config` (or a
    bare `siglip_text_model` config) and tokenizer files. Returns {"path", "dim" (pooler output), "hidden" (hidden states), "max_length"}."""
    from dvlm_exp.run.paths import resolve_path

    try:
        d = resolve_path(path)
    except Exception as e:  # noqa: BLE001 - a hub id not in the cache: its own message names `hf download`
        raise TextTowerError(f"model.text_tower_path={path}: {e}") from e
    if not d.is_dir():
        raise TextTowerError(f"model.text_tower_path={path} is not a directory: point it at {DOWNLOAD_HINT}")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise TextTowerError(f"model.text_tower_path={path} has no config.json: point it at {DOWNLOAD_HINT}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise TextTowerError(f"model.text_tower_path={path}: config.json is not JSON ({e}); re-download {DOWNLOAD_HINT}") from e
    tc = cfg.get("text_config") if cfg.get("model_type") != "siglip_text_model" else cfg
    if not isinstance(tc, dict):
        raise TextTowerError(f"model.text_tower_path={path}: config.json has no text_config (model_type "
                             f"{cfg.get('model_type')!r}, not a SigLIP text tower): point it at {DOWNLOAD_HINT}")
    if not any((d / f).is_file() for f in ("spiece.model", "tokenizer.json")):
        raise TextTowerError(f"model.text_tower_path={path}: no tokenizer (spiece.model or tokenizer.json): "
                             f"re-download {DOWNLOAD_HINT}")
    hidden = int(tc.get("hidden_size", 768))
    return {"path": d, "dim": int(tc.get("projection_size") or hidden), "hidden": hidden,
            "max_length": int(tc.get("max_position_embeddings", 64))}


class TextTower(nn.Module):
    """SiglipTextModel + its tokenizer; `encode(text)` -> the question's embedding [1, dim]."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype = torch.float32) -> "TextTower":
        from transformers import AutoTokenizer, SiglipTextModel

        from transformers.utils import logging as hf_logging

        d = text_tower_facts(path)["path"]
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the vision_model.* keys of the full checkpoint are not loaded: expected
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(str(d))
            # the port loads the whole SigLIP model in float32 and keeps `.text_model`; the text
            # weights alone (`text_model.*`) give the same module
            model = SiglipTextModel.from_pretrained(str(d), dtype=dtype)
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
        model.to(device).eval().requires_grad_(False)
        return cls(model, tok)

    @property
    def dim(self) -> int:
        c = self.model.config
        return int(getattr(c, "projection_size", None) or c.hidden_size)

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 64))

    def windows(self, text: str, strip: bool = True) -> list[list[int]]:
        """The port's windows of token ids, special tokens included (padding not)."""
        tok, max_len = self.tokenizer, self.max_length
        body = max(1, max_len - tok.num_special_tokens_to_add(pair=False))
        ids = tok(text.strip() if strip else text, add_special_tokens=False, verbose=False)["input_ids"]  # longer than one window: windows
        return [tok.build_inputs_with_special_tokens(ids[i:i + body]) for i in range(0, len(ids), body)] or \
            [tok.build_inputs_with_special_tokens([])]

    @torch.no_grad()
    def encode(self, text: str, embedding: str = "pooler", strip: bool = True) -> torch.Tensor:
        """[1, dim]: per window `pooler_output` (embedding="pooler") or `last_hidden_state[:, 0]`
        ("first_token", size hidden_size), averaged over the windows."""
        if embedding not in ("pooler", "first_token"):
            raise ValueError(f"embedding must be pooler or first_token, got {embedding!r}")
        tok, max_len = self.tokenizer, self.max_length
        pad = tok.pad_token_id if tok.pad_token_id is not None else (
            tok.eos_token_id if tok.eos_token_id is not None else 0)
        dev = next(self.model.parameters()).device
        outs = []
        for win in self.windows(text, strip=strip):
            ids = torch.tensor([win[:max_len]], dtype=torch.long, device=dev)
            mask = torch.ones_like(ids)
            if ids.shape[1] < max_len:
                ids = F.pad(ids, (0, max_len - ids.shape[1]), value=pad)
                mask = F.pad(mask, (0, max_len - mask.shape[1]), value=0)
            out = self.model(input_ids=ids, attention_mask=mask)
            outs.append(out.pooler_output if embedding == "pooler" else out.last_hidden_state[:, 0])
        return torch.stack(outs, 0).mean(0)  # [1, dim]

    def flops(self, n_windows: int) -> int:
        """Exact-convention FLOPs of `n_windows` forwards (layers + pooling head, which runs whichever
        embedding is taken), as dvlm_exp/reporting/flops.py counts the vision tower."""
        c = self.model.config
        n, d, m = self.max_length, c.hidden_size, c.intermediate_size
        per_layer = 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
        return n_windows * (c.num_hidden_layers * per_layer + 2 * d * self.dim)
