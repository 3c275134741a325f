"""Autoregressive decoding through the engine's layer loop: causal prefill, then greedy decode
with a per-layer KV cache that holds only what each layer kept.

`AREngine` subclasses `Engine` to reuse its method plumbing (schedule, keep ratio, `View`,
`_apply` for Decisions, `_merge_keep`, rotary gathering); the diffusion `Engine.forward` is not
used. The prefill shows the active method a `View` before every layer exactly as
`Engine.forward` does (decide -> score_request -> attention_edit, skips_visual); methods act only
there (the schedule is asked once, `acts_at(0)`), as FastV / VisiPruner / SparseVLM do in an AR
model. A layer's K/V go into a transformers `DynamicCache` (post-RoPE keys) for the tokens that
ran in that layer: after a pruning decision before layer K, layers >= K cache only the kept
tokens, and every decode step attends to that pruned cache.

Causality. The attention function (engine/attention.py) forces `is_causal=False` (it was written
for bidirectional LLaDA), so the prefill passes an explicit boolean lower-triangular mask over
the current (sorted, possibly pruned) tokens; a decode step has one query and needs none. Score
rows (`ScoreRequest.compute`) and attention edits ignore masks: here requests whose query rows are
not all the last position are answered with a causal row computation (`_CausalRows`), and edits
with a `rows` attribute (VisiPruner's ShallowEdit) are applied row by row on the keys a causal row
sees (`_CausalEdit`).

Positions. `keep` (FastV, VisiPruner): survivors keep their original ids, decode token t sits at
`prompt_len0 + t` in every layer. `renumber`: each layer numbers its own tokens 0.., so decode
token t of layer l sits at that layer's cache length.

Recorder: prefill layer calls (n, n) and decode calls (1, cache length + 1) per layer; the
baseline is the same decode with nothing pruned (`baseline_layer_calls`); one LM-head row per
forward.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dvlm_exp.engine.engine import Engine, View, _lm_head
from dvlm_exp.engine.kv import cache_kwargs
from dvlm_exp.engine.state import Roles, Sequence
from dvlm_exp.decoding.sampler import find_stop


@dataclass
class ARState:
    """What the decode steps need from the prefill."""

    cache: DynamicCache
    prompt_len0: int
    cache_roles: list = field(default_factory=list)  # per layer: roles of the cached tokens
    fed: int = 0  # tokens decoded so far (fed back one at a time)

    def cache_len(self, layer: int) -> int:
        return int(self.cache_roles[layer].numel())


def causal_mask(n: int, device) -> torch.Tensor:
    """[1, 1, n, n] boolean, True where query i may attend key j (j <= i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]


class _CausalRows:
    """A ScoreRequest answered under a causal mask: row i of the current sequence sees keys 0..i.

    Rows that all sit at the last position see every key: then the request's own `compute` runs
    unchanged (FastV's last_token, VisiPruner's last input token)."""

    def __init__(self, request):
        self.request = request

    def compute(self, query, key, scaling, n_groups, value=None):
        req = self.request
        n = key.shape[2]
        qi = req.query_index.to(key.device)
        if qi.numel() == 0 or bool((qi == n - 1).all()):
            return req.compute(query, key, scaling, n_groups, value)
        req.compute(query, key, scaling, n_groups, value,
                    blocked=lambda q, cols: cols[None, :] > q[:, None])  # future keys


class _CausalEdit:
    """An attention edit applied causally: each edited row r only sees keys 0..r.

    Works for edits that name their `rows` (and optional per-row `sink`, `vis`, `sink_col`, as
    VisiPruner's ShallowEdit): the edit runs once per row on the truncated keys. Other edits are
    applied as they are (non-causal rows: approximate)."""

    def __init__(self, edit):
        self.edit = edit

    @property
    def flops(self):
        return getattr(self.edit, "flops", 0)

    def apply(self, query, key, value, scaling, n_groups, out):
        e = self.edit
        if not hasattr(e, "rows"):
            return e.apply(query, key, value, scaling, n_groups, out)
        rows = e.rows.tolist()
        for i, r in enumerate(rows):
            sub = copy.copy(e)
            sub.rows = torch.tensor([r])
            if getattr(e, "vis", None) is not None:
                sub.vis = e.vis[e.vis <= r]
            if getattr(e, "sink", None) is not None:
                sub.sink = e.sink[i : i + 1]
                if e.sink_col is None or e.sink_col > r:
                    sub.sink = None
            sub.flops = 0
            out = sub.apply(query, key[:, :, : r + 1], value[:, :, : r + 1], scaling, n_groups, out)
            e.flops += sub.flops
        return out


