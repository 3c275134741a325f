"""The package's shape (docs: README "How it works"): folders by role, no import circle, short
files, and config groups that map one to one onto code files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "dvlm_exp"
TOP_MODULES = {"__init__.py", "_venv.py", "errors.py", "registry.py"}  # leaves and the venv re-exec
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(f: Path, name: str, known: set[str]) -> set[str]:
    """dvlm_exp modules `f` imports, at any depth (function-level imports included)."""
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "dvlm_exp":
                out.add(t)
    return out


def test_no_import_circle():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(f, m, known) for m, f in mods.items()}
    # a package's __init__ importing its own members is not a circle through that package
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and mods[m].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_top_level_holds_packages_and_a_few_leaf_modules():
    files = {p.name for p in PKG.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files <= TOP_MODULES, f"modules at dvlm_exp/ top level: {sorted(files - TOP_MODULES)}"


def test_files_are_short_or_say_why():
    long = []
    for f in PKG.rglob("*.py"):
        n = len(f.read_text().splitlines())
        if n > MAX_LINES and "Long file:" not in "\n".join(f.read_text().splitlines()[:15]):
            long.append(f"{f.relative_to(REPO)} ({n} lines)")
    assert not long, f"over {MAX_LINES} lines without a 'Long file:' reason in the first lines: {long}"


@pytest.mark.parametrize("group, package", [("prune", "pruning"), ("schedule", "schedules")])
def test_each_config_names_one_file_of_its_folder(group, package):
    """conf/<group>/x.yaml selects the class registered in dvlm_exp/<package>/<name>.py."""
    from dvlm_exp.registry import PRUNERS, SCHEDULES

    reg = {"prune": PRUNERS, "schedule": SCHEDULES}[group]
    for y in sorted((REPO / "conf" / group).glob("*.yaml")):
        name = OmegaConf.load(y).name
        cls = reg.get(name)
        assert Path(cls.__module__.replace(".", "/") + ".py") == Path("dvlm_exp") / package / f"{name}.py", y.name


def test_a_new_method_is_one_file_and_one_yaml(tmp_path):
    """Drop a method file into a copy of the pruning package: it is listed, built, and its layer
    field is checked against the model's depth, with no other edit."""
    import shutil
    import subprocess
    import sys

    root = tmp_path / "repo"
    shutil.copytree(PKG, root / "dvlm_exp", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "dvlm_exp" / "pruning" / "keep_first.py").write_text(
        "from dvlm_exp.pruning.base import PruneMethod\n"
        "from dvlm_exp.registry import PRUNERS\n\n\n"
        "@PRUNERS.register('keep_first')\n"
        "class KeepFirst(PruneMethod):\n"
        "    name = 'keep_first'\n\n"
        "    def select(self, view, scores):\n"
        "        import torch\n\n"
        "        return torch.arange(self.k(view))\n")
    (root / "conf" / "prune" / "keep_first.yaml").write_text("name: keep_first\nlayer: 2\nposition_ids: keep\n")
    code = (
        "from dvlm_exp.registry import PRUNERS\n"
        "from dvlm_exp.run.build import compose_config\n"
        "from dvlm_exp.run.validate import check\n"
        "from dvlm_exp.errors import ConfigError\n"
        "assert 'keep_first' in PRUNERS.names()\n"
        "check(compose_config(['model=tiny', 'prune=keep_first', 'ratio=0.5']), data=False, weights=False)\n"
        "try:\n"
        "    check(compose_config(['model=tiny', 'prune=keep_first', 'prune.layer=9']), data=False, weights=False)\n"
        "except ConfigError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                         "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: prune.layer=9 is outside [0, 3]" in out.stdout, out.stdout


def test_declared_facts_read_from_source_equal_the_class_attributes():
    """The config checks read each method's facts from its source (no import); they must be
    what the imported class holds."""
    from dvlm_exp.pruning.base import ROUNDING, PruneMethod
    from dvlm_exp.registry import PRUNERS
    from dvlm_exp.run.validate import COMMON_CHOICES

    assert COMMON_CHOICES["rounding"] == ROUNDING
    for name in PRUNERS.names():
        cls = PRUNERS.get(name)
        facts = PRUNERS.facts(name)
        for key in ("layer_fields", "choices", "requires"):
            assert facts.get(key, getattr(PruneMethod, key)) == getattr(cls, key), (name, key)
