"""LaViDa's Prefix-DLM (`model.prefix_cache`): prompt tokens never attend to answer tokens.

Official semantics (jacklishufan/LaViDa, models.md §3.6-3.7, §6.5). With `prefix_lm=True` the
official code runs one prefill over the prompt (image + text, bidirectional within the prompt),
keeps every layer's prompt K/V and then feeds only the answer at each step; the answer attends to
[cached prompt K/V, its own K/V] with no mask, and the cache is never appended to (LLaDA:
`past_key_values` passed with `use_cache=False`; Dream: `DreamPrefixLMCache.update` concatenates
without storing after the prefill). The prompt's K/V are therefore the same at every step. The
same numbers come out of one full forward with the prefix-LM mask (prompt rows see only prompt
columns, answer rows see everything; the flex-attention mask `kv < prompt_len or q >= prompt_len`
of modeling_llada.py): prompt rows do not depend on the answer, answer rows see it all.

`PrefixEngine(cache=True)` (`prefix_cache: true`): the first forward of a request (step 0) runs
the whole sequence with the prefix-LM mask and shows the method its `View` before every layer as
`Engine.forward` does (decide, score requests answered under the mask, attention edits, visual
skips); each layer stores the post-RoPE K/V of the prompt tokens that ran in it (after that
layer's pruning decisions). Later forwards run only the answer tokens: layer l attends to
[cached prompt K/V of layer l, fresh answer K/V]. Answer positions: `keep` gives slot j position
`prompt_len0 + j` (the official numbering when nothing is dropped); `renumber` gives it
(number of tokens before the answer in that layer in the first forward) + j, i.e. the cached
length of that layer, as Dream's `past_len + arange` and LLaDA's re-rotation of the concatenation.
Keys are cached post-RoPE with the positions they had in the first forward, so they agree with
the position policy (models.md §7.3).

`PrefixEngine(cache=False)` (`prefix_cache: mask_only`): every forward is the full forward with
the prefix-LM mask and nothing is cached. It is the exactness reference of the cache: with the
decisions replayed at the same layers (`persist: replay`), the cache gives the same answers
(tests/test_prefix_cache.py).

Pruning with the cache. Methods act only in the first forward (the prefill, models.md §7.8):
the cache of layers >= K holds only the kept tokens, layers < K keep all of them (as FastV in an
AR prefill). This equals `mask_only` with `persist: replay`; it is not `persist: state`, where
later steps drop the tokens in every layer (those layers' K/V would have to be recomputed, which
is what a cache avoids). Methods acting at a later step (at_step > 0, every_step, RedVTP's
after_step, persist none) are refused by `check_config` before loading and by the engine.

Dream (`logit_shift = 1`): slot j's logits come from position j-1, so slot 0's from the last
prompt row, which a later answer-only forward does not run. Under the prefix mask that row never
depends on the answer: the engine keeps its final hidden state from the first forward and reuses
it (the official code reads it once from the prefill: `first_token = prefill.logits[:, -1:]`).
Difference kept from the official Dream loop: it commits slot 0 = argmax of that row *before*
step 0 (not counted as a step, G-1 masks left); our DreamSampler treats slot 0 like every other
masked slot (same logits, chosen by the confidence rule at some step). LLaDA has no shift.

Compared with the default full-bidirectional run (no mask), the prefix mask is an approximation
(the released models were trained with full attention, LaViDa paper Table 3a): prompt hidden
states differ from layer 1 on, so answers may differ.

Recorder. First forward: every layer call (n, n) as it ran (the mask does not save work here);
later forwards: (G, cached prompt of that layer + G) per layer. The baseline stays the unpruned,
uncached full forward per step (`rec.forward`), so `reduction` shows the cache's saving too.
Probes (analysis) need full views at every step: refused with the cache on.
"""

from __future__ import annotations

import copy
import time

import torch

from dvlm_exp.engine.engine import Engine, ForwardOut, View, _lm_head
from dvlm_exp.engine.kv import PromptCache, cache_kwargs
from dvlm_exp.engine.state import Roles, Sequence

PREFIX_CACHE_MODES = (False, True, "mask_only")


def prefix_mask(roles: torch.Tensor) -> torch.Tensor:
    """[1, 1, n, n] boolean, True where query i may attend key j: j is a prompt token or i is an
    answer token (modeling_llada.py `prefix_lm_dllm`: kv < prompt_len or q >= prompt_len)."""
    resp = roles == Roles.RESPONSE
    return (resp[:, None] | ~resp[None, :])[None, None]


