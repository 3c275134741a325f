import torch

from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


@PRUNERS.register("random")
class RandomPruning(PruneMethod):
    """Keep a uniformly random subset of visual tokens (seeded, own generator)."""
    layer_fields = {"layer": 0}  # config fields holding decoder-layer indices: smallest legal value

    name = "random"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = torch.Generator().manual_seed(self.seed)

    def select(self, view, scores):
        k = self.k(view)
        perm = torch.randperm(view.n_visual, generator=self.generator)
        return torch.sort(perm[:k]).values

    def reseed(self, seed: int) -> None:
        """Per-sample seed (the generator calls this), so a sample's subset does not depend on
        which samples ran before it in the process (resume, sharding)."""
        self.generator.manual_seed(int(seed))
