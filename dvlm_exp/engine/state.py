"""The per-request token state the engine and the sampler share.

A request is `[prompt (text + visual)] + [response (gen_length slots)]`. The prompt part is
carried as embeddings with a role and an original position per token; the response part as
token ids (masked slots hold the mask id). Pruning is a gather on the prompt part: the
response is never pruned, so it always sits at the end of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


class Roles:
    TEXT = 0
    VISUAL = 1
    RESPONSE = 2


@dataclass
class Sequence:
    prompt_embeds: torch.Tensor  # [P, d]
    roles: torch.Tensor  # [P] int8, Roles.TEXT / Roles.VISUAL
    positions: torch.Tensor  # [P] long, index of each token in the unpruned sequence
    response_ids: torch.Tensor  # [G] long, mask id where still masked
    prompt_len0: int  # unpruned prompt length (response slot j has original position prompt_len0 + j)
    mask_id: int
    n_visual0: int = -1  # visual tokens before any pruning (set from roles when not given)

    def __post_init__(self):
        if self.n_visual0 < 0:
            self.n_visual0 = int((self.roles == Roles.VISUAL).sum())

    @property
    def gen_length(self) -> int:
        return self.response_ids.numel()

    @property
    def length(self) -> int:
        return self.prompt_embeds.shape[0] + self.gen_length

    @property
    def full_length(self) -> int:
        """Length of the same sequence with no token dropped."""
        return self.prompt_len0 + self.gen_length

    @property
    def is_mask(self) -> torch.Tensor:
        return self.response_ids == self.mask_id

    def all_roles(self) -> torch.Tensor:
        resp = torch.full((self.gen_length,), Roles.RESPONSE, dtype=self.roles.dtype, device=self.roles.device)
        return torch.cat([self.roles, resp])

    def all_positions(self) -> torch.Tensor:
        resp = self.prompt_len0 + torch.arange(self.gen_length, device=self.positions.device)
        return torch.cat([self.positions, resp])

    def n_visual(self) -> int:
        return int((self.roles == Roles.VISUAL).sum())

    def keep_prompt(self, keep: torch.Tensor, embeds: torch.Tensor | None = None) -> "Sequence":
        """Slice the prompt state with sorted indices into the current prompt.

        `embeds` (optional, [len(keep), d]) replaces the kept tokens' embeddings: a merge
        (ToMe, SparseVLM recycling) persists as the merged input embeddings.
        """
        return replace(
            self,
            prompt_embeds=self.prompt_embeds[keep] if embeds is None else embeds,
            roles=self.roles[keep],
            positions=self.positions[keep],
        )


@dataclass
class Decision:
    """A method's answer at one layer: which of the current visual tokens survive.

    `keep`: indices into the current visual tokens (may be empty: VTW), sorted; an unsorted
    `keep` lays the kept visual tokens out in that order (engine._merge_keep). Optional merge:
    visual token `merge_src[i]` is folded into kept token `keep[merge_dst[i]]` with weight
    `merge_w[i]`; a kept token's own weight is `keep_w` (default 1). The kept token becomes the
    weighted mean of itself and what was folded into it, in place (it keeps its position).
    `transient` (optional): indices into `keep` of tokens that only the rest of this forward
    sees; the persistent state drops them (the dMLLM study's SparseVLM port: its recycled
    cluster tokens exist in the pruning forward only).
    """

    keep: torch.Tensor
    merge_src: torch.Tensor | None = None
    merge_dst: torch.Tensor | None = None
    merge_w: torch.Tensor | None = None
    keep_w: torch.Tensor | None = None
    transient: torch.Tensor | None = None
    flops: int = 0  # the method's own work for this decision (distances, clustering), exact convention

    @property
    def merges(self) -> bool:
        return self.merge_src is not None and self.merge_src.numel() > 0