class _PrefixRows:
    """A ScoreRequest answered under the prefix mask: prompt rows see only the first `n_prompt`
    keys (the prompt always precedes the answer). Requests of answer rows only run unchanged."""

    def __init__(self, request, n_prompt: int):
        self.request = request
        self.n_prompt = n_prompt

    def compute(self, query, key, scaling, n_groups, value=None):
        req = self.request
        qi = req.query_index.to(key.device)
        if qi.numel() == 0 or bool((qi >= self.n_prompt).all()):
            return req.compute(query, key, scaling, n_groups, value)
        m = self.n_prompt
        req.compute(query, key, scaling, n_groups, value,
                    blocked=lambda q, cols: (q[:, None] < m) & (cols[None, :] >= m))  # prompt rows: no answer keys


class _PrefixEdit:
    """An attention edit under the prefix mask: its prompt rows are recomputed on the prompt keys
    only. Needs edits that name their `rows` (VisiPruner's ShallowEdit: optional per-row `sink`
    and a `sink_col`); other edits touching prompt rows are refused."""

    def __init__(self, edit, n_prompt: int):
        self.edit = edit
        self.n_prompt = n_prompt

    @property
    def flops(self):
        return getattr(self.edit, "flops", 0)

    def apply(self, query, key, value, scaling, n_groups, out):
        e, P = self.edit, self.n_prompt
        if not hasattr(e, "rows"):
            raise NotImplementedError(f"{type(e).__name__}: an attention edit without `rows` cannot run under the "
                                      "prefix-LM mask (model.prefix_cache)")
        rows = e.rows.to(key.device)
        for sel, n_keys in ((rows < P, P), (rows >= P, key.shape[2])):
            if not bool(sel.any()):
                continue
            sub = copy.copy(e)
            sub.rows = e.rows[sel.cpu()]
            if getattr(e, "sink", None) is not None:
                sub.sink = e.sink[sel.cpu()]
                if n_keys == P and e.sink_col is not None and e.sink_col >= P:
                    sub.sink = None
            if getattr(e, "vis", None) is not None:
                sub.vis = e.vis[e.vis < n_keys]
            sub.flops = 0
            out = sub.apply(query, key[:, :, :n_keys], value[:, :, :n_keys], scaling, n_groups, out)
            e.flops += sub.flops
        return out


