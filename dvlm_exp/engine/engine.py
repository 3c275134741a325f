"""The engine owns the decoder layer loop; pruning happens here and only here.

Models expose parts (token embedding, decoder layers, final norm, LM head, rotary
embedding); methods say which visual tokens to keep. Per forward the engine shows the active
method a `View` before every layer: the method may ask for attention rows of that layer
(`score_request`), edit a few attention rows (`attention_edit`), take a `Decision` (keep / merge visual tokens: the engine gathers hidden
states and rotary embeddings), or let visual tokens bypass the layer (`skips_visual`).
After the sampler has unmasked, `after_step` lets a method prune the persistent state
(RedVTP). The schedule says at which steps a method acts and how its decisions persist:
  state   the kept (and merged) prompt tokens become the state: later steps run shortened
          in every layer (LLaDA-FastV, RedVTP, the dMLLM study's ports)
  replay  later steps re-apply the same decisions at the same layers (AR-prefill-like)
  none    nothing persists: each acting step selects from the full set (every_step)
An `after_step` decision always persists as state (it prunes what later steps run on).

Probes (analysis, dvlm_exp/analysis) watch without deciding: at every forward they may ask
for score rows per layer (`score_request(view)`, not counted as method overhead) and see the
final view and logits (`after_forward(view, logits, rows)`); `observe(step, confidence)` gets
the sampler's per-step signal.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.recorder import Recorder
from dvlm_exp.engine.state import Decision, Roles, Sequence

PERSIST_MODES = ("state", "replay", "none")


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [rows, V] float32
    keep: torch.Tensor | None  # sorted indices into the input prompt when tokens were dropped
    embeds: torch.Tensor | None = None  # merged input embeddings of the kept prompt tokens


@dataclass
class View:
    """What a method sees before layer `layer` of the forward at global step `step`.

    `hidden` [1, n, d] are the current hidden states (read only); `embeds0` [n, d] the input
    embeddings of the same tokens; `roles` / `positions` (original indices) per token;
    `scores` maps layer -> ScoreRequest answered in this forward (and, in `after_step`, the
    forward just run). `layer == n_layers` after the last layer. `ratio` is the keep ratio the
    schedule gives this step; `k()` turns it into a count of the sample's original visual tokens.
    """

    step: int
    layer: int
    n_layers: int
    seq: Sequence
    roles: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor | None
    embeds0: torch.Tensor
    ratio: float
    acting: bool
    scores: dict = field(default_factory=dict)
    merged: bool = False  # a merge happened in this forward (embeds0 holds merged rows)
    last_keep: torch.Tensor | None = None  # the last decision's gather indices
    transient: torch.Tensor | None = None  # bool per current token: not persisted (Decision.transient)

    @property
    def visual_index(self) -> torch.Tensor:
        return torch.nonzero(self.roles == Roles.VISUAL).squeeze(1)

    @property
    def n_visual(self) -> int:
        return int((self.roles == Roles.VISUAL).sum())

    @property
    def response_index(self) -> torch.Tensor:
        return torch.nonzero(self.roles == Roles.RESPONSE).squeeze(1)

    def masked_response_index(self) -> torch.Tensor:
        """Positions (in the current sequence) of response slots still masked."""
        resp = self.response_index
        return resp[self.seq.is_mask.to(resp.device)]

    def k(self, ratio: float | None = None, rounding: str = "round") -> int:
        from dvlm_exp.pruning.base import keep_count

        r = self.ratio if ratio is None else ratio
        return min(self.n_visual, keep_count(self.seq.n_visual0, r, rounding))


class Engine:
    def __init__(self, model, pruner=None, schedule=None, recorder: Recorder | None = None,
                 position_ids: str = "keep", persist: str | None = None, probes=()):
        if position_ids not in ("keep", "renumber"):
            raise ValueError(f"position_ids must be 'keep' or 'renumber', got {position_ids!r}")
        self.model = model
        self.pruner = pruner
        self.schedule = schedule
        self.recorder = recorder or Recorder()
        self.position_ids = position_ids
        self.persist = persist or getattr(schedule, "persist", "state")
        if self.persist not in PERSIST_MODES:
            raise ValueError(f"persist must be one of {PERSIST_MODES}, got {self.persist!r}")
        self._replay: list[tuple[int, Decision]] = []
        self.probes = list(probes)
        self._last_scores: dict = {}
        self._total_steps = 0

    # ------------------------------------------------------------------ helpers
    @property
    def method(self):
        p = self.pruner
        return p if p is not None and getattr(p, "active", True) and self.schedule is not None else None

    def begin_sample(self, total_steps: int) -> None:
        """Reset per-sample state (replayed decisions, schedule triggers)."""
        self._replay = []
        self._last_scores = {}
        self._total_steps = int(total_steps)
        if self.schedule is not None and hasattr(self.schedule, "begin"):
            self.schedule.begin(self._total_steps)
        if self.method is not None and hasattr(self.method, "begin_sample"):
            self.method.begin_sample()

    @property
    def wants_confidence(self) -> bool:
        return (self.method is not None and hasattr(self.schedule, "observe")) or \
            any(hasattr(p, "observe") for p in self.probes)

    def observe(self, step: int, confidence: float) -> None:
        """The sampler's per-step signal (mean top-1 probability of the still-masked slots)."""
        if self.method is not None and hasattr(self.schedule, "observe"):
            self.schedule.observe(step, confidence)
        for p in self.probes:
            if hasattr(p, "observe"):
                p.observe(step, confidence)

    def _ratio(self, step: int) -> float:
        base = float(getattr(self.pruner, "ratio", 1.0))
        f = getattr(self.schedule, "ratio_at", None)
        return base if f is None else float(f(step, base))

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.model.rotary_emb(hidden, positions[None])

    @torch.inference_mode()
    def forward(self, seq: Sequence, step: int, response_rows: torch.Tensor | None) -> ForwardOut:
        """One denoising forward.

        `response_rows`: offsets into the response whose logits are needed (None: every row
        of the sequence, for tests and analysis). Returns float32 logits for those rows and,
        when the decisions persist as state, the kept prompt indices (and merged embeddings).
        """
        m = self.model
        rec = self.recorder
        dev = seq.prompt_embeds.device
        resp_embeds = m.embed_tokens(seq.response_ids)
        hidden = torch.cat([seq.prompt_embeds, resp_embeds.to(seq.prompt_embeds.dtype)])[None]
        roles = seq.all_roles()
        positions = seq.all_positions()
        n_in = hidden.shape[1]
        idx = torch.arange(n_in, device=dev)  # current token -> index in this forward's input
        cos_sin = self._rotary(hidden, positions if self.position_ids == "keep" else idx)

        method = self.method
        acting = method is not None and self.schedule.acts_at(step)
        if acting and self.persist == "replay":
            self._replay = []
        replay = self._replay if (method is not None and not acting and self.persist == "replay") else []
        view = View(step=step, layer=0, n_layers=len(m.layers), seq=seq, roles=roles, positions=positions,
                    hidden=hidden, embeds0=hidden[0], ratio=self._ratio(step), acting=acting)
        if acting and hasattr(method, "begin_forward"):
            t0 = time.perf_counter()
            method.begin_forward(view)
            rec.current.scoring_s += time.perf_counter() - t0
        pruned = False
        for li, layer in enumerate(m.layers):
            view.layer, view.hidden = li, hidden
            decisions = []
            if acting:
                t0 = time.perf_counter()
                d = method.decide(view)
                rec.current.scoring_s += time.perf_counter() - t0
                if d is not None:
                    decisions.append(d)
                    if self.persist == "replay":
                        self._replay.append((li, d))
            else:
                decisions += [d for (l, d) in replay if l == li]
            for d in decisions:
                t0 = time.perf_counter()
                if acting:
                    rec.current.scoring_flops += int(d.flops)
                hidden, view = self._apply(d, hidden, view)
                idx = idx[view.last_keep]
                cos_sin = ((cos_sin[0][:, view.last_keep], cos_sin[1][:, view.last_keep])
                           if self.position_ids == "keep"
                           else self._rotary(hidden, torch.arange(hidden.shape[1], device=dev)))
                pruned = True
                rec.current.scoring_s += time.perf_counter() - t0
            request = method.score_request(view) if acting else None
            skip = method is not None and method.skips_visual(view)
            n_vis = view.n_visual
            if skip and n_vis:
                if request is not None:
                    raise RuntimeError(f"{method.name}: a score request in a layer its visual tokens skip ({li})")
                sub = torch.nonzero(view.roles != Roles.VISUAL).squeeze(1)
                out = layer(hidden[:, sub], attention_mask=None,
                            position_embeddings=(cos_sin[0][:, sub], cos_sin[1][:, sub]))
                hidden = hidden.clone()
                hidden[:, sub] = out
                rec.layer(step, li, sub.numel(), sub.numel(), 0)
                continue
            probe_reqs = [r for r in (p.score_request(view) for p in self.probes) if r is not None]
            reqs = ([request] if request is not None else []) + probe_reqs
            kwargs = {"dvlm_score": reqs[0] if len(reqs) == 1 else reqs} if reqs else {}
            edit = method.attention_edit(view) if acting else None
            if edit is not None:
                kwargs["dvlm_edit"] = edit
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin, **kwargs)
            if request is not None:
                rec.current.scoring_flops += request.flops
                rec.current.scoring_s += request.seconds
                view.scores[li] = request
            if edit is not None:
                rec.current.scoring_flops += int(getattr(edit, "flops", 0))
            n = hidden.shape[1]
            rec.layer(step, li, n, n, n_vis)
        self._last_scores = view.scores

        if response_rows is None:
            rows = torch.arange(hidden.shape[1], device=dev)
        else:
            # logit_shift: models that predict slot i at position i-1 (Dream) read shifted rows
            rows = hidden.shape[1] - seq.gen_length + response_rows - int(getattr(m, "logit_shift", 0))
        out = m.norm(hidden[:, rows])
        logits = _lm_head(m.lm_head, out)[0].float()
        n_rows = int(rows.numel())
        baseline_rows = seq.full_length if response_rows is None else n_rows
        rec.forward(seq.full_length, n_rows, baseline_rows)
        if self.probes:
            view.layer, view.hidden = len(m.layers), hidden
            for p in self.probes:
                p.after_forward(view, logits, rows)
        keep = embeds = None
        if pruned and acting and self.persist == "state":
            n_prompt = seq.prompt_embeds.shape[0]
            sel = idx < n_prompt
            if view.transient is not None:
                sel &= ~view.transient
            keep = idx[sel]
            if view.merged:
                embeds = view.embeds0[sel]
        return ForwardOut(logits=logits, keep=keep, embeds=embeds)

    def _apply(self, d: Decision, hidden: torch.Tensor, view: View):
        """Gather (and merge) the current tokens by a Decision; returns new hidden and view."""
        vis = view.visual_index
        keep = d.keep.to(vis.device)
        merged = view.merged
        emb0 = view.embeds0
        if d.merges:
            hidden = hidden.clone()
            hidden[0] = _merge_rows(hidden[0], vis, d)
            emb0 = _merge_rows(emb0, vis, d)
            merged = True
        keep_all = _merge_keep(view.roles, keep)
        hidden = hidden[:, keep_all]
        roles = view.roles[keep_all]
        transient = None if view.transient is None else view.transient[keep_all]
        if d.transient is not None and d.transient.numel():
            # visual slot i of the new sequence holds keep[i] (_merge_keep)
            if transient is None:
                transient = torch.zeros(keep_all.numel(), dtype=torch.bool, device=keep_all.device)
            transient[torch.nonzero(roles == Roles.VISUAL).squeeze(1)[d.transient.to(keep_all.device)]] = True
        nv = View(step=view.step, layer=view.layer, n_layers=view.n_layers, seq=view.seq,
                  roles=roles, positions=view.positions[keep_all], hidden=hidden,
                  embeds0=emb0[keep_all], ratio=view.ratio, acting=view.acting, scores=view.scores,
                  merged=merged, last_keep=keep_all, transient=transient)
        return hidden, nv

    def after_step(self, seq: Sequence, step: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """After the sampler's unmasking at `step`: a method may prune the persistent state
        (RedVTP). Returns (kept prompt indices, merged embeddings or None), or None."""
        method = self.method
        if method is None or not self.schedule.acts_at(step) or not hasattr(method, "after_step"):
            return None
        t0 = time.perf_counter()
        roles = seq.all_roles()
        emb0 = torch.cat([seq.prompt_embeds, self.model.embed_tokens(seq.response_ids).to(seq.prompt_embeds.dtype)])
        view = View(step=step, layer=len(self.model.layers), n_layers=len(self.model.layers), seq=seq, roles=roles,
                    positions=seq.all_positions(), hidden=None, embeds0=emb0, ratio=self._ratio(step),
                    acting=True, scores=self._last_scores)
        d = method.after_step(view)
        result = None
        if d is not None:
            _, nv = self._apply(d, emb0[None], view)
            n_prompt = seq.prompt_embeds.shape[0]
            keep_all = nv.last_keep
            sel = keep_all < n_prompt
            keep = keep_all[sel]
            result = (keep, nv.embeds0[: int(sel.sum())] if nv.merged else None)
        self.recorder.current.scoring_s += time.perf_counter() - t0
        return result


def _merge_rows(x: torch.Tensor, vis: torch.Tensor, d: Decision) -> torch.Tensor:
    """x [n, d]: kept visual rows become weighted means of themselves and what folds into them."""
    kept_rows = vis[d.keep.to(vis.device)]
    kw = (torch.ones(kept_rows.numel(), device=x.device) if d.keep_w is None else d.keep_w.to(x.device)).float()
    w = d.merge_w.to(x.device).float() if d.merge_w is not None else torch.ones(d.merge_src.numel(), device=x.device)
    dst = d.merge_dst.to(x.device)
    num = x[kept_rows].float() * kw[:, None]
    num.index_add_(0, dst, x[vis[d.merge_src.to(vis.device)]].float() * w[:, None])
    den = kw.clone().index_add_(0, dst, w)
    out = x.clone()
    out[kept_rows] = (num / den[:, None]).to(x.dtype)
    return out


# On CPU in float32, the LM head over a few answer rows (a small-M GEMM against the whole
# vocabulary) is slow through MKL's GEMM, which repacks the [V, d] weight on every call:
# ~40-60 GFLOP/s against ~105 for the decoder's GEMMs. oneDNN's linear with the weight
# reordered once (cached per head, redone when the weight changes) runs it ~2x faster
# (scripts/bench.py --profile). Each logit is the same dot product over d, summed in another
# order: the logits agree to float32 rounding (a few ulp). The official code's own bits come
# from one GEMM over every position; that path (more than _HEAD_FAST_MAX_ROWS rows, which is
# where the golden logits are compared) is untouched, and the golden generation tests (ids and
# unmasking order) pass through this one. Without oneDNN, or for another dtype, device or a
# wrapped head, the head runs as itself.
_HEAD_FAST_MAX_ROWS = 64
_PACKED_HEADS: "weakref.WeakKeyDictionary[torch.nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # x [M, d] @ w[V, d].T


def _onednn_head_available() -> bool:
    """oneDNN's linear is there. Its FLOPs are made known to torch.utils.flop_counter (through
    the registration API, at import: a FlopCounterMode copies the registry when it is made), so
    counting FLOPs around the engine still counts the head (tests/test_flops.py)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = torch.ops.mkldnn._linear_pointwise
    if op not in flop_registry and op.default not in flop_registry:
        register_flop_formula(op)(_linear_pointwise_flops)
    return True


_ONEDNN_HEAD = _onednn_head_available()


def _packed_weight(head: torch.nn.Linear) -> torch.Tensor:
    w = head.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = _PACKED_HEADS.get(head)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        _PACKED_HEADS[head] = hit
    return hit[1]


def _lm_head(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (type(head) is not torch.nn.Linear or x.device.type != "cpu" or x.dtype != torch.float32
            or head.weight.dtype != torch.float32 or x.shape[-2] > _HEAD_FAST_MAX_ROWS or not _ONEDNN_HEAD
            or (torch.is_grad_enabled() and (x.requires_grad or head.weight.requires_grad))):
        return head(x)  # a wrapped or custom head, or one gradients flow through, runs as itself
    b = head.bias
    lead = x.shape[:-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), _packed_weight(head),
                                           None if b is None else b.detach(), "none", [], "")
    return y.reshape(*lead, y.shape[-1])


def _merge_keep(roles: torch.Tensor, keep_vis: torch.Tensor) -> torch.Tensor:
    """Sequence indices of all non-visual tokens plus the kept visual ones, in sequence order.
    The kept visual tokens fill the slots of the kept visual tokens in the order `keep_vis`
    gives them (sorted: unchanged; a score order re-orders them, the dMLLM study's FastV port)."""
    vis_idx = torch.nonzero(roles == Roles.VISUAL).squeeze(1)
    keep_mask = roles != Roles.VISUAL
    keep_mask[vis_idx[keep_vis]] = True
    out = torch.nonzero(keep_mask).squeeze(1)
    if keep_vis.numel() > 1 and bool((keep_vis[1:] < keep_vis[:-1]).any()):
        out[roles[out] == Roles.VISUAL] = vis_idx[keep_vis]
    return out
