"""The analysis probes: they record through the engine and never decide."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Roles


KEY_TYPES = ("visual", "text", "answer")
QUERY_GROUPS = ("answer", "masked", "unmasked")
CONTRIB_FIELDS = ("n_visual", "min_cos", "mean_cos", "frac_below", "mean_norm", "max_norm",
                  "visual_share", "cos_without_visual")
CONF_FIELDS = ("n_masked", "n_unmasked", "p_masked", "p_unmasked", "p_all",
               "logit_masked", "logit_unmasked", "logit_all")
ANALYSIS_VERSION = 1


# ---------------------------------------------------------------------------------- probes
class _Probe:
    """Per-sample bookkeeping shared by the probes: `samples` holds one dict per sample.

    `begin_sample(sample_id)` starts a new one (scripts/analyze.py calls it per document); without
    it a forward at a step this sample already finished starts a new sample by itself."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.current: dict | None = None
        self._done_steps: set = set()

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id}

    def begin_sample(self, sample_id=None) -> None:
        self.current = self._new(len(self.samples) if sample_id is None else sample_id)
        self.samples.append(self.current)
        self._done_steps = set()

    def _sample(self, step: int) -> dict:
        if self.current is None or step in self._done_steps:
            self.begin_sample()
        return self.current

    def score_request(self, view):
        return None

    def after_forward(self, view, logits, rows) -> None:
        self._done_steps.add(view.step)


class AttentionProbe(_Probe):
    """Answer -> {visual, text, answer} attention fractions per (step, layer) and query group,
    plus (``contributions=True``) the visual tokens' contribution statistics."""

    def __init__(self, contributions: bool = True, contrib_threshold: float = 0.995):
        super().__init__()
        self.contributions = bool(contributions)
        self.contrib_threshold = float(contrib_threshold)
        self._pending = None

    def _new(self, sample_id) -> dict:
        # attention rows: [step, layer, group index, n query rows, f_visual, f_text, f_answer]
        return {"sample_id": sample_id, "attention": [], "contrib": []}

    def begin_sample(self, sample_id=None) -> None:
        self._pending = None
        super().begin_sample(sample_id)

    def score_request(self, view):
        self._flush()
        self._sample(view.step)
        q = view.response_index
        if q.numel() == 0:
            return None
        c = self.contributions and view.n_visual > 0
        req = ScoreRequest(q, keep_rows=not c, keep_heads=c, keep_values=c)
        self._pending = (view.step, view.layer, req, view.roles.clone(), view.seq.is_mask.clone())
        return req

    def after_forward(self, view, logits, rows) -> None:
        self._flush()
        super().after_forward(view, logits, rows)

    def _flush(self) -> None:
        if self._pending is None:
            return
        step, layer, req, roles, is_mask = self._pending
        self._pending = None
        if req.column_mean is None:  # never computed (the layer did not run with it)
            return
        heads = req.heads
        probs = req.rows if req.rows is not None else heads.mean(0)  # [r, n] head-mean rows
        roles = roles.to(probs.device)
        onehot = torch.stack([roles == Roles.VISUAL, roles == Roles.TEXT, roles == Roles.RESPONSE], 1)
        mass = probs @ onehot.to(probs.dtype)  # [r, 3]
        is_mask = is_mask.to(probs.device)
        out = self.current["attention"]
        for g, sel in enumerate((None, is_mask, ~is_mask)):
            m = mass if sel is None else mass[sel]
            if m.shape[0]:
                out.append([step, layer, g, int(m.shape[0]), *m.mean(0).tolist()])
        if heads is not None:
            vis = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
            qsel = is_mask if bool(is_mask.any()) else torch.ones_like(is_mask)
            self.current["contrib"].append([step, layer, *contribution_stats(
                heads[:, qsel], req.values, vis, self.contrib_threshold)])


