"""What a pruning method is: which visual tokens to keep, given optional attention scores.

A method never touches model code. It declares where it acts (`layer` K: the first decoder
layer that sees the pruned sequence), whether it needs attention rows from layer K-1 and
from which queries, and returns sorted indices into the visual tokens to keep. The engine
does the gathering; the schedule says at which denoising step it happens.
"""

from __future__ import annotations

import torch

from dvlm_exp.engine.state import Roles


def keep_count(n_visual: int, ratio: float) -> int:
    """Visual tokens kept for keep ratio `ratio` (round half to even, at least 1)."""
    if n_visual == 0:
        return 0
    return max(1, min(n_visual, round(n_visual * ratio)))


class PruneMethod:
    name = "base"
    needs_attention = False
    active = True

    def __init__(self, ratio: float = 1.0, layer: int = 0, seed: int = 0, **kwargs):
        self.ratio = float(ratio)
        self.layer = int(layer)
        self.seed = int(seed)
        self.options = kwargs

    def query_index(self, roles: torch.Tensor, seq) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, n_visual: int, scores: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def response_mask_positions(roles: torch.Tensor, seq) -> torch.Tensor:
    """Sequence positions of response slots that are still masked."""
    resp = torch.nonzero(roles == Roles.RESPONSE).squeeze(1)
    return resp[seq.is_mask.to(resp.device)]
