from dvlm_exp.pruning.base import PruneMethod


class NoPruning(PruneMethod):
    """The unpruned baseline."""

    name = "none"
    active = False
