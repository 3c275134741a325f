"""The engine owns the decoder layer loop; pruning happens here and only here.

Models expose parts (token embedding, decoder layers, final norm, LM head, rotary
embedding); methods say which visual tokens to keep. The engine runs one forward over a
`Sequence`, asks the method for attention rows at layer K-1 and for the kept visual indices
at layer K, gathers hidden states and rotary embeddings, and records what ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.recorder import Recorder
from dvlm_exp.engine.state import Roles, Sequence


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [rows, V] float32
    keep: torch.Tensor | None  # sorted indices into the input prompt when tokens were dropped


@dataclass
class PrunePlan:
    """A pruning decision to take inside this forward (built from method + schedule)."""

    method: object  # dvlm_exp.pruning.base.PruneMethod
    layer: int  # K: first layer that sees the pruned sequence


class Engine:
    def __init__(self, model, pruner=None, schedule=None, recorder: Recorder | None = None,
                 position_ids: str = "keep"):
        if position_ids not in ("keep", "renumber"):
            raise ValueError(f"position_ids must be 'keep' or 'renumber', got {position_ids!r}")
        self.model = model
        self.pruner = pruner
        self.schedule = schedule
        self.recorder = recorder or Recorder()
        self.position_ids = position_ids

    # ------------------------------------------------------------------ helpers
    def plan_for(self, step: int) -> PrunePlan | None:
        if self.pruner is None or not self.pruner.active or self.schedule is None:
            return None
        if not self.schedule.acts_at(step):
            return None
        return PrunePlan(self.pruner, self.pruner.layer)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.model.rotary_emb(hidden, positions[None])

    @torch.inference_mode()
    def forward(self, seq: Sequence, step: int, response_rows: torch.Tensor | None) -> ForwardOut:
        """One denoising forward.

        `response_rows`: offsets into the response whose logits are needed (None: every row
        of the sequence, for tests and analysis). Returns float32 logits for those rows and,
        when tokens were dropped, the kept prompt indices (for persistent pruning).
        """
        m = self.model
        rec = self.recorder
        dev = seq.prompt_embeds.device
        resp_embeds = m.embed_tokens(seq.response_ids)
        hidden = torch.cat([seq.prompt_embeds, resp_embeds.to(seq.prompt_embeds.dtype)])[None]
        roles = seq.all_roles()
        positions = seq.all_positions() if self.position_ids == "keep" else torch.arange(seq.length, device=dev)
        cos_sin = self._rotary(hidden, positions)

        plan = self.plan_for(step)
        keep_prompt = None
        request = None
        n_vis = int((roles == Roles.VISUAL).sum())
        for li, layer in enumerate(m.layers):
            if plan is not None and li == plan.layer:
                t0 = time.perf_counter()
                keep_vis = plan.method.select(
                    n_visual=n_vis, scores=None if request is None else request.column_mean[roles == Roles.VISUAL]
                )
                keep_all = _merge_keep(roles, keep_vis)
                hidden = hidden[:, keep_all]
                roles = roles[keep_all]
                if self.position_ids == "keep":
                    cos_sin = (cos_sin[0][:, keep_all], cos_sin[1][:, keep_all])
                else:
                    cos_sin = self._rotary(hidden, torch.arange(hidden.shape[1], device=dev))
                n_prompt = seq.prompt_embeds.shape[0]
                keep_prompt = keep_all[keep_all < n_prompt]
                n_vis = int((roles == Roles.VISUAL).sum())
                rec.current.scoring_s += time.perf_counter() - t0
            request = None
            if plan is not None and plan.method.needs_attention and li == plan.layer - 1:
                request = ScoreRequest(plan.method.query_index(roles, seq))
            kwargs = {"dvlm_score": request} if request is not None else {}
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, **kwargs)
            if request is not None:
                rec.current.scoring_flops += request.flops
                rec.current.scoring_s += request.seconds
            n = hidden.shape[1]
            rec.layer(step, li, n, n, n_vis)

        if response_rows is None:
            rows = torch.arange(hidden.shape[1], device=dev)
        else:
            rows = hidden.shape[1] - seq.gen_length + response_rows
        out = m.norm(hidden[:, rows])
        logits = _lm_head(m.lm_head, out)[0].float()
        n_rows = int(rows.numel())
        baseline_rows = seq.full_length if response_rows is None else n_rows
        rec.forward(seq.full_length, n_rows, baseline_rows)
        return ForwardOut(logits=logits, keep=keep_prompt)


# On CPU in float32, the LM head over a few answer rows (a small-M GEMM against the whole
# vocabulary) runs ~20% faster split into vocabulary chunks (scripts/bench.py). Each logit is
# the same dot product over d, and the bits equal the single GEMM's (checked for 1-64 rows
# on MKL, and by the golden parity tests). bfloat16 on CPU gets slower when split: not done.
_HEAD_CHUNK = 2048
_HEAD_CHUNK_MAX_ROWS = 64


def _lm_head(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (type(head) is not torch.nn.Linear or x.device.type != "cpu" or x.dtype != torch.float32
            or x.shape[-2] > _HEAD_CHUNK_MAX_ROWS):
        return head(x)  # a wrapped or custom head runs as itself
    w, b = head.weight, head.bias
    return torch.cat([F.linear(x, w[i : i + _HEAD_CHUNK], None if b is None else b[i : i + _HEAD_CHUNK])
                      for i in range(0, w.shape[0], _HEAD_CHUNK)], dim=-1)


def _merge_keep(roles: torch.Tensor, keep_vis: torch.Tensor) -> torch.Tensor:
    """Sorted sequence indices of all non-visual tokens plus the kept visual ones."""
    vis_idx = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
    keep_mask = roles != Roles.VISUAL
    keep_mask[vis_idx[keep_vis]] = True
    return torch.nonzero(keep_mask).squeeze(1)
