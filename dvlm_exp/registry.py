"""Name -> class registries with "did you mean" errors (lm-evaluation-harness style).

A class registers itself in its own file, so adding a method, a model family or a schedule is
one file + one yaml:

    @PRUNERS.register("fastv")          # dvlm_exp/pruning/fastv.py  <->  conf/prune/fastv.yaml
    class FastV(PruneMethod): ...

Each registry finds its names without importing anything: on first use it reads the source of
every module of its package (`ast`) for `@<REGISTRY>.register("<name>")` class decorators.
`get(name)` imports that one module (the decorator then binds the class). So listing and
checking names stays torch-free, and nothing but the class's own file lists them.

`facts(name)` are the literal class-body assignments of FACT_KEYS in that class (plain literals,
or names of module-level literals of the same file), read from the source too: the config
checks use them before anything heavy is imported. They are ordinary class attributes as well.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from pathlib import Path
from typing import Any


class UnknownNameError(ValueError):
    pass


FACT_KEYS = ("layer_fields", "choices", "requires", "tower_stage", "tower_when", "needs_text_tower")


class Registry:
    def __init__(self, kind: str, var: str, package: str, conf_group: str):
        self.kind = kind
        self.var = var  # the module-level name of this registry (what the decorators write)
        self.package = package  # where the classes live (one file each)
        self.conf_group = conf_group  # conf/<group>/*.yaml name them
        self._where: dict[str, tuple[str, str]] = {}  # name -> (module, class), from the sources
        self._facts: dict[str, dict] = {}  # name -> {fact: value}, from the sources
        self._classes: dict[str, Any] = {}  # name -> class, once imported

    def register(self, name: str):
        def deco(cls):
            old = self._classes.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} {name!r} is already registered by {old.__module__}.{old.__qualname__}")
            self._classes[name] = cls
            return cls

        return deco

    def _discover(self) -> dict[str, tuple[str, str]]:
        if not self._where:
            spec = importlib.util.find_spec(self.package)
            for path in sorted(Path(d) for d in spec.submodule_search_locations):
                for f in sorted(path.glob("*.py")):
                    if f.name.startswith("_"):
                        continue
                    for name, cls, facts in _decorated(f, self.var):
                        where = (f"{self.package}.{f.stem}", cls)
                        if self._where.setdefault(name, where) != where:
                            raise ValueError(f"{self.kind} {name!r} is registered twice: "
                                             f"{self._where[name]} and {where}")
                        self._facts[name] = facts
        return self._where

    def facts(self, name: str) -> dict:
        """The class's declared FACT_KEYS (only those its own body assigns), without importing it."""
        self.check(name)
        return dict(self._facts[name])

    def names(self) -> list[str]:
        return sorted(self._discover())

    def check(self, name: str) -> None:
        if name not in self._discover():
            close = difflib.get_close_matches(name, self._where, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}. Valid choices: {', '.join(self.names())}.{hint}"
            )

    def get(self, name: str) -> Any:
        self.check(name)
        if name not in self._classes:
            module, cls = self._where[name]
            importlib.import_module(module)  # runs the decorator
            if name not in self._classes:
                raise ValueError(f"{module}.{cls} did not register {self.kind} {name!r}")
        return self._classes[name]


def _decorated(path: Path, var: str) -> list[tuple[str, str, dict]]:
    """(name, class, facts) for each `@<var>.register("name")` class decorator in the file."""
    tree = ast.parse(path.read_text(), str(path))
    consts = {}  # module-level NAME = <literal>
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = _literal(node.value, consts)
            except ValueError:
                pass
    out = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for d in node.decorator_list:
            if (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
                    and isinstance(d.func.value, ast.Name) and d.func.value.id == var
                    and d.args and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)):
                facts = {}
                for stmt in node.body:
                    target = (stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                              else stmt.target if isinstance(stmt, ast.AnnAssign) else None)
                    if isinstance(target, ast.Name) and target.id in FACT_KEYS and stmt.value is not None:
                        try:
                            facts[target.id] = _literal(stmt.value, consts)
                        except ValueError as e:
                            raise ValueError(f"{path}: {node.name}.{target.id} must be a literal "
                                             f"(or a module-level literal's name): {e}") from None
                out.append((d.args[0].value, node.name, facts))
    return out


def _literal(node: ast.AST, consts: dict):
    if isinstance(node, ast.Name):
        if node.id in consts:
            return consts[node.id]
        raise ValueError(f"{node.id} is not a module-level literal")
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, consts) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_literal(k, consts): _literal(v, consts) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


# Pruning methods: dvlm_exp/pruning/<file>.py, selected by conf/prune/*.yaml `name:`.
PRUNERS = Registry("pruning method", "PRUNERS", "dvlm_exp.pruning", "prune")
# Model families: dvlm_exp/models/<file>.py; conf/model/*.yaml name one in `family:`.
MODEL_FAMILIES = Registry("model family", "MODEL_FAMILIES", "dvlm_exp.models", "model")
# Denoising-step schedules: dvlm_exp/schedules/<name>.py <-> conf/schedule/<name>.yaml.
SCHEDULES = Registry("schedule", "SCHEDULES", "dvlm_exp.schedules", "schedule")
