"""Visual-token layer skipping (the dMLLM study's guidance for AR-converted dMLLMs;
methods.md §3.5, "withdraw per layer" mechanics).

In every listed decoder layer, at every denoising step (not only the schedule's acting ones),
the visual tokens bypass the layer: the engine runs the layer on the non-visual tokens only and
carries the visual hidden states through unchanged (`skips_visual`). In a skipped layer the
text and response tokens therefore neither update the visual tokens nor attend to them; the
visual tokens come back, as they were, in the next listed-out layer. No token is removed from
the state, so `ratio` is ignored and the schedule only has to be active (any schedule works).

This is the "withdraw" mechanic of §3.5 applied per layer. ShortV's "freeze" (visual tokens
still serve as keys / values in the skipped layers) is a different mechanic and would need an
engine hook that lets visual tokens skip Q/O/FFN while staying in the attention's K/V.

Layer list: the study selects it offline from a profiling pass (the attention mass the
response queries put on visual keys, per layer; §3.5); no list for LLaDA-V or LaViDa is
published. `layers=None` (the class default) means the deep half of the model
(n_layers // 2 .. n_layers - 1), and conf/prune/skip.yaml writes that out for a 32-layer model
(16..31). It is a GUESS that needs a profiling pass before results are read as the method's.
"""

from __future__ import annotations

from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


@PRUNERS.register("skip")
class LayerSkip(PruneMethod):
    layer_fields = {"layers": 0}  # config fields holding decoder-layer indices: smallest legal value
    name = "skip"

    def __init__(self, layers=None, **kwargs):
        kwargs.pop("layer", None)
        super().__init__(**kwargs)
        if layers is None:
            self.layers = None
        else:
            if isinstance(layers, int):
                layers = [layers]
            self.layers = sorted({int(l) for l in layers})
            if any(l < 0 for l in self.layers):
                raise ValueError(f"prune.layers must be >= 0, got {list(layers)}")

    def skipped(self, n_layers: int) -> list[int]:
        """The decoder layers visual tokens bypass in a model with `n_layers` layers."""
        if self.layers is None:
            return list(range(n_layers // 2, n_layers))
        return [l for l in self.layers if l < n_layers]

    # ----------------------------------------------------------------- engine hooks
    def decide(self, view):
        return None

    def skips_visual(self, view) -> bool:
        if self.layers is None:
            return view.layer >= view.n_layers // 2
        return view.layer in self.layers
