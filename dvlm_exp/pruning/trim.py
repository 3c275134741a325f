"""TRIM as the dMLLM study ran it on LLaDA-V (methods.md §3.3, §4.5).

The port: Yrdal3910/dMLLM-Visual-Token-Redundancy-Analysis @ 43849fe,
`LLaDA-V/eval/llava_trim/model/multimodal_encoder/siglip_encoder.py` `SigLipVisionTower.forward`
/ `token_reduction`, and `LLaDA-V/eval/llava_trim/model/llava_arch.py`
`prepare_inputs_labels_for_multimodal` (compared with `llava_arch_original.py`: the cut to
`actual_dims` is the port's change). The original TRIM (arXiv 2409.10994) selects by CLIP
similarity with an IQR rule; the port uses a fixed ratio (`PRUNING_RATIO`, the fraction dropped).

Per 384px view (a batch of V views, the same question embedding for each):
  feats   tower hidden states of `mm_vision_select_layer` (LLaDA-V: -2; the unpruned LLaDA-V
          tower uses the last layer)                               -> features: select_layer
  sim     post_layernorm(feats) @ text embedding (SigLIP text tower pooler output)
  score   softmax(-sim) over the view's N tokens: the port NEGATES, so it keeps the LEAST
          text-similar patches (the paper keeps the most similar)  -> similarity: negated | similar
  k       int(N * (1 - PRUNING_RATIO)) clamped to [1, N-1]        (ratio = 1 - PRUNING_RATIO)
  keep    torch.topk(score, k, sorted=False) -> a boolean mask -> the kept tokens in POSITION order
  mean    one token: the mean of the N - k discarded ones, at slot k -> append_mean: true
  pad     zeros to N rows; actual_dims = k + 1
Then the projector runs on the padded [V, N, d], anyres packing as usual, and each image's packed
features are cut to `actual_dims[image index]` = k + 1 rows: for an anyres image that is the base
view's kept tokens and the mean token, the tiles are dropped (`views: first`); `views: all` keeps
every view's k (+1) tokens instead, concatenated in view order (no newline tokens; our option).
The LLM sees the shorter sequence, positions 0..L'-1 (renumber).

On LaViDa-Dream (Table 2) the port is `LaViDa/eval/llava_trim/...` (same files; lmms-eval wrapper
`LaViDa/eval/lmms_eval/models/llava_dream.py` `generate_until` passes `texts=raw_questions`, the
lmms-eval context). Its differences are options (preset sweeps/prune/study_trim_lavida.yaml):
  k       int(N * k) with k = 0.1 written in token_reduction (the fraction KEPT, edited per row;
          ratio = k), clamped to [1, N]: for N = 729 the same k as int(N * (1 - (1 - k))) at every
          ratio 0.01 .. 0.99 (tests/test_trim_lavida.py); ratio 1 (k = N) indexes past the
          padded block in the port, here k <= N - 1                  -> `keep_count` unchanged
  text    the text model of a hard-coded siglip2-so400m-patch14-384 folder; `_encode_texts_chunked` takes `last_hidden_state[:, 0]` (the output has no
          `text_embeds`, the text model no `text_projection`), not the pooler; the context is
          not stripped                                   -> text_embedding: first_token, text_strip: false
  pooling none: llava_arch.py's image branch has no get_2dPool (only videos are pooled), so each
          view keeps N = 729 unpooled tower tokens, the packing is the unpooled 27x27 one, then the
          cut to k + 1 (not LaViDa's 196 pooled tokens per view)
          (dvlm_exp/engine/vision.py `trim_image_features` is the same path on both families)

The method acts in the vision path only (`tower_stage = "output"`: dvlm_exp/engine/vision.py
`trim_image_features`); in the decoder layer loop it does nothing.
"""

from __future__ import annotations

import torch

from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


@PRUNERS.register("trim")
class TRIM(PruneMethod):
    name = "trim"
    tower_stage = "output"
    needs_text_tower = True  # model.text_tower_path: checked before loading (dvlm_exp/run/validate.py)
    layer_fields = {}
    choices = {"similarity": ("negated", "similar"), "views": ("first", "all"),
               "features": ("select_layer", "last"), "append_mean": (True, False),
               "position_ids": ("renumber",), "rounding": ("floor",),
               "text_embedding": ("pooler", "first_token"), "text_strip": (True, False)}

    def __init__(self, similarity: str = "negated", views: str = "first", features: str = "select_layer",
                 append_mean: bool = True, rounding: str = "floor", position_ids: str = "renumber",
                 text_embedding: str = "pooler", text_strip: bool = True, **kwargs):
        super().__init__(rounding=rounding, position_ids=position_ids, **kwargs)
        for key, val in (("similarity", similarity), ("views", views), ("features", features),
                         ("text_embedding", text_embedding)):
            if val not in self.choices[key]:
                raise ValueError(f"prune.{key} must be one of {', '.join(self.choices[key])}, got {val!r}")
        self.similarity, self.views, self.features = similarity, views, features
        self.append_mean = bool(append_mean)
        self.text_embedding, self.text_strip = text_embedding, bool(text_strip)

    def decide(self, view):
        return None  # acts before the LLM only

    def keep_count(self, n: int) -> int:
        """The port's int(N * (1 - PRUNING_RATIO)) with PRUNING_RATIO = 1 - ratio, in [1, N-1]."""
        drop = 1.0 - self.ratio
        return max(1, min(n - 1, int(n * (1.0 - drop))))

    @torch.no_grad()
    def reduce(self, feats: torch.Tensor, normed: torch.Tensor, text: torch.Tensor):
        """feats / normed [V, N, dv] (before / after post_layernorm), text [1, dv] ->
        (features zero-padded to [V, N, dv], rows per view, kept indices per view)."""
        V, N, _ = feats.shape
        if N <= 1:
            return feats, N, [torch.arange(N)] * V
        t = text.to(device=normed.device, dtype=normed.dtype).expand(V, -1)
        sim = torch.matmul(normed, t.unsqueeze(2)).squeeze(2)  # [V, N]
        if self.similarity == "negated":
            sim = -sim
        score = torch.softmax(sim, dim=-1)
        k = self.keep_count(N)
        top = torch.topk(score, k, dim=1, largest=True, sorted=False).indices
        mask = torch.zeros(V, N, dtype=torch.bool, device=feats.device)
        mask[torch.arange(V, device=feats.device)[:, None], top] = True
        out = torch.zeros_like(feats)
        out[:, :k] = feats[mask].view(V, k, -1)
        rest = ~mask
        if self.append_mean:
            out[:, k] = (feats * rest.unsqueeze(-1)).sum(dim=1) / rest.sum(dim=1, keepdim=True)
        kept = [torch.nonzero(mask[v]).squeeze(1).cpu() for v in range(V)]
        return out, k + int(self.append_mean), kept
