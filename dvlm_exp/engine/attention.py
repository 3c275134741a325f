"""Attention score rows without giving up SDPA.

Methods that rank tokens by attention need a few rows of one layer's attention matrix
(the last token, the masked response tokens, ...). We register one attention function with
transformers' `AttentionInterface` (the library's extension point, no patching): it computes
exactly the requested rows from the layer's post-RoPE q and k, then returns the layer output
from the stock SDPA function. Only layers that receive a `dvlm_score` request pay anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

ATTN_IMPLEMENTATION = "dvlm_sdpa"

# Bound the [heads, rows, keys] score block kept in memory at once.
_MAX_BLOCK_ELEMENTS = 1 << 24


@dataclass
class ScoreRequest:
    """Rows of the head-averaged post-softmax attention of one layer.

    `query_index` selects query positions of the current sequence. The result `column_mean`
    is the attention each key receives, averaged over heads and over the selected queries
    (FastV / RedVTP's `mean_softmax` aggregation). `flops` counts the extra work and
    `seconds` its wall time. Options keep more, for methods that need it:
      keep_rows   `rows`  [r, n]     head-mean probabilities of each requested row (RedVTP)
      keep_heads  `heads` [h, r, n]  per-head probabilities (SparseVLM v2 head choice, VisiPruner)
      keep_values `values` [h, n, dh] the layer's value vectors, KV heads repeated (VisiPruner)
    `aggregate` says how heads are reduced: "mean_softmax" (default: per-head softmax, then the
    head mean) or "softmax_mean_logits" (softmax of the head-mean logits, no mask bias: the dMLLM
    study's FastV port, LLaDA-V/eval/llava_fastv/.../modeling_llada.py scaled_dot_product_attention).
    `column_sum` is the same total before the division by the rows (and heads).
    """

    query_index: torch.Tensor
    keep_rows: bool = False
    keep_heads: bool = False
    keep_values: bool = False
    aggregate: str = "mean_softmax"
    column_mean: torch.Tensor | None = None
    column_sum: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    values: torch.Tensor | None = None
    flops: int = 0
    n_rows: int = 0
    n_keys: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def compute(self, query: torch.Tensor, key: torch.Tensor, scaling: float, n_groups: int,
                value: torch.Tensor | None = None, blocked=None) -> None:
        """Fill the result fields. `blocked(q_idx [c], cols [n]) -> bool [c, n]` hides keys from
        query rows (causal AR prefill, prefix-LM mask); None = full bidirectional attention."""
        # query [1, h, n, dh] (post-RoPE), key / value [1, h_kv, n, dh]
        t0 = time.perf_counter()
        qi = self.query_index.to(key.device)
        key = repeat_kv(key, n_groups)[0].float()  # [h, n, dh]
        rows = query[0, :, qi].float()  # [h, r, dh]
        h, r, dh = rows.shape
        n = key.shape[1]
        cols = torch.arange(n, device=key.device) if blocked is not None else None
        total = torch.zeros(n, dtype=torch.float32, device=key.device)
        chunk = max(1, _MAX_BLOCK_ELEMENTS // max(1, h * n))
        keep_rows, keep_heads = [], []
        for s in range(0, r, chunk):
            logits = torch.matmul(rows[:, s : s + chunk], key.transpose(1, 2)) * scaling  # [h, c, n]
            if blocked is not None:
                logits = logits.masked_fill(blocked(qi[s : s + chunk], cols)[None], float("-inf"))
            if self.aggregate == "softmax_mean_logits":
                total += torch.softmax(logits.mean(0), dim=-1).sum(0)
                probs = torch.softmax(logits, dim=-1) if (self.keep_rows or self.keep_heads) else None
            else:
                probs = torch.softmax(logits, dim=-1)
                total += probs.sum(dim=(0, 1))
            if self.keep_rows:
                keep_rows.append(probs.mean(0))
            if self.keep_heads:
                keep_heads.append(probs)
        self.column_sum = total
        self.column_mean = total / (r if self.aggregate == "softmax_mean_logits" else h * r)
        if self.keep_rows:
            self.rows = torch.cat(keep_rows) if keep_rows else total.new_zeros(0, n)
        if self.keep_heads:
            self.heads = torch.cat(keep_heads, dim=1) if keep_heads else total.new_zeros(h, 0, n)
        if self.keep_values and value is not None:
            self.values = repeat_kv(value, n_groups)[0].float()
        self.n_rows, self.n_keys = r, n
        self.flops = 2 * h * r * n * dh  # q·kᵀ for the requested rows only
        if key.is_cuda:
            torch.cuda.synchronize(key.device)  # once per decision: keeps `seconds` honest
        self.seconds = time.perf_counter() - t0


def dvlm_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    score = kwargs.pop("dvlm_score", None)  # a ScoreRequest or a list of them (method + probes)
    for request in (score if isinstance(score, list) else [score] if score is not None else []):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        request.compute(query, key, scale, getattr(module, "num_key_value_groups", 1), value)
    edit = kwargs.pop("dvlm_edit", None)
    # Bidirectional: never let SDPA build a causal mask.
    kwargs["is_causal"] = False
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if edit is not None:
        # An edit recomputes a few output rows explicitly (e.g. VisiPruner's shallow stage,
        # which zeroes text->vision probabilities); every other row stays SDPA's.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = edit.apply(query, key, value, scale, getattr(module, "num_key_value_groups", 1), out)
    return out, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, dvlm_sdpa_attention)
