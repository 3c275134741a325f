"""Torch-free facts about each method's config, for checks before any weights load.

`layers`: config fields holding decoder-layer indices (an int or a list of ints) with the
smallest legal value; each must be < the model's depth. `choices`: fields with a closed set of
values. dvlm_exp.validate reads this; a new method adds one entry.
"""

from __future__ import annotations

from dvlm_exp.pruning.fastv_queries import ORDERS, QUERY_SETS, SCORES

SPECS: dict[str, dict] = {
    "none": {"layers": {}, "choices": {}},
    "random": {"layers": {"layer": 0}, "choices": {}},
    "fastv": {"layers": {"layer": 1}, "choices": {"query_set": QUERY_SETS, "score": SCORES, "order": ORDERS}},
    "redvtp": {"layers": {}, "choices": {"query_set": ("masked_response", "response")}},
    "sparsevlm": {"layers": {"layers": 1}, "choices": {"version": ("v1", "v2"), "query_set": ("raters", "text"),
                                                      "ratio_target": ("layer_average", "last", "none")}},
    "divprune": {"layers": {"layer": 0}, "choices": {"pivot": ("paper", "random"),
                                                        "greedy": ("max_min_distance", "min_max_similarity")}},
    "vtw": {"layers": {"layer": 0}, "choices": {}},
    "tome": {"layers": {"layer": 0}, "choices": {}},
    "visipruner": {"layers": {"shallow_mid_layer": 0}, "choices": {"query_set": ("last_prompt_token", "masked_response", "last_token")}},
    "skip": {"layers": {"layers": 0}, "choices": {}},
}
COMMON_CHOICES = {"position_ids": ("keep", "renumber"), "rounding": ("round", "floor")}