class AREngine(Engine):
    """Prefill + cached decode for causal models (LLaVA baselines)."""

    def _cos_sin_at(self, hidden: torch.Tensor, pos: int):
        return self.model.rotary_emb(hidden, torch.tensor([[pos]], device=hidden.device))

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> tuple[torch.Tensor, ARState]:
        """Causal forward over the prompt (text + visual) with the method's per-layer hooks.
        Returns the float32 logits of the last prompt position [V] and the decode state."""
        m = self.model
        rec = self.recorder
        if seq.gen_length:
            raise ValueError("the AR prefill takes a prompt without response slots")
        hidden = seq.prompt_embeds[None]
        dev = hidden.device
        roles = seq.all_roles()
        positions = seq.all_positions()
        n_in = hidden.shape[1]
        cos_sin = self._rotary(hidden, positions if self.position_ids == "keep" else torch.arange(n_in, device=dev))
        method = self.method
        acting = method is not None and self.schedule.acts_at(0)
        view = View(step=0, layer=0, n_layers=len(m.layers), seq=seq, roles=roles, positions=positions,
                    hidden=hidden, embeds0=hidden[0], ratio=self._ratio(0), acting=acting)
        if acting and hasattr(method, "begin_forward"):
            t0 = time.perf_counter()
            method.begin_forward(view)
            rec.current.scoring_s += time.perf_counter() - t0
        state = ARState(cache=DynamicCache(), prompt_len0=seq.prompt_len0)
        masks: dict[int, torch.Tensor] = {}

        def mask(n: int) -> torch.Tensor:
            if n not in masks:
                masks[n] = causal_mask(n, dev)
            return masks[n]

        for li, layer in enumerate(m.layers):
            view.layer, view.hidden = li, hidden
            if acting:
                t0 = time.perf_counter()
                d = method.decide(view)
                rec.current.scoring_s += time.perf_counter() - t0
                if d is not None:
                    t0 = time.perf_counter()
                    rec.current.scoring_flops += int(d.flops)
                    hidden, view = self._apply(d, hidden, view)
                    keep = view.last_keep
                    cos_sin = ((cos_sin[0][:, keep], cos_sin[1][:, keep]) if self.position_ids == "keep"
                               else self._rotary(hidden, torch.arange(hidden.shape[1], device=dev)))
                    rec.current.scoring_s += time.perf_counter() - t0
            request = method.score_request(view) if acting else None
            skip = method is not None and method.skips_visual(view)
            n_vis = view.n_visual
            if skip and n_vis:
                if request is not None:
                    raise RuntimeError(f"{method.name}: a score request in a layer its visual tokens skip ({li})")
                sub = torch.nonzero(view.roles != Roles.VISUAL).squeeze(1)
                out = layer(hidden[:, sub], attention_mask=mask(sub.numel()),
                            position_embeddings=(cos_sin[0][:, sub], cos_sin[1][:, sub]),
                            **cache_kwargs(layer, state.cache))
                hidden = hidden.clone()
                hidden[:, sub] = out
                state.cache_roles.append(view.roles[sub].clone())
                rec.layer(0, li, sub.numel(), sub.numel(), 0)
                continue
            probe_reqs = [r for r in (p.score_request(view) for p in self.probes) if r is not None]
            reqs = [_CausalRows(r) for r in ([request] if request is not None else []) + probe_reqs]
            kwargs = {"dvlm_score": reqs[0] if len(reqs) == 1 else reqs} if reqs else {}
            edit = method.attention_edit(view) if acting else None
            if edit is not None:
                kwargs["dvlm_edit"] = _CausalEdit(edit)
            n = hidden.shape[1]
            hidden = layer(hidden, attention_mask=mask(n), position_embeddings=cos_sin,
                           **cache_kwargs(layer, state.cache), **kwargs)
            if request is not None:
                rec.current.scoring_flops += request.flops
                rec.current.scoring_s += request.seconds
                view.scores[li] = request
            if edit is not None:
                rec.current.scoring_flops += int(getattr(edit, "flops", 0))
            state.cache_roles.append(view.roles.clone())
            rec.layer(0, li, n, n, n_vis)
        self._last_scores = view.scores
        logits = _lm_head(m.lm_head, m.norm(hidden[:, -1:]))[0, -1].float()
        self._count_forward(n_q_base=seq.prompt_len0, n_k_base=seq.prompt_len0)
        if self.probes:
            view.layer, view.hidden = len(m.layers), hidden
            rows = torch.tensor([hidden.shape[1] - 1], device=dev)
            for p in self.probes:
                p.after_forward(view, logits[None], rows)
        return logits, state

    @torch.inference_mode()
    def decode(self, state: ARState, token_id: int) -> torch.Tensor:
        """Feed one generated token; it attends to each layer's (pruned) cache. Returns logits [V]."""
        m = self.model
        rec = self.recorder
        t = state.fed
        x = m.embed_tokens(torch.tensor([[token_id]], device=m.device))
        shared = self._cos_sin_at(x, state.prompt_len0 + t) if self.position_ids == "keep" else None
        for li, layer in enumerate(m.layers):
            cs = shared if shared is not None else self._cos_sin_at(x, state.cache_len(li))
            x = layer(x, attention_mask=None, position_embeddings=cs, **cache_kwargs(layer, state.cache))
            state.cache_roles[li] = torch.cat([state.cache_roles[li], state.cache_roles[li].new_full((1,), Roles.RESPONSE)])
            n_k = state.cache_len(li)
            rec.layer(t + 1, li, 1, n_k, int((state.cache_roles[li] == Roles.VISUAL).sum()))
        state.fed += 1
        logits = _lm_head(m.lm_head, m.norm(x))[0, -1].float()
        self._count_forward(n_q_base=1, n_k_base=state.prompt_len0 + state.fed)
        return logits

    def _count_forward(self, n_q_base: int, n_k_base: int) -> None:
        """One forward: one LM-head row; its unpruned baseline is every layer at (n_q, n_k)."""
        cur = self.recorder.current
        cur.n_forwards += 1
        cur.lm_head_rows += 1
        cur.baseline_lm_head_rows += 1
        cur.baseline_layer_calls[(n_q_base, n_k_base)] += len(self.model.layers)


