"""Dream masked-diffusion sampling (Dream `generation_utils._sample`, as LaViDa-Dream runs it).

Differences from LLaDA's loop (dvlm_exp/decoding/sampler.py), read in LaViDa 284ef5c
`llava/model/language_model/dream/generation_utils.py` and `llada/generate.py`:

* **Shifted logits.** Dream predicts token i+1 at position i; `_sample` shifts the logits right
  by one (`cat(logits[:, :1], logits[:, :-1])`), so answer slot j reads the prediction made
  at sequence position P+j-1 and slot 0 the last prompt token's. The engine applies the shift
  when it picks the LM-head rows (`model.logit_shift = 1`); the rows this sampler asks for are
  answer slots as usual.
* **No blocks.** One pass over the whole answer: `steps = min(steps, gen_length)` forwards
  (block_length is not used).
* **Confidence rules** (`alg`), on the float32 softmax of the (temperature-scaled, top-p
  filtered) logits of the masked slots: `maskgit_plus` top-1 probability (the sampled token's
  when temperature > 0), `topk_margin` top-1 minus top-2, `entropy` sum p log(p + 1e-10)
  (negative entropy; higher = more certain).
* **Count per step.** `t = linspace(1, eps, grid_steps + 1)`; step i unmasks
  `int(n_masked * (1 - t[i+1] / t[i]))` slots, and all the remaining ones at the last step.
  `grid_steps` defaults to `steps`; the official code builds the grid from
  `min(generation_config.steps, max_new_tokens)` BEFORE `step_ratio` shortens the loop, so
  `step_ratio=r` is `steps=int(G*r), grid_steps=G` here. With `schedule="shift"` LaViDa's
  `get_num_transfer_tokens_sch` counts are used instead (`shift_schedule`, alpha = `shift`).
* **Choosing the slots.** top-k of the confidence, or with `alg_temp > 0`
  `multinomial(softmax(conf / alg_temp), k)` without replacement.

Nothing is banned and nothing stops the loop (the official image path passes no stopping
criteria); stop sequences given to `generate` only cut the returned ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvlm_exp.engine.state import Sequence
from dvlm_exp.decoding.sampler import SamplerConfig, find_stop

ALGS = ("maskgit_plus", "topk_margin", "entropy")
SCHEDULES = (None, "shift")


def shift_schedule(n_masked: int, steps: int, shift: float) -> list[int]:
    """LaViDa's `get_num_transfer_tokens_sch(..., schedule="shift")` for one row.

    s(t) = shift*t / (1 + (shift-1)*t) on linspace(0, 1, steps+1) (steps capped at n_masked),
    scaled by n_masked and truncated to int; per-step differences clamped to >= 1; the excess
    over n_masked removed one at a time round-robin from the first entries above 1; reversed.
    """
    steps = int(min(steps, n_masked))
    if steps <= 0:
        return []
    t = torch.linspace(0, 1, steps + 1)
    sig = shift * t / (1 + (shift - 1) * t)
    cum = (sig * n_masked).to(torch.int64)
    per = torch.clamp(cum[1:] - cum[:-1], 1, None).tolist()
    delta = sum(per) - n_masked
    j = 0
    while delta > 0:
        j %= len(per)
        if per[j] == 1:
            j += 1
            continue
        per[j] -= 1
        delta -= 1
        j += 1
    return per[::-1]


def confidence(logits: torch.Tensor, alg: str, temperature: float = 0.0, top_p: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of `logits` [n, V] (Dream's `sample_tokens`)."""
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {', '.join(ALGS)}, got {alg!r}")
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        conf = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


def transfer_counts(n_masked: int, steps: int, eps: float, grid_steps: int | None = None,
                    schedule: str | None = None, shift: float = 3.0) -> list[int] | None:
    """Per-step counts fixed in advance (shift schedule), or None for the timestep rule."""
    if schedule == "shift":
        return shift_schedule(n_masked, steps, shift)
    return None


