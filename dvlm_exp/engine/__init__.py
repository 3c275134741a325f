"""The engine package. Names resolve lazily so that torch-free parts (the recorder, the state
roles) can be imported by planning tools without loading transformers."""

__all__ = ["Decision", "Engine", "ForwardOut", "Roles", "Sequence", "View"]


def __getattr__(name):
    if name in ("Engine", "ForwardOut", "View"):
        from dvlm_exp.engine import engine

        return getattr(engine, name)
    if name in ("Decision", "Roles", "Sequence"):
        from dvlm_exp.engine import state

        return getattr(state, name)
    raise AttributeError(name)
