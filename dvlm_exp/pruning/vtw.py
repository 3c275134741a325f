"""VTW: Visual Tokens Withdrawal (Lin et al., AAAI 2025; arXiv 2405.05803). methods.md §4.3.

No per-token signal: before decoder layer K every visual token is withdrawn (a Decision with an
empty keep), so layers K.. run on text and response tokens only. The top-level `ratio` is
ignored: VTW always keeps 0 % from layer K on (methods.md §0.2 lists it as "keep 0 %").

  layer K   the first layer without visual tokens. VTW's code drops the image from the hidden
            states when it reaches the layer with index `k` (`--k=15` for LLaVA-1.5-7B, so
            layers 0..14 see it); our K means the same. methods.md §3.3 reads the dMLLM study's
            port (VTW_PRUNING_LAYER = 15) as "removed after the 16th layer", i.e. K = 16 here.
  positions VTW's own code keeps the survivors' original position ids (`pe_type = "keep"`); the
            study's LLaDA-V port renumbers them. conf/prune/vtw.yaml follows the study port.

Under the schedule's `state` persistence (first_step, at_step, ...) the withdrawal becomes the
sequence of all later steps: those steps run without the image in every layer, which is what the
study's port does (methods.md §4.3 "dVLM caution"). With `replay` later steps see the image in
layers < K again, as VTW's KV cache would in an AR decoder.
"""

from __future__ import annotations

import torch

from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


@PRUNERS.register("vtw")
class VTW(PruneMethod):
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value
    name = "vtw"

    def __init__(self, layer: int = 15, position_ids: str = "renumber", **kwargs):
        super().__init__(layer=layer, position_ids=position_ids, **kwargs)
        if self.layer < 0:
            raise ValueError(f"prune.layer must be >= 0, got {self.layer}")

    def select(self, view, scores) -> torch.Tensor:
        # every current visual token is withdrawn; `ratio` is not used
        return torch.empty(0, dtype=torch.long)
