"""The engine package. Names resolve lazily so that torch-free parts (the recorder, the state
roles) can be imported by planning tools without loading transformers."""

__all__ = ["Engine", "ForwardOut", "Roles", "Sequence"]


def __getattr__(name):
    if name in ("Engine", "ForwardOut"):
        from dvlm_exp.engine import engine

        return getattr(engine, name)
    if name in ("Roles", "Sequence"):
        from dvlm_exp.engine import state

        return getattr(state, name)
    raise AttributeError(name)
