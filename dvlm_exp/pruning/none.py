from dvlm_exp.pruning.base import PruneMethod
from dvlm_exp.registry import PRUNERS


@PRUNERS.register("none")
class NoPruning(PruneMethod):
    """The unpruned baseline."""

    layer_fields = {}

    name = "none"
    active = False
