"""Where the engine meets transformers' KV-cache API, in one place.

The engine calls transformers' decoder layers itself (it owns the layer loop), and a layer hands
its post-RoPE K/V to whatever cache it is given through `Cache.update(key, value, layer_idx, ...)`.
Only that public method is relied on: its extra arguments changed between releases
(`cache_kwargs=` in 4.x, `kwargs=` from 5.24), so the caches here take any, and the layer's
cache argument is looked up by name (`past_key_values` became `cache` in 5.x; the old name is a
deprecated alias until 5.40).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


@functools.lru_cache(maxsize=None)
def _cache_arg(layer_type: type) -> str:
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(layer: torch.nn.Module, cache) -> dict:
    """`{name: cache}` for this decoder layer's cache argument (`cache` or `past_key_values`)."""
    return {_cache_arg(type(layer)): cache}


class PromptCache(DynamicCache):
    """A DynamicCache that stores only the prompt part of one forward and then replays it.

    capture (the first forward of a request): each layer's `update` stores the K/V of the first
    `n_prompt` tokens of the call (the prompt precedes the answer) and returns the call's own K/V.
    replay (`capture = False`, later forwards): `update` returns [stored prompt K/V, new K/V] and
    stores nothing, so every step attends to the same prompt K/V (LaViDa's Prefix-DLM)."""

    def __init__(self):
        super().__init__()
        self.capture = True
        self.n_prompt = 0
        self._prompt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.capture:
            n = self.n_prompt
            self._prompt[layer_idx] = super().update(key_states[:, :, :n], value_states[:, :, :n], layer_idx, *args, **kwargs)
            return key_states, value_states
        pk, pv = self._prompt[layer_idx]
        return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)
