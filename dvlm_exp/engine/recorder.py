"""What ran: token counts per (step, layer), vision work, LM-head rows, scoring overhead.

The recorder is the only input of the FLOPs accounting (dvlm_exp.reporting.flops): FLOPs are counted
from what ran, and the unpruned baseline from the same forwards with no token dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SampleRecord:
    n_visual: int = 0
    vision_views: int = 0
    vision_patches: int = 0  # patches per view
    n_forwards: int = 0
    # (n_query, n_key) -> number of decoder-layer calls with those sizes
    layer_calls: Counter = field(default_factory=Counter)
    # full (unpruned) sequence length -> number of forwards, for the baseline
    baseline_forwards: Counter = field(default_factory=Counter)
    # AR decoding (engine/ar.py): unpruned (n_query, n_key) -> layer calls; when non-empty it is
    # the baseline instead of `baseline_forwards` (a cached decode step is not a square forward)
    baseline_layer_calls: Counter = field(default_factory=Counter)
    lm_head_rows: int = 0
    baseline_lm_head_rows: int = 0
    scoring_flops: int = 0
    visual_kept: list = field(default_factory=list)  # visual tokens seen by each layer call
    kept_by_step_layer: dict = field(default_factory=dict)  # (step, layer) -> visual tokens
    generated_tokens: int = 0
    latency_s: float = 0.0
    scoring_s: float = 0.0
    output_ids: list = field(default_factory=list)
    # a method inside the vision tower (dvlm_exp/engine/vision.py): per tower layer, the tokens its
    # attention and its MLP ran on (each of the `vision_views` views); [] = the full tower ran
    vision_layer_tokens: list = field(default_factory=list)
    # visual tokens the unpruned model would give the LLM beyond those it got (tower methods)
    baseline_visual_extra: int = 0

    def tower(self, info: dict) -> None:
        """What the vision path reports (model.prepare's info) when a tower method ran."""
        if "vision_layer_tokens" in info:
            self.vision_layer_tokens = [tuple(t) for t in info["vision_layer_tokens"]]
        if "n_visual_unpruned" in info:
            self.baseline_visual_extra = int(info["n_visual_unpruned"]) - int(info["n_visual"])
            self.n_visual = int(info["n_visual_unpruned"])


class Recorder:
    """Collects one SampleRecord per generate call."""

    def __init__(self) -> None:
        self.samples: list[SampleRecord] = []
        self.current: SampleRecord | None = None

    def start_sample(self) -> SampleRecord:
        self.current = SampleRecord()
        self.samples.append(self.current)
        return self.current

    def layer(self, step: int, layer: int, n_query: int, n_key: int, n_visual: int) -> None:
        cur = self.current
        cur.layer_calls[(n_query, n_key)] += 1
        cur.visual_kept.append(n_visual)
        cur.kept_by_step_layer[(step, layer)] = n_visual

    def forward(self, full_length: int, lm_rows: int, baseline_lm_rows: int) -> None:
        cur = self.current
        cur.n_forwards += 1
        cur.baseline_forwards[full_length] += 1
        cur.lm_head_rows += lm_rows
        cur.baseline_lm_head_rows += baseline_lm_rows

    def reset(self) -> None:
        self.samples.clear()
        self.current = None
