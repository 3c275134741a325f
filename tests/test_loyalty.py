"""Loyalty (dvlm_exp/evaluation/loyalty.py): agreement of a pruned run's answers with the unpruned model's on the
same samples, against a cached prune=none baseline that is made on demand in-process and then reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvlm_exp.evaluation import loyalty

# tiny settings: 2 synthetic clips of 2 frames (420 visual tokens), gen 8/8/4 (the same computation as
# for synth_docvqa, at a quarter of its visual tokens)
TINY = ["model=tiny", "task=synth_video_caption", "limit=2", "task.synthetic.n=2", "task.video.max_frames=2",
        "task.gen.gen_length=8", "task.gen.block_length=8", "task.gen.steps=4", "progress=false"]


def compose(*overrides):
    from dvlm_exp.run.build import compose_config

    return compose_config(list(overrides))


def preds_by_id(path: Path) -> dict:
    return {p["doc_id"]: p["prediction"] for p in map(json.loads, Path(path).read_text().splitlines())}


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls_ref(pred: str, ref: str) -> float:
    """ANLS written out here (lower-case, collapse whitespace, normalised Levenshtein, 0 below 0.5)."""
    p, r = " ".join(pred.strip().lower().split()), " ".join(ref.strip().lower().split())
    length = max(len(pred), len(ref))
    s = 1.0 - (levenshtein(p, r) / length if length else 0.0)
    return s if s >= 0.5 else 0.0


def direct(mine: dict, base: dict) -> tuple[float, float]:
    ids = sorted(mine)
    assert set(ids) == set(base)
    return (sum(mine[i].strip() == base[i].strip() for i in ids) / len(ids),
            sum(anls_ref(mine[i], base[i]) for i in ids) / len(ids))


def test_compare():
    base = {0: "Invoice 4821", 1: "12/03/2021", 2: "abc", 3: ""}
    assert loyalty.compare(dict(base), base) == {"exact_match": 1.0, "anls": 1.0, "n": 4}
    mine = {0: "invoice  4821", 1: "12/03/2027", 2: "xyz", 3: ""}
    got = loyalty.compare(mine, base)
    em, an = direct(mine, base)
    assert got["n"] == 4 and got["exact_match"] == pytest.approx(em) == 0.25
    assert got["anls"] == pytest.approx(an) and 0.25 < got["anls"] < 1.0
    assert loyalty.compare({5: "a"}, base)["n"] == 0


def test_baseline_key_fields():
    k = loyalty.baseline_key
    ref = k(compose(*TINY))
    assert k(compose(*TINY, "prune=fastv", "ratio=0.1")) == ref  # the pruning setting is what is compared
    assert k(compose(*TINY, "judge=openai", "logger=wandb", "loyalty=true")) == ref
    for other in (["seed=1"], ["limit=1"], ["task.gen.steps=8"], ["model.init_seed=1"], ["task.video.max_frames=3"]):
        assert k(compose(*TINY, *other)) != ref, other
    assert k(compose("limit=2", "progress=false")) != ref  # another task


def test_loyalty_runs_and_cached_baseline(tmp_path, monkeypatch):
    import shutil

    from dvlm_exp.run import runner

    made = []
    real = runner.baseline_predictions
    monkeypatch.setattr(runner, "baseline_predictions", lambda cfg, gen: made.append(1) or real(cfg, gen))
    cfg1 = compose(*TINY, "prune=fastv", "ratio=1.0", "loyalty=true", "seed=123")
    bdir = loyalty.baseline_dir(cfg1)  # $DVLM_CACHE/baselines/<key>; seed 123 is this test's own
    shutil.rmtree(bdir, ignore_errors=True)  # DVLM_TEST_CACHE may persist across sessions

    # 1. FastV keeping every token: answers equal the unpruned ones; the baseline is generated once
    rec1 = runner.run(cfg1, tmp_path / "r1")
    lo = rec1["loyalty"]
    assert made == [1] and lo["baseline_source"] == "generated" and lo["baseline_reused"] is False
    assert (lo["exact_match"], lo["anls"], lo["n"]) == (1.0, 1.0, 2)
    assert lo["baseline_key"] == bdir.name and Path(lo["baseline_path"]) == bdir / "predictions.jsonl"
    saved = json.loads((tmp_path / "r1" / "results.json").read_text())["loyalty"]
    assert saved["exact_match"] == 1.0 and saved["baseline_key"] == bdir.name
    base = preds_by_id(bdir / "predictions.jsonl")
    assert base == preds_by_id(tmp_path / "r1" / "predictions.jsonl")
    mtime = (bdir / "predictions.jsonl").stat().st_mtime_ns
    # the main record is the pruned run's own, not the baseline's
    assert rec1["config"]["prune"]["name"] == "fastv" and rec1["n_samples"] == 2

    # 2. ratio 0.1: the cached baseline is reused (no generation, file untouched); the numbers are a
    #    direct comparison of the two predictions files
    rec2 = runner.run(compose(*TINY, "prune=fastv", "ratio=0.1", "loyalty=true", "seed=123"), tmp_path / "r2")
    lo2 = rec2["loyalty"]
    assert made == [1] and lo2["baseline_reused"] is True and lo2["baseline_source"] == "cache"
    assert (bdir / "predictions.jsonl").stat().st_mtime_ns == mtime
    em, an = direct(preds_by_id(tmp_path / "r2" / "predictions.jsonl"), base)
    assert (lo2["exact_match"], lo2["anls"], lo2["n"]) == (pytest.approx(em), pytest.approx(an), 2)
    assert 0.0 <= lo2["exact_match"] <= 1.0 and 0.0 <= lo2["anls"] <= 1.0
    assert rec2["tokens"]["visual_kept_avg"] < rec1["tokens"]["visual_kept_avg"]

    # 3. an ordinary prune=none run agrees with the in-process baseline
    rec3 = runner.run(compose(*TINY, "loyalty=true", "seed=123"), tmp_path / "r3")
    assert made == [1] and rec3["loyalty"]["baseline_reused"] is True
    assert preds_by_id(tmp_path / "r3" / "predictions.jsonl") == base
    assert (rec3["loyalty"]["exact_match"], rec3["loyalty"]["anls"]) == (1.0, 1.0)


def test_prune_none_run_publishes_its_own_baseline(tmp_path, monkeypatch):
    import shutil

    from dvlm_exp.run import runner

    monkeypatch.setattr(runner, "baseline_predictions", lambda cfg, gen: pytest.fail("no extra generation needed"))
    cfg = compose(*TINY, "limit=1", "loyalty=true", "seed=7")
    shutil.rmtree(loyalty.baseline_dir(cfg), ignore_errors=True)
    rec = runner.run(cfg, tmp_path / "r")
    lo = rec["loyalty"]
    assert lo["baseline_source"] == "this run" and (lo["exact_match"], lo["anls"], lo["n"]) == (1.0, 1.0, 1)
    assert preds_by_id(loyalty.baseline_dir(cfg) / "predictions.jsonl") == preds_by_id(tmp_path / "r" / "predictions.jsonl")
    meta = json.loads((loyalty.baseline_dir(cfg) / "meta.json").read_text())
    assert meta["key"] == lo["baseline_key"] and meta["fields"]["seed"] == 7
