import torch

from dvlm_exp.pruning.base import PruneMethod, keep_count


class RandomPruning(PruneMethod):
    """Keep a uniformly random subset of visual tokens (seeded, own generator)."""

    name = "random"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = torch.Generator().manual_seed(self.seed)

    def select(self, n_visual, scores):
        k = keep_count(n_visual, self.ratio)
        perm = torch.randperm(n_visual, generator=self.generator)
        return torch.sort(perm[:k]).values
