"""Analysis: where answer tokens attend across layers and denoising steps, how confident the
sampler is, what visual tokens contribute, and which visual tokens a method kept.

Everything is recorded through the engine's probes (dvlm_exp/engine/engine.py): a probe asks
for score rows inside each layer (`score_request`, computed from the layer's post-RoPE q and k
while SDPA still produces the layer output), sees the final view and logits of each forward
(`after_forward`) and the sampler's per-step confidence (`observe`). Probes never decide, so
any pruning method + schedule runs alongside unchanged and the figures show what it did.

  AttentionProbe   per (step, layer): the head-mean softmax rows of every answer token
                   (masked and unmasked slots), reduced to the fraction of attention mass on
                   visual / text-prompt / answer keys (the three sum to 1 per row), per query
                   group answer (all slots) / masked / unmasked; and, optionally, VisiPruner's
                   contribution statistics of the visual tokens (dvlm_exp/pruning/visipruner.py:
                   c_i = concat over heads of a_{q,i} v_i, o = sum over all keys, query rows =
                   the still-masked slots, all slots when none is; min / mean cos(o - c_i, o),
                   the share of tokens under `contrib_threshold`, mean / max ||c_i||,
                   ||sum_i c_i|| / ||o|| and cos(o - sum_i c_i, o)).
  ConfidenceProbe  per step: mean top-1 probability (float64 softmax over the raw logits) and
                   mean top-1 logit of the answer rows the engine computed (masked / unmasked /
                   all), and the sampler's own signal (`observe`: mean top-1 probability of the
                   masked slots it may unmask, after its banned ids).
  KeptProbe        per (step, layer): which visual tokens are alive (original positions ->
                   indices 0..N-1 into the sample's visual tokens), stored as runs of layers.

Fractions are averaged over heads (head-mean rows), then over the query rows of a group, then
over samples (each sample counts once where it has that (step, layer) and group).

`image_layout` maps visual token indices to image rectangles (LLaDA-V: the 27x27 base view of
the whole image first, then the anyres grid row by row with one image_newline token per row;
several images: one padded-square base view each), `overlay_masks` rasterises a kept set, and
`draw_figures` writes the PNGs. `run` is scripts/analyze.py's job (docs/analysis.md).

Files: probes (recording), session, aggregate, layout (token -> image), figures, tables (files),
job. The names below are the package's API.
"""

from __future__ import annotations

from dvlm_exp.analysis.probes import (  # noqa: F401
    KEY_TYPES, QUERY_GROUPS, CONTRIB_FIELDS, CONF_FIELDS, ANALYSIS_VERSION, AttentionProbe, contribution_stats, ConfidenceProbe, KeptProbe, kept_at, final_kept,
)
from dvlm_exp.analysis.session import (  # noqa: F401
    AnalysisSession,
)
from dvlm_exp.analysis.aggregate import (  # noqa: F401
    aggregate, attention_matrix,
)
from dvlm_exp.analysis.layout import (  # noqa: F401
    image_layout, panel_grids, overlay_masks, coverage_masks, shade, survival_maps,
)
from dvlm_exp.analysis.figures import (  # noqa: F401
    default_steps, overlay_steps, draw_heatmap, draw_layer_curves, draw_confidence, draw_contributions, draw_kept, draw_overlay, draw_figures,
)
from dvlm_exp.analysis.tables import (  # noqa: F401
    write_tables, load,
)
from dvlm_exp.analysis.job import (  # noqa: F401
    options, summarize, run, main,
)