class GreedyARSampler:
    """Greedy decoding: argmax per step; stop on EOS, a stop sequence (token ids) or max_new_tokens.

    Same interface as MaskedDiffusionSampler.generate, so the Generator runs either."""

    def __init__(self, max_new_tokens: int, eos_ids: list[int], temperature: float = 0.0):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature:
            raise ValueError(f"the AR baselines decode greedily: temperature must be 0, got {temperature}")
        self.max_new_tokens = int(max_new_tokens)
        self.eos_ids = set(int(i) for i in eos_ids)

    def generate(self, engine: AREngine, seq: Sequence, stop_seqs: list[list[int]] | None = None,
                 trace: list | None = None) -> tuple[list[int], Sequence]:
        stop_seqs = [s for s in (stop_seqs or []) if s]
        engine.begin_sample(1)  # methods act at the prefill only (schedule step 0)
        logits, state = engine.prefill(seq)
        out: list[int] = []
        while True:
            tok = int(logits.argmax())
            if tok in self.eos_ids:
                break
            out.append(tok)
            if trace is not None:
                trace.append(tok)
            if stop_seqs:
                pos = find_stop(out, stop_seqs, None)
                if pos is not None:
                    out = out[:pos]
                    break
            if len(out) >= self.max_new_tokens:
                break
            logits = engine.decode(state, tok)
        return out, seq
