"""model.path as a Hugging Face hub id: resolved offline from the local HF cache (the hub's cache
layout: models--org--name/{blobs, snapshots/<commit>/, refs/main}, as `hf download` leaves it and
`huggingface_hub.snapshot_download(local_files_only=True)` reads it), before any checkpoint check;
an id the cache does not hold fails before weights load with the `hf download` command; a local
directory wins over an id of the same spelling."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

REPO_ID = "dvlm-test/tiny-llada-v"
COMMIT = "3f1b2c4d5e6f708192a3b4c5d6e7f8091a2b3c4d"
SPEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, vision_hidden_size=16, vision_layers=1, vision_heads=2,
            vision_intermediate_size=32)


def put_in_hub_cache(cache: Path, repo_id: str, src: Path, commit: str) -> Path:
    """Store the files of `src` as the hub's cache does: content-addressed blobs, the snapshot of
    `commit` as relative symlinks to them, refs/main naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    from dvlm_exp.models.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("hf")
    src = write_checkpoint(root / "src", SPEC, seed=0)
    cache = root / "hub"
    snap = put_in_hub_cache(cache, REPO_ID, src, COMMIT)
    # the hub's own readers recognise the layout: one repo, its main ref, every file
    (info,) = scan_cache_dir(cache).repos
    (rev,) = info.revisions
    assert (info.repo_id, rev.commit_hash, set(rev.refs)) == (REPO_ID, COMMIT, {"main"})
    assert {f.file_name for f in rev.files} == {p.name for p in src.rglob("*") if p.is_file()}
    assert try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache) == str(snap / "config.json")
    return cache


def run_py(tmp_path, cache: Path, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL)


def test_hub_id_in_the_cache_runs(tmp_path, hub_cache):
    run_dir = tmp_path / "run"
    p = run_py(tmp_path, hub_cache, "model=llada_v", f"model.path={REPO_ID}", "model.dtype=float32", "task=synth_docvqa",
               "task.synthetic.n=2", "task.gen.gen_length=8", "task.gen.block_length=8", "task.gen.steps=4", "limit=1",
               "progress=false", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rec = json.loads((run_dir / "results.json").read_text())
    assert rec["config"]["model"]["path"] == REPO_ID and rec["n_samples"] == 1
    assert rec["flops"]["total"] > 0 and "anls,none" in rec["metrics"]


def test_hub_id_not_in_the_cache_names_the_download(tmp_path, hub_cache):
    p = run_py(tmp_path, hub_cache, "model=llada_v", "model.path=dvlm-test/not-downloaded", "limit=1",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode != 0
    assert "`hf download dvlm-test/not-downloaded`" in p.stderr, p.stderr[-3000:]
    assert str(hub_cache) in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_local_directory_wins_and_ids_resolve_offline(tmp_path, monkeypatch, hub_cache):
    from dvlm_exp.models.checkpoint import CheckpointError, is_hub_id, resolve_hub_id
    from dvlm_exp.run.paths import resolve_path

    # a folder spelled like an id, relative to the working directory, is that folder (as before)
    (tmp_path / "dvlm-test" / "tiny-llada-v").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_path(REPO_ID) == Path(REPO_ID) and not is_hub_id(REPO_ID)
    assert resolve_path(str(tmp_path)) == tmp_path and not is_hub_id("/data/LLaDA-V") and not is_hub_id("./a/b")
    monkeypatch.chdir(REPO)
    snap = resolve_hub_id(REPO_ID, cache_dir=hub_cache)
    assert snap == hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snap / "config.json").resolve().parent == hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"
    with pytest.raises(CheckpointError, match=r"`hf download GSAI-ML/LLaDA-V`"):
        resolve_hub_id("GSAI-ML/LLaDA-V", cache_dir=hub_cache)


def test_from_pretrained_takes_a_cached_hub_id(tmp_path, hub_cache):
    """The Python API as `from_pretrained` users expect: the id loads the cached snapshot's weights."""
    code = ("import json, sys; from dvlm_exp.models.llada_v import LLaDAV; "
            f"m = LLaDAV.from_pretrained({REPO_ID!r}); "
            "print(json.dumps({'layers': len(m.layers), 'd': m.dims()['d']}))")
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"layers": SPEC["num_hidden_layers"], "d": SPEC["hidden_size"]}