class PrefixEngine(Engine):
    """Prefix-DLM forwards: `cache=True` caches the prompt K/V at the first forward of a request
    and runs only the answer afterwards; `cache=False` runs the full prefix-masked forward at
    every step (reference)."""

    def __init__(self, model, pruner=None, schedule=None, recorder=None, position_ids: str = "keep",
                 persist: str | None = None, probes=(), cache: bool = True):
        super().__init__(model, pruner, schedule, recorder, position_ids=position_ids, persist=persist, probes=probes)
        self.cache = bool(cache)
        if self.cache and self.probes:
            raise ValueError("probes need the full sequence at every step: not available with model.prefix_cache=true")
        self._kv: PromptCache | None = None

    def begin_sample(self, total_steps: int) -> None:
        super().begin_sample(total_steps)
        self._kv = None
        self._resp_pos0: list[int] = []  # per layer: position id of answer slot 0 in the first forward
        self._cached_visual: list[int] = []  # per layer: visual tokens in its cache
        self._tail: torch.Tensor | None = None  # [1, shift, d] final hidden of the last prompt row(s)
        self._acted: set[int] = set()  # steps whose method decisions were taken (a prefill may share step 0)

    @property
    def prefix_prefill(self) -> bool:
        """Shifted-logit models (LaViDa-Dream): the official prefix_lm loop runs a prefill that fixes
        answer slot 0 to the last prompt row's argmax before its denoising steps (DreamSampler does)."""
        return bool(getattr(self.model, "logit_shift", 0))

    # ------------------------------------------------------------------ forwards
    @torch.inference_mode()
    def forward(self, seq: Sequence, step: int, response_rows: torch.Tensor | None) -> ForwardOut:
        if self.cache and self._kv is not None:
            if self.method is not None and self.schedule.acts_at(step) and step not in self._acted:
                raise RuntimeError(f"model.prefix_cache=true: the method acts at step {step}, after the prompt was "
                                   "cached (only step-0 decisions are supported; see check_config)")
            return self._answer_forward(seq, step, response_rows)
        if self.cache and self.method is not None and self.persist == "none":
            raise RuntimeError("model.prefix_cache=true caches the pruned prompt: schedule.persist=none is not supported")
        return self._full_forward(seq, step, response_rows)

    def _full_forward(self, seq: Sequence, step: int, response_rows: torch.Tensor | None) -> ForwardOut:
        """Engine.forward's layer loop with the prefix-LM mask (and K/V capture with the cache)."""
        m = self.model
        rec = self.recorder
        dev = seq.prompt_embeds.device
        resp_embeds = m.embed_tokens(seq.response_ids)
        hidden = torch.cat([seq.prompt_embeds, resp_embeds.to(seq.prompt_embeds.dtype)])[None]
        roles = seq.all_roles()
        positions = seq.all_positions()
        n_in = hidden.shape[1]
        idx = torch.arange(n_in, device=dev)
        pos_ids = positions if self.position_ids == "keep" else idx  # rotary position of each current token
        cos_sin = self._rotary(hidden, pos_ids)
        capture = self.cache
        kv = PromptCache() if capture else None
        if capture:
            self._resp_pos0, self._cached_visual = [], []

        method = self.method
        # A step's decisions are taken once: the Dream prefill and the loop's first step share step 0.
        acting = method is not None and self.schedule.acts_at(step) and step not in self._acted
        if acting:
            self._acted.add(step)
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
                if d.transient is not None:
                    raise RuntimeError("model.prefix_cache=true caches what each layer kept: a Decision with "
                                       "transient tokens (prune.recycled_persist=none) is not supported")
                hidden, view = self._apply(d, hidden, view)
                idx = idx[view.last_keep]
                if self.position_ids == "keep":
                    pos_ids = pos_ids[view.last_keep]
                    cos_sin = (cos_sin[0][:, view.last_keep], cos_sin[1][:, view.last_keep])
                else:
                    pos_ids = torch.arange(hidden.shape[1], device=dev)
                    cos_sin = self._rotary(hidden, pos_ids)
                pruned = True
                rec.current.scoring_s += time.perf_counter() - t0
            request = method.score_request(view) if acting else None
            skip = method is not None and method.skips_visual(view)
            n_vis = view.n_visual
            if capture:  # the answer's numbering in this layer, reused by the answer-only forwards
                self._resp_pos0.append(int(pos_ids[pos_ids.numel() - seq.gen_length]))
            if skip and n_vis:
                if request is not None:
                    raise RuntimeError(f"{method.name}: a score request in a layer its visual tokens skip ({li})")
                sub = torch.nonzero(view.roles != Roles.VISUAL).squeeze(1)
                sub_roles = view.roles[sub]
                if capture:
                    kv.n_prompt = int((sub_roles != Roles.RESPONSE).sum())
                    self._cached_visual.append(0)
                out = layer(hidden[:, sub], attention_mask=prefix_mask(sub_roles),
                            position_embeddings=(cos_sin[0][:, sub], cos_sin[1][:, sub]), **cache_kwargs(layer, kv))
                hidden = hidden.clone()
                hidden[:, sub] = out
                rec.layer(step, li, sub.numel(), sub.numel(), 0)
                continue
            n_prompt = int((view.roles != Roles.RESPONSE).sum())
            probe_reqs = [r for r in (p.score_request(view) for p in self.probes) if r is not None]
            reqs = [_PrefixRows(r, n_prompt) for r in ([request] if request is not None else []) + probe_reqs]
            kwargs = {"dvlm_score": reqs[0] if len(reqs) == 1 else reqs} if reqs else {}
            edit = method.attention_edit(view) if acting else None
            if edit is not None:
                kwargs["dvlm_edit"] = _PrefixEdit(edit, n_prompt)
            if capture:
                kv.n_prompt = n_prompt
                self._cached_visual.append(n_vis)
            hidden = layer(hidden, attention_mask=prefix_mask(view.roles), position_embeddings=cos_sin,
                           **cache_kwargs(layer, kv), **kwargs)
            if request is not None:
                rec.current.scoring_flops += request.flops
                rec.current.scoring_s += request.seconds
                view.scores[li] = request
            if edit is not None:
                rec.current.scoring_flops += int(getattr(edit, "flops", 0))
            n = hidden.shape[1]
            rec.layer(step, li, n, n, n_vis)
        self._last_scores = view.scores

        shift = int(getattr(m, "logit_shift", 0))
        G = seq.gen_length
        if capture:
            kv.capture = False
            self._kv = kv
            self._tail = hidden[:, hidden.shape[1] - G - shift : hidden.shape[1] - G].clone() if shift else None
        if response_rows is None:
            rows = torch.arange(hidden.shape[1], device=dev)
        else:
            rows = hidden.shape[1] - G + response_rows - shift
        out = m.norm(hidden[:, rows])
        logits = _lm_head(m.lm_head, out)[0].float()
        n_rows = int(rows.numel())
        rec.forward(seq.full_length, n_rows, seq.full_length if response_rows is None else n_rows)
        if self.probes:
            view.layer, view.hidden = len(m.layers), hidden
            for p in self.probes:
                p.after_forward(view, logits, rows)
        keep = embeds = None
        # With the cache the prompt state stays whole: the cache holds what each layer kept.
        if pruned and acting and self.persist == "state" and not capture:
            n_prompt = seq.prompt_embeds.shape[0]
            sel = idx < n_prompt
            keep = idx[sel]
            if view.merged:
                embeds = view.embeds0[: int(sel.sum())]
        return ForwardOut(logits=logits, keep=keep, embeds=embeds)

    def _answer_forward(self, seq: Sequence, step: int, response_rows: torch.Tensor | None) -> ForwardOut:
        """Only the answer runs; each layer attends to its cached prompt K/V (never appended)."""
        m = self.model
        rec = self.recorder
        kv = self._kv
        G = seq.gen_length
        x = m.embed_tokens(seq.response_ids)[None].to(seq.prompt_embeds.dtype)
        offs = torch.arange(G, device=x.device)
        rot: dict[int, tuple] = {}
        for li, layer in enumerate(m.layers):
            p0 = self._resp_pos0[li]
            if p0 not in rot:
                rot[p0] = self._rotary(x, p0 + offs)
            x = layer(x, attention_mask=None, position_embeddings=rot[p0], **cache_kwargs(layer, kv))
            rec.layer(step, li, G, kv.get_seq_length(li) + G, self._cached_visual[li])
        shift = int(getattr(m, "logit_shift", 0))
        full = torch.cat([self._tail, x], dim=1) if shift else x  # row r + shift <-> answer row r
        rows = offs if response_rows is None else response_rows.to(x.device)
        out = m.norm(full[:, rows])  # slot j reads answer row j - shift (slot 0 of Dream: the kept prompt row)
        logits = _lm_head(m.lm_head, out)[0].float()
        n_rows = int(rows.numel())
        rec.forward(seq.full_length, n_rows, n_rows)
        return ForwardOut(logits=logits, keep=None)

    def after_step(self, seq: Sequence, step: int):
        if self.cache and self.method is not None and hasattr(self.method, "after_step") \
                and self.schedule.acts_at(step):
            raise RuntimeError(f"{self.method.name} prunes after the sampler's step (after_step): not supported with "
                               "model.prefix_cache=true (the prompt K/V are already cached)")
        return super().after_step(seq, step)


