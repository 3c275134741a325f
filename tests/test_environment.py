"""The environment is the lock: `make install` gives exactly requirements.lock, in the project's
.venv unless another environment is active, and entry points find that venv by themselves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata

from conftest import REPO

LOCK = REPO / "requirements.lock"
# Not in the lock by design: torch (any build, pinned by scripts/install.sh to what is installed),
# a CUDA torch's own packages, the project itself and pip.
UNLOCKED = re.compile(r"^(torch|dvlm-exp|pip|nvidia-.*|triton|cuda-.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins


def _installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_installed_versions_are_the_locked_ones():
    lock, inst = _lock(), _installed()
    assert len(lock) > 100  # every package, not the direct requirements only
    wrong = {n: (v, inst.get(n)) for n, v in lock.items() if inst.get(n) != v}
    assert not wrong, f"installed versions differ from requirements.lock (name: (locked, installed)): {wrong}; run `make install`"
    extra = sorted(n for n in inst if n not in lock and not UNLOCKED.match(n))
    assert not extra, f"installed but not in requirements.lock: {extra}; add them to requirements.in and run `make lock`"


def test_the_lock_holds_the_known_breakages_off():
    lock = _lock()
    # lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed
    assert int(lock["filelock"].split(".")[0]) < 4
    assert lock["lmms-eval"] == "0.7.3"
    import filelock._api  # noqa: F401
    import lmms_eval.evaluator  # noqa: F401
    # torch's version is recorded for scripts/install.sh, not constrained
    assert "torch" not in lock and re.search(r"^# torch==\d", LOCK.read_text(), re.M)


def _make_dry_run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(env_extra)
    p = subprocess.run(["make", "-n", "-s", "install", "test", "run"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_make_uses_the_project_venv_unless_an_env_is_active():
    out = _make_dry_run({})
    assert "PY=.venv/bin/python bash scripts/install.sh" in out
    assert ".venv/bin/python -m pytest -q tests" in out and ".venv/bin/python run.py" in out
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        out = _make_dry_run({var: "/some/env"})
        assert "PY=python bash scripts/install.sh" in out and ".venv" not in out, var


def test_entry_points_reexec_in_the_project_venv(tmp_path):
    """With no environment active, `python run.py` re-runs itself with <repo>/.venv/bin/python
    (here a fake venv Python that records its argv); inside an environment nothing happens."""
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\necho \"$0 $*\" > {tmp_path / 'argv.txt'}\n")
    fake.chmod(0o755)
    code = ("import sys; from pathlib import Path; import dvlm_exp._venv as v; "
            f"v.REPO = Path({str(tmp_path)!r}); v.use_project_venv(); print('not re-executed')")
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "DVLM_NO_VENV")}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([base, "-c", code, "model=tiny"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "argv.txt").read_text().split() == [str(fake), "-c", "model=tiny"]
    # inside an environment (a virtualenv, or a conda env) the same call does nothing
    (tmp_path / "argv.txt").unlink()
    for python, extra in ((sys.executable, {}), (base, {"CONDA_PREFIX": str(tmp_path)})):
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=dict(env, **extra), timeout=60)
        assert p.stdout.strip() == "not re-executed" and not (tmp_path / "argv.txt").exists(), p.stderr
