from dvlm_exp.engine.engine import Engine, ForwardOut
from dvlm_exp.engine.state import Roles, Sequence

__all__ = ["Engine", "ForwardOut", "Roles", "Sequence"]
