"""scripts/report.py: tables in the papers' layout from results.json files, joined with published numbers.

1. End to end: a small multirun of the tiny model through run.py (none / fastv / random x two keep ratios),
   a failed and an incomplete job dir beside it, and a synthetic published.yaml written here (the tiny
   model's task has no published numbers; --map model:tiny=LLaDA-V --map task:synth_docvqa=DocVQA maps them
   onto it). Every table cell is checked against the results.json it came from, and every published /
   delta cell against the synthetic rows; plus the run counts, report.md / report.html and the PNGs.
2. Paper vocabulary: hand-written results.json files of LLaDA-V-shaped runs (study_table1 sweep metadata,
   MME / POPE / DocVQA metrics, VTW, a predict-only run) against the real shared/reference/published.yaml:
   score scales, method / benchmark names, keep 0 for VTW, the "Avg (relative %)" column, time change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dvlm_exp.reporting.report import PUBLISHED  # shipped in the package

SMALL = ["limit=1", "progress=false", "task.synthetic.n=2", "task.gen.gen_length=8", "task.gen.block_length=8",
         "task.gen.steps=4"]

SYNTH_PUBLISHED = {
    "schema_version": 1,
    "papers": [{
        "key": "synthetic", "title": "A synthetic paper", "arxiv": "0000.00000",
        "tables": [{
            "id": "t1", "caption": "synthetic DocVQA table",
            "rows": [
                {"model": "LLaDA-V", "method": "baseline", "keep_ratio": 1.0, "prune_step_or_start": None,
                 "benchmark": "DocVQA", "score": 50.0, "time_change_pct": 0.0},
                {"model": "LLaDA-V", "method": "FastV", "keep_ratio": 0.5, "prune_step_or_start": "step0",
                 "benchmark": "DocVQA", "score": 40.0, "time_change_pct": -20.0},
                {"model": "LLaDA-V", "method": "FastV", "keep_ratio": 0.25, "prune_step_or_start": "step0",
                 "benchmark": "DocVQA", "score": 30.5, "time_change_pct": -35.0},
                # no run of ours: a published-only row
                {"model": "LLaDA-V", "method": "FastV", "keep_ratio": 0.1, "prune_step_or_start": "step0",
                 "benchmark": "DocVQA", "score": 20.0},
                # the paper states layer 5, our random runs prune at layer 2: no match, separate rows
                {"model": "LLaDA-V", "method": "Random", "keep_ratio": 0.5, "prune_step_or_start": "step0",
                 "prune_layer": 5, "benchmark": "DocVQA", "score": 35.0},
                # another start point and another model: never matched, the other model never shown
                {"model": "LLaDA-V", "method": "FastV", "keep_ratio": 0.5, "prune_step_or_start": 0.5,
                 "benchmark": "DocVQA", "score": 45.0},
                {"model": "Other-VLM", "method": "FastV", "keep_ratio": 0.5, "prune_step_or_start": "step0",
                 "benchmark": "DocVQA", "score": 10.0},
            ]}]}],
}


def run_py(*args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = (*args, "model=tiny", "task=synth_docvqa")  # the tiny model on synthetic DocVQA (not the sandbox default)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def report_py(*args, timeout=300):
    return subprocess.run([sys.executable, "scripts/report.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _num(v):
    return None if v is None or (isinstance(v, float) and v != v) else float(v)


def read_table(path):
    import pandas as pd

    return pd.read_csv(path, dtype=str)  # row keys exactly as written ("1", "0.5", "step0", "-")


def cell(df, bench, part, **keys):
    sel = df
    for k, v in keys.items():
        sel = sel[sel[k].astype(str) == str(v)]
    assert len(sel) == 1, (keys, len(sel))
    return _num(sel.iloc[0][f"{bench}|{part}"])


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sweep = root / "sweep"
    p = run_py("-m", "prune=none,fastv,random", "ratio=0.5,0.25", *SMALL, f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep / "90_failed" / ".hydra").mkdir(parents=True)  # a job that raised: failed.json, no results.json
    (sweep / "90_failed" / "failed.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    (sweep / "91_running" / ".hydra").mkdir(parents=True)  # still running / killed: nothing written yet
    (sweep / "91_running" / ".hydra" / "config.yaml").write_text("ratio: 0.5\n")
    (sweep / "92_torn").mkdir()  # results.json without the completion marker
    (sweep / "92_torn" / "results.json").write_text("{}")
    pub = root / "published.yaml"
    pub.write_text(yaml.safe_dump(SYNTH_PUBLISHED, sort_keys=False))
    return root, sweep, pub


def test_report_cells_match_results_json(tiny_sweep):
    import pandas as pd

    root, sweep, pub = tiny_sweep
    out = root / "out"
    p = report_py(str(sweep), "--out", str(out), "--published", str(pub),
                  "--map", "model:tiny=LLaDA-V", "--map", "task:synth_docvqa=DocVQA")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 6
    assert summary["skipped"] == {"failed": 1, "incomplete": 2}
    assert summary["superseded"] == 1  # prune=none at ratio 0.5 and 0.25: one baseline cell, the later run shown
    assert "skipped 1 failed, 2 incomplete" in p.stdout
    (table,) = summary["tables"]
    assert table["id"] == "synthetic/t1" and table["benchmarks"] == ["DocVQA"]
    assert table["matched_cells"] == 3  # baseline, FastV 0.5, FastV 0.25

    scores = read_table(out / "tables" / "synthetic_t1.csv")
    eff = read_table(out / "tables" / "synthetic_t1_efficiency.csv")
    assert list(scores.columns[:5]) == ["model", "method", "keep_ratio", "start", "layer"]
    records = {}
    for f in sorted(sweep.glob("*/results.json")):
        if not (f.parent / ".dvlm_complete").exists():
            continue
        rec = json.loads(f.read_text())
        c = rec["config"]
        name = c["prune"]["name"]
        method = {"none": "baseline", "fastv": "FastV", "random": "Random"}[name]
        keep = 1 if name == "none" else c["ratio"]
        # FastV's rows are the paper's (no layer stated); Random's paper row states layer 5, ours runs at 2
        start, layer = ("-", "-") if name == "none" else ("step0", "-" if name == "fastv" else c["prune"]["layer"])
        key = (method, keep, start, layer)
        if key in records and records[key][1] > f.stat().st_mtime:
            continue
        records[key] = (rec, f.stat().st_mtime)
    assert len(records) == 5
    pubs = {("baseline", 1, "-", "-"): (50.0, 0.0), ("FastV", 0.5, "step0", "-"): (40.0, -20.0),
            ("FastV", 0.25, "step0", "-"): (30.5, -35.0)}
    base_latency = records[("baseline", 1, "-", "-")][0]["timing"]["latency_s_per_sample"]
    for (method, keep, start, layer), (rec, _) in records.items():
        k = dict(model="LLaDA-V", method=method, keep_ratio=keep, start=start, layer=layer)
        ours = 100 * rec["metrics"]["anls,none"]
        assert cell(scores, "DocVQA", "ours", **k) == pytest.approx(ours)
        pub_score, pub_time = pubs.get((method, keep, start, layer), (None, None))
        assert cell(scores, "DocVQA", "published", **k) == pub_score
        assert cell(scores, "DocVQA", "delta", **k) == (None if pub_score is None else pytest.approx(ours - pub_score))
        assert cell(eff, "DocVQA", "flops_red_pct", **k) == pytest.approx(100 * rec["flops"]["reduction"])
        want_t = 100 * (rec["timing"]["latency_s_per_sample"] / base_latency - 1)
        assert cell(eff, "DocVQA", "time_change_pct", **k) == pytest.approx(want_t, abs=1e-9)
        assert cell(eff, "DocVQA", "time_change_pct_published", **k) == pub_time
    # published-only rows: FastV 0.1, FastV started at 50 %, Random at the paper's layer 5; not the other model
    for k, pub_score in (({"keep_ratio": 0.1}, 20.0), ({"keep_ratio": 0.5, "start": 0.5}, 45.0)):
        assert cell(scores, "DocVQA", "published", method="FastV", **k) == pub_score
        assert cell(scores, "DocVQA", "ours", method="FastV", **k) is None
    assert cell(scores, "DocVQA", "published", method="Random", keep_ratio=0.5, layer=5) == 35.0
    assert cell(scores, "DocVQA", "ours", method="Random", keep_ratio=0.5, layer=5) is None
    assert len(scores) == 8 and set(scores["model"]) == {"LLaDA-V"} and "10.0" not in set(scores["DocVQA|published"])
    assert scores.iloc[0]["method"] == "baseline"

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and set(runs["table_id"]) == {"synthetic/t1"}
    md = (out / "report.md").read_text()
    assert "synthetic/t1" in md and "skipped 1 failed and 2 incomplete" in md
    html = (out / "report.html").read_text()
    assert "<table " in html and "synthetic DocVQA table" in html  # what a reader sees: test_report_page_in_headless_chromium
    for plot in ("pareto_tiny.png", "ratio_tiny.png"):
        assert plot in summary["plots"]
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot}" in md and f"plots/{plot}" in html


@pytest.fixture(scope="module")
def report_cli():
    """scripts/report.py as a module: its main(argv) is what the command runs (in-process: no second startup)."""
    from dvlm_exp.reporting import cli

    return cli


def test_report_without_published_and_default_out(tiny_sweep, report_cli, capsys):
    root, sweep, _ = tiny_sweep
    assert report_cli.main([str(sweep), "--published", "none", "--no-plots"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(sweep / "report") and summary["plots"] == []
    (table,) = summary["tables"]
    assert table["id"] == "runs/tiny" and table["matched_cells"] == 0 and table["benchmarks"] == ["SynthDocVQA"]
    scores = read_table(sweep / "report" / "tables" / "runs_tiny.csv")
    assert len(scores) == 5 and scores["SynthDocVQA|published"].isna().all()
    # a second collection skips the report dir it wrote (no run files in it)
    assert report_cli.main([str(sweep), "--published", "none", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == 6
    assert report_cli.main([str(root / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--map"):
        report_cli.main([str(sweep), "--map", "model=tiny"])


# ---- 2. the paper vocabulary against the real published.yaml ------------------------------------------------

def _write_run(d: Path, *, prune: dict, task: str, lmms_task: str, metrics: dict, ratio=0.5, sweep=None,
               schedule=None, reduction=0.0, latency=1.0, choice=None, wandb_group=None):
    from dvlm_exp.run.record import write_results

    cfg = {"model": {"name": "llada_v", "family": "llada_v"}, "prune": prune, "ratio": ratio,
           "schedule": schedule or {"name": "first_step", "persist": "state"},
           "task": {"name": task, "lmms_task": lmms_task}, "limit": None, "seed": 0}
    if sweep:
        cfg["sweep"] = sweep
    write_results(d, {"task": lmms_task, "config": cfg, "metrics": metrics, "n_samples": 10,
                      "flops": {"total": 1.0, "baseline_total": 1.0, "reduction": reduction, "convention": "exact"},
                      "tokens": {"visual_per_sample": [100], "visual_kept_avg": 100 * ratio},
                      "timing": {"latency_s_per_sample": latency}, "generation": {"gen_length": 2, "block_length": 2, "steps": 2},
                      **({"wandb": {"mode": "offline", "group": wandb_group}} if wandb_group else {})})
    if choice:
        (d / ".hydra").mkdir(exist_ok=True)
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"prune": choice}}}}))


def test_paper_vocabulary_against_published_yaml(tmp_path):
    from dvlm_exp.reporting.report import build_report

    t1 = {"name": "study_table1", "paper": "dmllm_redundancy_study", "table": "table1"}
    base = {"name": "llada_v_baseline", "paper": "dmllm_redundancy_study", "table": None}
    fastv = {"name": "fastv", "layer": 3, "query_set": "all"}
    mme = lambda p, c: {"mme_perception_score,none": p, "mme_cognition_score,none": c, "alias": "mme"}  # noqa: E731
    s1, s2 = tmp_path / "study_table1", tmp_path / "llada_v_baseline"
    _write_run(s2 / "0", prune={"name": "none", "layer": 0}, task="mme", lmms_task="mme", metrics=mme(1600.0, 400.0),
               sweep=base, latency=2.0)
    _write_run(s2 / "1", prune={"name": "none", "layer": 0}, task="pope", lmms_task="pope",
               metrics={"pope_accuracy,none": 0.9, "pope_f1_score,none": 0.5}, sweep=base, latency=1.0)
    _write_run(s2 / "2", prune={"name": "none", "layer": 0}, task="docvqa_val", lmms_task="docvqa_val_llada_v",
               metrics={"anls,none": 0.8}, sweep=base)
    _write_run(s1 / "0", prune=fastv, task="mme", lmms_task="mme", metrics=mme(1300.0, 400.0), sweep=t1,
               reduction=0.4, latency=1.5, choice="study_fastv")
    _write_run(s1 / "1", prune=fastv, task="pope", lmms_task="pope", metrics={"pope_accuracy,none": 0.81}, sweep=t1,
               reduction=0.4, latency=1.2, choice="study_fastv")
    _write_run(s1 / "2", prune={"name": "vtw", "layer": 16}, task="mme", lmms_task="mme", metrics=mme(700.0, 200.0),
               sweep={**t1, "name": "study_table1_vtw"}, choice="study_vtw")
    _write_run(s1 / "3", prune=fastv, task="video_dc499", lmms_task="video_dc499", metrics={"bypass,none": 999},
               sweep=t1)
    res = build_report([tmp_path], tmp_path / "out", published=PUBLISHED, plots=False)  # plots: the first test
    by_id = {t["id"]: t for t in res["tables"]}
    assert list(by_id) == ["dmllm_redundancy_study/table1"]  # the baselines join table1, no table of their own
    t = by_id["dmllm_redundancy_study/table1"]
    assert t["key_cols"] == ["model", "method", "keep_ratio", "start"]  # table1 states no layers
    df = t["scores"]
    assert cell(df, "MME", "ours", method="FastV", keep_ratio=0.5) == 1700.0  # perception + cognition
    assert cell(df, "MME", "published", method="FastV", keep_ratio=0.5) == 1655.8
    assert cell(df, "MME", "delta", method="FastV", keep_ratio=0.5) == pytest.approx(1700.0 - 1655.8)
    assert cell(df, "POPE", "ours", method="FastV", keep_ratio=0.5) == pytest.approx(81.0)
    assert cell(df, "POPE", "published", method="baseline") == 87.3
    assert cell(df, "POPE", "ours", method="baseline") == pytest.approx(90.0)
    assert cell(df, "MME", "ours", method="VTW", keep_ratio=0) == 900.0
    assert cell(df, "MME", "published", method="VTW", keep_ratio=0) == 879.9
    assert "DocVQA" not in t["benchmarks"]  # a baseline of a benchmark table1 does not have adds no column
    # Avg (relative %): the paper averages 8 benchmarks, we ran 2: left empty (test_relative_average)
    assert cell(df, "Avg (relative %)", "ours", method="FastV", keep_ratio=0.5) is None
    assert cell(df, "Avg (relative %)", "published", method="FastV", keep_ratio=0.5) == 74.4
    eff = t["efficiency"]
    assert cell(eff, "MME", "time_change_pct", method="FastV", keep_ratio=0.5) == pytest.approx(-25.0)
    assert cell(eff, "POPE", "time_change_pct", method="FastV", keep_ratio=0.5) == pytest.approx(20.0)
    assert cell(eff, "MME", "time_change_pct_published", method="FastV", keep_ratio=0.5) == -15.3
    assert cell(eff, "MME", "flops_red_pct", method="FastV", keep_ratio=0.5) == pytest.approx(40.0)
    assert res["counts"]["unscored"] == 1 and res["counts"]["complete"] == 7
    rows = {(r["method"], r["task"]): r for r in res["runs"]}
    assert rows[("FastV", "mme")]["preset"] == "study_fastv" and rows[("FastV", "mme")]["layer"] == 3
    assert rows[("baseline", "docvqa_val")]["score"] == pytest.approx(80.0)
    assert rows[("baseline", "docvqa_val")]["benchmarks"] == ["DocVQA"]


def test_matching_rules():
    from dvlm_exp.reporting.report import matches

    run = {"model_label": "LLaDA-V", "method": "FastV", "keep_ratio": 0.25, "start": 0.5, "layer": 3,
           "benchmarks": ["MMMU-Pro (vision)", "MMMU-Pro"]}
    pub = {"model": "LLaDA-V", "method": "FastV", "keep_ratio": 0.25, "start": 0.5, "layer": None,
           "benchmark": "MMMU-Pro"}
    assert matches(run, pub)
    assert matches(run, {**pub, "benchmark": "MMMU-Pro (vision)"})
    assert not matches(run, {**pub, "start": "step0"})
    assert not matches(run, {**pub, "start": None})
    assert not matches(run, {**pub, "keep_ratio": 0.5})
    assert matches(run, {**pub, "layer": 3}) and not matches(run, {**pub, "layer": 2})
    assert not matches({**run, "start": None}, {**pub, "start": 0.5})
    assert not matches(run, {**pub, "model": "LaViDa-Dream"})


def test_relative_average():
    """Ours for "Avg (relative %)": mean of score / our baseline score over the benchmarks the paper averaged
    for that row, x100; empty when one is missing; over our baseline's benchmarks for a row the paper lacks."""
    from dvlm_exp.reporting.report.tables import AVG_LABEL, _fill_avg

    base, fv, new = ("M", "baseline", "1", "-"), ("M", "FastV", "0.5", "step0"), ("M", "Mine", "0.5", "step0")
    cells = {base + ("A",): {"ours": 50.0, "published": 60.0}, base + ("B",): {"ours": 2.0, "published": 3.0},
             fv + ("A",): {"ours": 25.0, "published": 30.0}, fv + ("B",): {"ours": 2.0, "published": 2.5},
             new + ("A",): {"ours": 40.0}, new + ("B",): {"ours": 1.0}}
    _fill_avg([base, fv, new], cells, ["A", "B", AVG_LABEL], with_layer=False)
    assert cells[base + (AVG_LABEL,)]["ours"] == pytest.approx(100.0)
    assert cells[fv + (AVG_LABEL,)]["ours"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert cells[new + (AVG_LABEL,)]["ours"] == pytest.approx(100 * (0.8 + 0.5) / 2)
    del cells[fv + ("B",)]["ours"], cells[fv + (AVG_LABEL,)]
    _fill_avg([fv], cells, ["A", "B", AVG_LABEL], with_layer=False)
    assert fv + (AVG_LABEL,) not in cells


# ---- 3. what a reader sees: warnings, the page in a real browser, the plots' axes ---------------------------

def test_a_table_without_published_match_is_said(tiny_sweep, report_cli, capsys, tmp_path):
    """The shipped published.yaml has nothing for the tiny model: a `warning:` line names the table, and the
    report says it too; with the synthetic paper mapped onto our names, no warning; --published none says so."""
    _, sweep, pub = tiny_sweep
    assert report_cli.main([str(sweep), "--no-plots", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    warns = [ln for ln in out.err.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "table runs/tiny: none of its 5 cells of ours has a published match" in warns[0]
    assert str(PUBLISHED) in warns[0]
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["warnings"] == [warns[0][len("warning: "):]]
    assert warns[0] in (tmp_path / "a" / "report.md").read_text()
    assert "none of its 5 cells of ours has a published match" in (tmp_path / "a" / "report.html").read_text()
    assert report_cli.main([str(sweep), "--no-plots", "--out", str(tmp_path / "b"), "--published", str(pub),
                            "--map", "model:tiny=LLaDA-V", "--map", "task:synth_docvqa=DocVQA"]) == 0
    out = capsys.readouterr()
    assert "warning:" not in out.err and json.loads(out.out.strip().splitlines()[-1])["warnings"] == []
    assert report_cli.main([str(sweep), "--no-plots", "--out", str(tmp_path / "c"), "--published", "none"]) == 0
    assert "warning: no published numbers were read (--published none)" in capsys.readouterr().err.replace("`", "")


def test_report_page_in_headless_chromium(tiny_sweep, report_cli, capsys, tmp_path):
    """report.html opened in Debian's chromium (scripts/ci/browser.sh installs it) at 1280 px: the page never
    scrolls sideways (a 200-character input path included), no literal backtick or markdown table is shown,
    every table is a real <table> whose cells read as the CSV does, and every plot is an image that loaded."""
    from browser_cdp import Browser, find_browser

    _, sweep, pub = tiny_sweep
    long_dir = tmp_path / ("d" * 200)
    long_dir.mkdir()
    out = tmp_path / "out"
    assert report_cli.main([str(sweep), str(long_dir), "--out", str(out), "--published", str(pub),
                            "--map", "model:tiny=LLaDA-V", "--map", "task:synth_docvqa=DocVQA"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = read_table(out / "tables" / "synthetic_t1.csv")
    b = Browser(find_browser(), width=1280)
    try:
        b.open((out / "report.html").as_uri())
        seen = b.eval("""(() => ({
            scrollWidth: document.documentElement.scrollWidth, width: window.innerWidth,
            text: document.body.innerText,
            tables: Array.from(document.querySelectorAll('table')).map(t =>
                Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.innerText.trim()))),
            images: Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth]),
            pre: document.querySelectorAll('pre').length, code: document.querySelectorAll('code').length,
        }))()""")
        b.screenshot(out / "screenshot.png")
    finally:
        b.close()
    assert seen["width"] == 1280 and seen["scrollWidth"] <= 1280, seen["scrollWidth"]
    assert "`" not in seen["text"] and "|---" not in seen["text"] and seen["pre"] == 0 and seen["code"] > 0
    assert "d" * 200 in seen["text"]
    # one scores + one efficiency table per report table, then the four name-mapping tables
    assert len(seen["tables"]) == 2 * len(summary["tables"]) + 4
    head, *rows = seen["tables"][0]
    assert head == ["model", "method", "keep_ratio", "start", "layer", "DocVQA"]
    assert len(rows) == len(scores)
    for row, (_, csv) in zip(rows, scores.iterrows()):
        assert row[:5] == [str(csv[k]) for k in ("model", "method", "keep_ratio", "start", "layer")]
        ours, published = _num(csv["DocVQA|ours"]), _num(csv["DocVQA|published"])
        if ours is not None:
            assert row[5].startswith(f"{ours:.2f}" if abs(ours) < 10 else f"{ours:.1f}"), (row, ours)
        if published is not None:
            assert f"/ {published:.1f}" in row[5] or f"/ {published:.2f}" in row[5], (row, published)
    assert seen["tables"][-4][0] == ["model", "paper label"] and ["tiny", "LLaDA-V"] in seen["tables"][-4]
    assert sorted(src for src, _ in seen["images"]) == sorted(f"plots/{p}" for p in summary["plots"])
    assert all(w > 0 for _, w in seen["images"]), seen["images"]


def test_plot_axes_say_what_the_score_is(tiny_sweep, monkeypatch):
    """Every panel: a y label naming the metric and its scale, the sample count in the title, and for a
    0-100 score an axis from 0 to 100 (the tiny model scores 0: matplotlib alone would go below zero)."""
    import matplotlib.pyplot as plt

    from dvlm_exp.reporting import report

    _, sweep, _ = tiny_sweep
    runs = [report.load_run(d) for d in report.find_run_dirs([sweep])["complete"]]
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a: None)  # keep the figures make_plots draws to look at them
    paths = report.make_plots(runs, [], sweep.parent / "plots_axes")
    figs = [plt.figure(n) for n in plt.get_fignums()]
    assert len(figs) == len(paths) == 2
    n = {r["n_samples"] for r in runs}
    assert n == {1}
    for fig in figs:
        axes = [ax for ax in fig.axes if ax.axison]
        assert axes
        for ax in axes:
            assert ax.get_ylabel() == "anls x100: ANLS 0-100"
            assert ax.get_title() == "SynthDocVQA (n = 1 sample)"
            assert ax.get_ylim() == (0.0, 100.0)
    monkeypatch.undo()
    plt.close("all")


def test_wandb_report_object_per_sweep(tmp_path, report_cli, capsys, monkeypatch):
    """--wandb-report-spec writes what --wandb-report would save (wandb-workspaces' Report._to_model(), as its
    save() sends it), offline: one section per W&B group (the sweep), the paper's table beside the published
    numbers, one run set per method (the group + the method's tag, as dvlm_exp/run/wandb_log.py tags runs) and
    score vs FLOPs reduction / vs latency scatter plots of the run summaries. Without W&B credentials
    --wandb-report is skipped with a note."""
    t1 = {"name": "study_table1", "paper": "dmllm_redundancy_study", "table": "table1"}
    base = {"name": "llada_v_baseline", "paper": "dmllm_redundancy_study", "table": None}
    fastv = {"name": "fastv", "layer": 3, "query_set": "all"}
    mme = lambda p, c: {"mme_perception_score,none": p, "mme_cognition_score,none": c}  # noqa: E731
    _write_run(tmp_path / "b" / "0", prune={"name": "none", "layer": 0}, task="mme", lmms_task="mme",
               metrics=mme(1600.0, 400.0), sweep=base, latency=2.0, wandb_group="llada_v_baseline")
    for i, (ratio, p) in enumerate(((0.5, 1300.0), (0.25, 1100.0))):
        _write_run(tmp_path / "t1" / str(i), prune=fastv, task="mme", lmms_task="mme", metrics=mme(p, 400.0),
                   ratio=ratio, sweep=t1, reduction=0.4, latency=1.5, choice="study_fastv", wandb_group="study_table1")
    _write_run(tmp_path / "t1" / "9", prune={"name": "random", "layer": 2}, task="mme", lmms_task="mme",
               metrics=mme(900.0, 300.0), sweep=t1, wandb_group="study_table1")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    spec_path = tmp_path / "wandb_report.json"
    assert report_cli.main([str(tmp_path / "b"), str(tmp_path / "t1"), "--out", str(tmp_path / "out"), "--no-plots",
                            "--wandb-report", "--wandb-report-spec", str(spec_path), "--wandb-entity", "me",
                            "--wandb-project", "proj"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["wandb_report"].startswith("skipped: wandb has no credentials")
    saved = json.loads(spec_path.read_text())
    assert (saved["entityName"], saved["projectName"], saved["displayName"]) == ("me", "proj", "dvlm_exp report")
    blocks = saved["spec"]["blocks"]

    def text(b):
        return "".join(c.get("text", "") for c in b.get("children", [])) if b["type"] != "markdown-block" else b["content"]

    heads = [text(b) for b in blocks if b["type"] == "heading" and b["level"] == 2]
    assert heads == ["sweep llada_v_baseline", "sweep study_table1"]
    i = next(k for k, b in enumerate(blocks) if b["type"] == "heading" and text(b) == "sweep study_table1")
    section = blocks[i:]
    md = "\n".join(b["content"] for b in section if b["type"] == "markdown-block")
    fastv_row = next(ln for ln in md.splitlines() if "| FastV | 0.5 |" in ln)
    assert "1700.0 / 1655.8 (+44.2)" in fastv_row  # ours / published (delta), the paper's table 1
    assert "| Random |" in md and "| baseline |" in md  # our own row; the baseline joins its model's table
    (grid,) = [b for b in section if b["type"] == "panel-grid"]
    runsets = grid["metadata"]["runSets"]
    assert [r["name"] for r in runsets] == ["FastV", "Random"]
    for rs, tag in zip(runsets, ["preset:study_fastv", "method:random"]):
        leaves = {(f["key"]["name"], f["op"], json.dumps(f["value"])) for f in rs["filters"]["filters"]}
        assert leaves == {("group", "=", '"study_table1"'), ("tags", "IN", json.dumps([tag]))}
    panels = grid["metadata"]["panelBankSectionConfig"]["panels"]
    assert [(p["viewType"], p["config"]["xAxis"], p["config"]["yAxis"]) for p in panels] == [
        ("Scatter Plot", "summary:flops/reduction", "summary:score"),
        ("Scatter Plot", "summary:timing/latency_s_per_sample", "summary:score")]
    # the tags the run sets select are the ones the runs carry (dvlm_exp.run.wandb_log.run_tags)
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.wandb_log import run_tags

    cfg = compose_config(["logger=wandb", "prune=study_fastv", "model.path=/unused",
                          f"hydra.searchpath=[file://{REPO / 'sweeps'}]"])
    assert "preset:study_fastv" in run_tags(cfg, {"choices": {"prune": "study_fastv"}})