def contribution_stats(heads: torch.Tensor, values: torch.Tensor, vis: torch.Tensor,
                       threshold: float = 0.995) -> list[float]:
    """VisiPruner's statistics for query rows `heads` [h, r, n] (averaged per head, as the
    method's masked_response query set) and values [h, n, dh]: see CONTRIB_FIELDS."""
    from dvlm_exp.pruning.visipruner import contributions

    if vis.numel() == 0:
        return [0] + [float("nan")] * (len(CONTRIB_FIELDS) - 1)
    cos, norms = contributions(SimpleNamespace(heads=heads, values=values), vis)
    a = heads.mean(dim=1)  # [h, n]
    o = torch.einsum("hn,hnd->hd", a, values).reshape(-1)
    c_sum = torch.einsum("hn,hnd->hd", a[:, vis], values[:, vis]).reshape(-1)  # all visual tokens
    share = float(c_sum.norm() / o.norm().clamp_min(1e-30))
    cos_wo = float(F.cosine_similarity((o - c_sum)[None], o[None], dim=-1))
    return [int(vis.numel()), float(cos.min()), float(cos.mean()), float((cos < threshold).float().mean()),
            float(norms.mean()), float(norms.max()), share, cos_wo]


class ConfidenceProbe(_Probe):
    """Per step: top-1 probability and top-1 logit of the answer rows (masked / unmasked / all),
    and the sampler's confidence signal."""

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id, "steps": [], "sampler": []}  # steps: [step, *CONF_FIELDS]

    def after_forward(self, view, logits, rows) -> None:
        s = self._sample(view.step)
        G = view.seq.gen_length
        offs = (rows - (view.roles.numel() - G)).to(view.seq.response_ids.device)
        is_mask = view.seq.is_mask[offs].to(logits.device)
        lg = logits.double()
        top = lg.max(dim=-1).values
        p = torch.exp(top - torch.logsumexp(lg, dim=-1))

        def mean(x, sel):
            x = x[sel]
            return float(x.mean()) if x.numel() else float("nan")

        s["steps"].append([view.step, int(is_mask.sum()), int((~is_mask).sum()),
                           mean(p, is_mask), mean(p, ~is_mask), float(p.mean()),
                           mean(top, is_mask), mean(top, ~is_mask), float(top.mean())])
        super().after_forward(view, logits, rows)

    def observe(self, step: int, confidence: float) -> None:
        if self.current is not None:
            self.current["sampler"].append([int(step), float(confidence)])


class KeptProbe(_Probe):
    """The visual tokens alive at every (step, layer), as indices into the sample's visual
    tokens (original order). `segments`: [step, first layer, last layer, indices] runs."""

    def _new(self, sample_id) -> dict:
        return {"sample_id": sample_id, "n_visual": 0, "visual_positions": [], "segments": []}

    def score_request(self, view):
        s = self._sample(view.step)
        if not s["visual_positions"] and view.step == 0:
            seq = view.seq  # the state at the start of the first forward: every visual token
            s["visual_positions"] = seq.positions[seq.roles == Roles.VISUAL].tolist()
            s["n_visual"] = len(s["visual_positions"])
        pos0 = torch.tensor(s["visual_positions"], dtype=torch.long)
        pos = view.positions[view.roles == Roles.VISUAL].cpu()
        idx = torch.searchsorted(pos0, pos).tolist() if pos0.numel() else []
        seg = s["segments"][-1] if s["segments"] else None
        if seg is not None and seg[0] == view.step and seg[3] == idx:
            seg[2] = view.layer
        else:
            s["segments"].append([view.step, view.layer, view.layer, idx])
        return None


def _segments(sample: dict) -> list:
    return sample["kept_segments"] if "kept_segments" in sample else sample["segments"]


def kept_at(sample: dict, step: int, layer: int) -> list[int] | None:
    """Visual token indices alive at (step, layer) of a KeptProbe sample (a layer the probe did
    not see, e.g. one the visual tokens skipped, takes the last run before it); None: no data."""
    found = None
    for st, lo, hi, idx in _segments(sample):
        if st == step and lo <= layer:
            found = idx
    return found


def final_kept(sample: dict, step: int) -> list[int] | None:
    """The visual tokens the last layer of `step` saw."""
    segs = [s for s in _segments(sample) if s[0] == step]
    return segs[-1][3] if segs else None
