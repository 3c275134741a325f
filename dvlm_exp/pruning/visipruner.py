"""VisiPruner (arXiv 2510.17205; EIT-NLP/VisiPruner). methods.md §4.6.

Three stages, all inside the forward of an acting step (the authors act in the AR prefill):

  shallow  layers < shallow_mid_layer: the attention probabilities from text queries to visual
           keys are set to 0 after the softmax, WITHOUT renormalising the row; no token is
           removed. Done with the engine's `attention_edit` hook: SDPA still computes the layer,
           and only the text rows after the image are recomputed explicitly (a few rows).
  middle   layers > shallow_mid_layer (the layer shallow_mid_layer itself is in no stage, as in
           the code), until it triggers: for the query row(s) the contribution of visual token
           i to the attention output is c_i = concat over heads of a_{q,i} v_i, and
           o = concat over heads of sum over ALL keys of a_{q,j} v_j. The first layer where some
           cos(o - c_i, o) < layer_threshold is the fusion layer; the tokens with
           ||c_i||_2 > tokens_threshold survive, from the next layer on (positions kept).
  deep     at every later layer, if removing no remaining visual token's contribution gives
           cos(o - c_i, o) < deep_exit_cos, a counter goes up; when it reaches
           deep_exit_patience, all visual tokens are dropped before the next layer.

Details taken from the authors' code (`llava/model/language_model/custom_modeling_llama.py`,
read, not copied):
  - the deep counter is CUMULATIVE: a layer where a token still matters adds 0 but does not
    reset it (`exit_indicator += bool`). `deep_consecutive: true` resets it instead.
  - the shallow rows are the positions after the image (`attn_weights[:, :, vis_end:, vis]`);
    in an AR prefill nothing before the image can see it. A bidirectional dLLM's prompt prefix
    does see the image: `shallow_rows: all_text` zeroes its rows too (default `after_image`,
    the code's rows; "after" = after the first visual token).
  - layer 0 is model-specific in the code: 7B zeroes every query's visual attention from the
    image on (vision->vision too) and moves the text rows' removed mass onto the FIRST visual
    token (a sink proxy, `shallow_layer0: sink`); 13B zeroes vision->vision and text->first half
    of the image (not implemented); other sizes leave layer 0 alone (`shallow_layer0: none`).
    LLaDA-V has no counterpart; the default `cross` treats layer 0 like layers 1..mid-1.
  - the code's tokens_threshold is an L2 norm of c_i: its scale is LLaVA-1.5-7B's (hidden size
    4096, head_dim 128, fp16 values). On another model the absolute thresholds (0.2 here) mean
    something else: calibrate before reading results. layer_threshold / deep_exit_cos are
    cosines and transfer better.

dLLM port choices (methods.md §4.6 [inf]):
  query_set  the code's query is the last input token of the prefill, the one that predicts the
             first answer token. A dLLM predicts from the masked response slots, so the default
             is `masked_response` (the slots still masked at the acting step; all response slots
             when none is), with the attention rows AVERAGED over the queries per head: c_i and o
             are then the mean over queries of the per-query contributions and outputs, and
             o - c_i is the mean output with token i removed. `last_prompt_token` is the AR-like
             counterpart, `last_token` the literal code (a response mask slot in a dLLM).
  steps      the stages act at the schedule's acting steps. With `state` persistence the final
             kept prompt (after a deep exit: no image) becomes every later step's sequence; with
             `replay` later steps re-apply the middle and deep decisions at the same layers, as
             the authors' pruned KV cache does for decoded tokens, and skip the shallow edit
             (the code masks only the prefill).
  ratio      ignored: the kept count is adaptive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Decision, Roles
from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS

QUERY_SETS = ("last_prompt_token", "masked_response", "last_token")
STAGES = ("shallow", "middle", "deep")
LAYER0 = ("cross", "sink", "none")
SHALLOW_ROWS = ("after_image", "all_text")

_MAX_BLOCK_ELEMENTS = 1 << 24


class ShallowEdit:
    """Recompute the attention output of `rows` with the probabilities of the visual key columns
    `vis` set to 0 after the softmax (no renormalisation). Rows flagged in `sink` get the removed
    mass back on key column `sink_col` (VisiPruner's 7B layer-0 variant)."""

    def __init__(self, rows: torch.Tensor, vis: torch.Tensor, sink: torch.Tensor | None = None,
                 sink_col: int | None = None):
        self.rows = rows
        self.vis = vis
        self.sink = sink
        self.sink_col = sink_col
        self.flops = 0

    def apply(self, query, key, value, scaling, n_groups, out):
        # query [1, h, n, dh] (post-RoPE); key / value [1, h_kv, n, dh]; out [1, n, h, dh] (SDPA's)
        k = repeat_kv(key, n_groups)[0].float()
        v = repeat_kv(value, n_groups)[0].float()
        h, n, dh = k.shape
        rows = self.rows.to(k.device)
        vis = self.vis.to(k.device)
        out = out.clone()
        chunk = max(1, _MAX_BLOCK_ELEMENTS // max(1, h * n))
        for s in range(0, rows.numel(), chunk):
            idx = rows[s : s + chunk]
            q = query[0][:, idx].float()  # [h, c, dh]
            p = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scaling, dim=-1)  # [h, c, n]
            if self.sink is not None:
                mass = p[:, :, vis].sum(-1)  # [h, c]
            p[:, :, vis] = 0.0
            if self.sink is not None:
                sel = self.sink[s : s + chunk].to(k.device)
                p[:, sel, self.sink_col] = mass[:, sel]
            o = torch.matmul(p, v)  # [h, c, dh]
            out[0, idx] = o.transpose(0, 1).to(out.dtype)
        self.flops += 4 * h * rows.numel() * n * dh  # q.k^T and p.v for the recomputed rows
        return out


def contributions(req: ScoreRequest, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(o - c_i, o), ||c_i||) for the visual key columns `vis`, from a request with per-head
    probabilities and values; the query rows are averaged per head."""
    a = req.heads.mean(dim=1)  # [h, n]
    v = req.values  # [h, n, dh]
    o = torch.einsum("hn,hnd->hd", a, v).reshape(-1)  # [h*dh]: concat over heads
    c = (a[:, vis, None] * v[:, vis]).transpose(0, 1).reshape(vis.numel(), -1)  # [nv, h*dh]
    cos = F.cosine_similarity(o[None] - c, o[None].expand_as(c), dim=-1)
    return cos, c.norm(dim=-1)


@PRUNERS.register("visipruner")
class VisiPruner(PruneMethod):
    layer_fields = {"shallow_mid_layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    choices = {"query_set": QUERY_SETS}
    name = "visipruner"
    needs_attention = True

    def __init__(self, shallow_mid_layer: int = 6, layer_threshold: float = 0.995, tokens_threshold: float = 0.2,
                 deep_exit_cos: float = 0.999, deep_exit_patience: int = 2, query_set: str = "masked_response",
                 stages=STAGES, shallow_layer0: str = "cross", shallow_rows: str = "after_image",
                 deep_consecutive: bool = False, position_ids: str = "keep", **kwargs):
        kwargs.pop("layer", None)
        super().__init__(position_ids=position_ids, **kwargs)
        self.shallow_mid_layer = int(shallow_mid_layer)
        self.layer_threshold = float(layer_threshold)
        self.tokens_threshold = float(tokens_threshold)
        self.deep_exit_cos = float(deep_exit_cos)
        self.deep_exit_patience = int(deep_exit_patience)
        self.query_set = query_set
        self.stages = tuple(stages)
        self.shallow_layer0 = shallow_layer0
        self.shallow_rows = shallow_rows
        self.deep_consecutive = bool(deep_consecutive)
        if query_set not in QUERY_SETS:
            raise ValueError(f"prune.query_set must be one of {', '.join(QUERY_SETS)}, got {query_set!r}")
        if not set(self.stages) <= set(STAGES):
            raise ValueError(f"prune.stages must be a subset of {list(STAGES)}, got {list(self.stages)}")
        if "deep" in self.stages and "middle" not in self.stages:
            raise ValueError("prune.stages: 'deep' acts on the middle stage's survivors and needs 'middle'")
        if shallow_layer0 not in LAYER0:
            raise ValueError(f"prune.shallow_layer0 must be one of {', '.join(LAYER0)}, got {shallow_layer0!r}")
        if shallow_rows not in SHALLOW_ROWS:
            raise ValueError(f"prune.shallow_rows must be one of {', '.join(SHALLOW_ROWS)}, got {shallow_rows!r}")
        if self.shallow_mid_layer < 0:
            raise ValueError(f"prune.shallow_mid_layer must be >= 0, got {self.shallow_mid_layer}")
        if self.deep_exit_patience < 1:
            raise ValueError(f"prune.deep_exit_patience must be >= 1, got {self.deep_exit_patience}")
        self._reset()

    # ----------------------------------------------------------------- per-forward state
    def _reset(self) -> None:
        self._phase = "middle" if "middle" in self.stages else "done"
        self._exit_count = 0
        self.fusion_layer: int | None = None  # layer whose attention triggered the middle stage
        self.exit_layer: int | None = None  # first layer without visual tokens after a deep exit

    def begin_sample(self) -> None:
        self._reset()

    def begin_forward(self, view) -> None:
        self._reset()

    # ----------------------------------------------------------------- engine hooks
    def query_index(self, view) -> torch.Tensor:
        roles = view.roles
        if self.query_set == "last_token":
            return torch.tensor([roles.numel() - 1], device=roles.device)
        if self.query_set == "last_prompt_token":
            return torch.nonzero(roles != Roles.RESPONSE).squeeze(1)[-1:]
        idx = view.masked_response_index()
        return idx if idx.numel() else view.response_index

    def score_request(self, view) -> ScoreRequest | None:
        li = view.layer
        # nothing can act after the last layer: no rows there
        if li >= view.n_layers - 1 or view.n_visual == 0 or self._phase == "done":
            return None
        if self._phase == "middle" and li <= self.shallow_mid_layer:
            return None
        req = ScoreRequest(self.query_index(view), keep_heads=True, keep_values=True)
        req.extra["visipruner"] = self._phase
        return req

    def decide(self, view) -> Decision | None:
        if view.layer == 0:
            self._reset()
        req = view.scores.get(view.layer - 1)
        if req is None or "visipruner" not in req.extra or view.n_visual == 0:
            return None
        stage = req.extra["visipruner"]
        cos, norms = contributions(req, view.visual_index)
        if stage == "middle" and self._phase == "middle":
            if not bool((cos < self.layer_threshold).any()):
                return None
            self.fusion_layer = view.layer - 1
            self._phase = "deep" if "deep" in self.stages else "done"
            keep = torch.nonzero(norms > self.tokens_threshold).squeeze(1)
            if keep.numel() == 0:
                self._phase = "done"
            return None if keep.numel() == view.n_visual else Decision(keep=keep.cpu())
        if stage == "deep" and self._phase == "deep":
            if bool((cos < self.deep_exit_cos).any()):
                if self.deep_consecutive:
                    self._exit_count = 0
                return None
            self._exit_count += 1
            if self._exit_count >= self.deep_exit_patience:
                self._phase = "done"
                self.exit_layer = view.layer
                return Decision(keep=torch.empty(0, dtype=torch.long))
        return None

    def attention_edit(self, view):
        li = view.layer
        if "shallow" not in self.stages or li >= self.shallow_mid_layer or view.n_visual == 0:
            return None
        if li == 0 and self.shallow_layer0 == "none":
            return None
        roles = view.roles
        vis = view.visual_index
        pos = torch.arange(roles.numel(), device=roles.device)
        text = roles != Roles.VISUAL
        if self.shallow_rows == "after_image":
            text = text & (pos > vis[0])
        text_rows = torch.nonzero(text).squeeze(1)
        if li == 0 and self.shallow_layer0 == "sink":
            # 7B layer 0: every query from the image on loses its visual attention (vision->vision
            # included); the text rows' removed mass goes to the first visual token
            rows = torch.nonzero(text | (pos >= vis[0])).squeeze(1)
            sink = text[rows]
            return ShallowEdit(rows, vis, sink=sink, sink_col=int(vis[0]))
        if text_rows.numel() == 0:
            return None
        return ShallowEdit(text_rows, vis)

    def select(self, view, scores):  # pragma: no cover - VisiPruner decides in `decide`
        raise NotImplementedError