class DreamSampler:
    def __init__(self, cfg: SamplerConfig, banned_ids: list[int] = (), alg: str = "maskgit_plus",
                 alg_temp: float | None = 0.0, eps: float = 1e-3, top_p: float | None = None,
                 schedule: str | None = None, shift: float = 3.0, grid_steps: int | None = None):
        if cfg.gen_length <= 0 or cfg.steps <= 0:
            raise ValueError("gen_length and steps must be positive")
        if alg not in ALGS:
            raise ValueError(f"model.sampler.alg must be one of {', '.join(ALGS)}, got {alg!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"model.sampler.schedule must be null or 'shift', got {schedule!r}")
        if not 0 < eps < 1:
            raise ValueError(f"model.sampler.eps must be in (0, 1), got {eps}")
        self.cfg = cfg
        self.banned_ids = list(banned_ids)
        self.alg, self.alg_temp, self.eps, self.top_p = alg, alg_temp, float(eps), top_p
        self.schedule, self.shift = schedule, float(shift)
        self.steps = min(cfg.steps, cfg.gen_length)
        self.grid_steps = self.steps if grid_steps is None else int(grid_steps)
        if self.grid_steps < self.steps:
            raise ValueError(f"grid_steps={self.grid_steps} < steps={self.steps} (the official loop would index past its grid)")

    def step_counts(self, n_masked: int) -> list[int]:
        """Slots unmasked at each step when nothing else intervenes (for plans and tests)."""
        fixed = transfer_counts(n_masked, self.steps, self.eps, self.grid_steps, self.schedule, self.shift)
        if fixed is not None:
            return fixed
        grid = torch.linspace(1, self.eps, self.grid_steps + 1)
        out, left = [], n_masked
        for i in range(self.steps):
            k = int(left * (1 - grid[i + 1] / grid[i])) if i < self.steps - 1 else left
            out.append(k)
            left -= k
        return out

    @torch.inference_mode()
    def generate(self, engine, seq: Sequence, stop_seqs: list[list[int]] | None = None,
                 trace: list | None = None) -> tuple[list[int], Sequence]:
        G = seq.gen_length
        mask_id = seq.mask_id
        ids = seq.response_ids.clone()
        seq.response_ids = ids
        grid = torch.linspace(1, self.eps, self.grid_steps + 1)
        if hasattr(engine, "begin_sample"):
            engine.begin_sample(self.steps)
        if getattr(engine, "prefix_prefill", False):
            # LaViDa's prefix_lm loop (dream/generation_utils.py): a prefill over the prompt fixes answer
            # slot 0 to the argmax of the last prompt row, then the steps count the G - 1 masked slots.
            # Our prefill is the step-0 forward (prefix mask: prompt rows never see the answer).
            out = engine.forward(seq, 0, torch.zeros(1, dtype=torch.long, device=ids.device))
            if out.keep is not None:
                seq = seq.keep_prompt(out.keep, getattr(out, "embeds", None))
            ids[0] = out.logits[0].argmax()
            seq.response_ids = ids
        fixed = transfer_counts(int((ids == mask_id).sum()), self.steps, self.eps, self.grid_steps,
                                self.schedule, self.shift)
        wants_conf = getattr(engine, "wants_confidence", False)
        all_rows = torch.arange(G, device=ids.device)
        for i in range(self.steps):
            is_mask = ids == mask_id
            masked = torch.nonzero(is_mask).squeeze(1)
            if masked.numel() == 0:
                break  # the official loop keeps running forwards that change nothing
            head = all_rows if self.cfg.head_rows == "all" else masked
            out = engine.forward(seq, i, head)
            if out.keep is not None:
                seq = seq.keep_prompt(out.keep, getattr(out, "embeds", None))
            logits = out.logits if head is masked else out.logits[masked]
            conf, x0 = confidence(logits, self.alg, self.cfg.temperature, self.top_p)
            n_mask = masked.numel()
            if fixed is not None:
                k = fixed[i] if i < len(fixed) else 0
            else:
                k = int(n_mask * (1 - grid[i + 1] / grid[i])) if i < self.steps - 1 else n_mask
            k = min(int(k), n_mask)
            if k > 0:
                if not self.alg_temp:
                    sel = torch.topk(conf, k).indices
                else:
                    sel = torch.multinomial(F.softmax(conf / self.alg_temp, dim=-1), num_samples=k)
                ids[masked[sel]] = x0[sel]
                if trace is not None:
                    trace.append(sorted(masked[sel].tolist()))
            seq.response_ids = ids
            if wants_conf:
                engine.observe(i, float(torch.softmax(logits.float(), dim=-1).amax(-1).mean()))
            if hasattr(engine, "after_step"):
                upd = engine.after_step(seq, i)
                if upd is not None:
                    seq = seq.keep_prompt(*upd)
        out_ids = ids.tolist()
        stop = find_stop(out_ids, [s for s in (stop_seqs or []) if s], None)
        return out_ids[: stop if stop is not None else G], seq
