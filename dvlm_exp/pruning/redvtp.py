"""RedVTP: response-driven visual token pruning (arXiv 2511.12428; methods.md §3.2).

A visual token's importance is the attention it receives from the response slots that are
still masked after the acting step (block 0, step 0 under `schedule=first_step`), averaged
over the heads (per-head softmax, then mean) and over ALL decoder layers of that step's
forward, then over those query rows. The acting step itself runs in full; after the sampler
has unmasked, `after_step` keeps the top max(1, int(N * ratio)) visual tokens (indices sorted
ascending) and the engine slices the persistent state, so every later step runs on the
shortened sequence in every layer. The authors' code slices the sequence and lets positions
default, i.e. renumbers them (conf/prune/redvtp.yaml).

Query sets (`query_set`):
  masked_response  response slots masked when the forward ran and still masked after the
                   step's transfer (the paper's code)
  response         every response slot (a variant for analysis)

Scores are requested as rows (one per response slot masked at the forward, every layer) with
`keep_rows`, so only those rows of each layer's attention are computed and SDPA still gives
the layer outputs; which rows count is known only after the transfer. Pruning is skipped when
no masked response slot remains (as the paper's code). The paper runs this once (block 0,
step 0); other schedules call it at each of their acting steps.
"""

from __future__ import annotations

import torch

from dvlm_exp.engine.attention import ScoreRequest
from dvlm_exp.engine.state import Decision
from dvlm_exp.pruning.base import PruneMethod, topk_sorted
from dvlm_exp.registry import PRUNERS

QUERY_SETS = ("masked_response", "response")


@PRUNERS.register("redvtp")
class RedVTP(PruneMethod):
    choices = {"query_set": QUERY_SETS}
    name = "redvtp"
    needs_attention = True

    def __init__(self, query_set: str = "masked_response", rounding: str = "floor", **kwargs):
        super().__init__(rounding=rounding, **kwargs)
        if query_set not in QUERY_SETS:
            raise ValueError(f"prune.query_set must be one of {', '.join(QUERY_SETS)}, got {query_set!r}")
        self.query_set = query_set
        self.last_importance: torch.Tensor | None = None  # [N_vis] scores of the last decision (analysis)

    # ----------------------------------------------------------------- engine hooks
    def decide(self, view) -> Decision | None:
        return None  # the acting forward runs in full; pruning happens in after_step

    def score_request(self, view) -> ScoreRequest | None:
        if view.n_visual == 0:
            return None
        q = view.response_index if self.query_set == "response" else view.masked_response_index()
        if q.numel() == 0:
            return None
        req = ScoreRequest(q, keep_rows=True)
        n = view.roles.numel()
        # which response slot each row is (the response always ends the sequence), and where
        # the visual tokens sit in this layer's sequence
        req.extra["slots"] = q - (n - view.seq.gen_length)
        req.extra["visual"] = view.visual_index
        return req

    def importance(self, view) -> torch.Tensor | None:
        """[N_vis] layer- and head-mean attention from the query slots (still masked after the
        transfer for `masked_response`) to each current visual token; None if no query."""
        reqs = [view.scores[li] for li in sorted(view.scores)]
        reqs = [r for r in reqs if r is not None and r.rows is not None]
        if not reqs:
            return None
        n_vis = view.n_visual
        total = None
        for req in reqs:
            slots = req.extra["slots"].to(req.rows.device)
            if self.query_set == "masked_response":
                still = view.seq.is_mask.to(slots.device)[slots]
            else:
                still = torch.ones_like(slots, dtype=torch.bool)
            vis = req.extra["visual"].to(req.rows.device)
            if vis.numel() != n_vis:
                raise RuntimeError("RedVTP: the visual tokens changed within the scored forward")
            cols = req.rows[still][:, vis]  # [r_still, N_vis], head-mean probabilities
            total = cols if total is None else total + cols
        if total.shape[0] == 0:
            return None
        return (total / len(reqs)).mean(0)  # mean over layers, then over the query rows

    def after_step(self, view) -> Decision | None:
        if view.n_visual == 0 or not bool(view.seq.is_mask.any()):
            return None  # nothing left to generate: skipped, as the paper's code
        scores = self.importance(view)
        if scores is None:
            return None
        self.last_importance = scores
        keep = topk_sorted(scores, self.k(view))
        return Decision(keep=keep.to(view.roles.device))
