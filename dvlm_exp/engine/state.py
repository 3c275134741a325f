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

    def keep_prompt(self, keep: torch.Tensor) -> "Sequence":
        """Slice the prompt state with sorted indices into the current prompt."""
        return replace(
            self,
            prompt_embeds=self.prompt_embeds[keep],
            roles=self.roles[keep],
            positions=self.positions[keep],
        )