def check_config(cfg) -> None:
    """Before loading: the prefix cache only takes methods that act at step 0 and persist."""
    from dvlm_exp.errors import ConfigError

    mode = cfg.model.get("prefix_cache", False)
    if mode not in PREFIX_CACHE_MODES:
        raise ConfigError(f"model.prefix_cache={mode} must be false, true or mask_only")
    if mode is not True or cfg.prune.name == "none":
        return
    sc = cfg.schedule
    step0 = sc.name == "first_step" or (sc.name == "at_step" and sc.get("step") == 0) or \
        (sc.name == "start_frac" and float(sc.get("frac", 0.5)) == 0.0)
    if not step0:
        raise ConfigError(f"model.prefix_cache=true caches the prompt at step 0: schedule={sc.name} acts later; use "
                          "schedule=first_step (or model.prefix_cache=mask_only / false)")
    if sc.get("persist") == "none":
        raise ConfigError("model.prefix_cache=true keeps the step-0 pruning in the cache: schedule.persist=none is "
                          "not supported")
    if cfg.prune.get("recycled_persist") == "none":
        raise ConfigError("model.prefix_cache=true caches what each layer kept: prune.recycled_persist=none (tokens "
                          "only the pruning forward sees) is not supported; use model.prefix_cache=mask_only / false")
    from dvlm_exp.registry import PRUNERS

    if hasattr(PRUNERS.get(cfg.prune.name), "after_step"):
        raise ConfigError(f"prune={cfg.prune.name} prunes after a step (after_step): not supported with "
                          "model.prefix_cache=true")
