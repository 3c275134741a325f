"""The issue-17 sweeps joined to their published tables (dvlm_exp/reporting/report/ peer_keys / expand_readings).

For every new sweep (study_table2 + its VTW and baseline sweeps, fastv_readme, llava15_token_reduction,
llava15_visipruner, llava15_baseline, lavida_prefix_nfe) a fake results tree is written from the sweep's
own job configs (scripts/sweep_jobs.py, as the launched jobs compose them), each job with distinct metric
values, and the report is built over it with the shipped published.yaml. Then: every job lands in its
sweep's table with our value beside the published one, and hand-picked cells are checked against the
numbers typed from the sources (published.yaml) and the metric values written here.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import REPO
from dvlm_exp.reporting.report import PUBLISHED

DATA = REPO / "tests" / "data"
CKPT = {"lavida_dream": "lavida_dream_config.json", "lavida_llada": "lavida_llada_config.json",
        "llava_1_5": "llava_1_5_7b_config.json"}
SWEEPS = ["study_table2", "study_table2_vtw", "lavida_dream_baseline", "llava15_baseline", "fastv_readme",
          "llava15_token_reduction", "llava15_visipruner", "lavida_prefix_nfe"]


def fake_metrics(lmms_task: str, v: float) -> dict:
    """lmms-eval-shaped metrics with value v (a fraction) in every metric the report may read."""
    f = {"mme": {"mme_perception_score,none": 1000 * v, "mme_cognition_score,none": 300 * v},
         "pope": {"pope_accuracy,none": v, "pope_f1_score,none": v / 2},
         "mmbench_en_dev": {"gpt_eval_score,none": 100 * v},
         "mmmu_pro_vision": {"mmmu_acc,none": v}, "mmmu_val": {"mmmu_acc,none": v},
         "chartqa": {"relaxed_overall,none": v},
         "seedbench": {"seed_image,none": v, "seed_video,none": v / 3, "seed_all,none": v / 2},
         "nocaps_val": {"nocaps_Bleu_4,none": v / 5, "nocaps_CIDEr,none": v},
         "coco2014_cap_val": {"coco_Bleu_4,none": v / 5, "coco_CIDEr,none": v},
         "coco2017_cap_val": {"coco_Bleu_4,none": v / 5, "coco_CIDEr,none": v},
         "flickr30k": {"flickr_Bleu_4,none": v / 5, "flickr_CIDEr,none": v}}
    return f.get(lmms_task, {"exact_match,none": v})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from omegaconf import OmegaConf

    from dvlm_exp.run.record import write_results
    from dvlm_exp.reporting.report import build_report

    from dvlm_exp.run import sweep_jobs as sj
    root = tmp_path_factory.mktemp("peer_tree")
    ckpts = {}
    for model, name in CKPT.items():
        d = root / "ckpt" / model
        d.mkdir(parents=True)
        shutil.copy(DATA / name, d / "config.json")
        ckpts[model] = d
    written = {}  # (sweep, job index) -> (cfg, metrics)
    n = 0
    for sweep in SWEEPS:
        model = sj.compose([f"+sweep={sweep}"]).model.name
        jobs, _ = sj.expand(sweep)
        for i, (job, cfg) in enumerate(sj.job_configs(jobs, [f"model.path={ckpts[model]}"])):
            assert not isinstance(cfg, Exception), (job, cfg)
            c = OmegaConf.to_container(cfg, resolve=True)
            n += 1
            v = round(0.3 + n / 1000, 6)  # distinct per job
            lmms = str(c["task"]["lmms_task"])
            m = fake_metrics(lmms, v)
            d = root / "outputs" / sweep / str(i)
            g = c["task"]["gen"]
            write_results(d, {"task": lmms, "config": c, "metrics": m, "n_samples": 10,
                              "flops": {"total": 1.0, "baseline_total": 1.0, "reduction": 0.1, "convention": "exact"},
                              "tokens": {"visual_per_sample": [100], "visual_kept_avg": 50},
                              "timing": {"latency_s_per_sample": 1.0},
                              "generation": {k: g[k] for k in ("gen_length", "block_length", "steps")}})
            choice = next(o.split("=", 1)[1] for o in job if o.startswith("prune=")) if any(
                o.startswith("prune=") for o in job) else c["prune"]["name"]
            (d / ".hydra").mkdir()
            (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"prune": choice}}}}))
            written[(sweep, i)] = (c, m)
    res = build_report([root / "outputs"], root / "report", published=PUBLISHED, plots=False)
    return res, written


def _tables(res):
    return {t["id"]: t for t in res["tables"]}


def cell(t, bench, part, **keys):
    df = t["scores"]
    sel = df
    for k, v in keys.items():
        sel = sel[sel[k].astype(str) == str(v)]
    assert len(sel) == 1, (bench, keys, len(sel))
    x = sel.iloc[0][f"{bench}|{part}"]
    return None if x is None or x != x else float(x)


def test_every_job_lands_in_its_table(tree):
    res, written = tree
    assert res["counts"]["complete"] == len(written) == 120 + 8 + 8 + 13 + 8 + 81 + 9 + 4  # study_table2: 5 methods (TRIM)
    by_dir = {r["run_dir"]: r for r in res["runs"]}
    want_table = {"study_table2": "dmllm_redundancy_study/table2", "study_table2_vtw": "dmllm_redundancy_study/table2",
                  "lavida_dream_baseline": "dmllm_redundancy_study/table2", "fastv_readme": "fastv/readme_lmms_eval",
                  "llava15_token_reduction": "llava15_token_reduction_secondary/mmtok_table16",
                  "llava15_visipruner": "visipruner/repo_log_gqa", "lavida_prefix_nfe": "lavida/readme_coco"}
    unmatched = []
    for r in by_dir.values():
        if r["sweep"] in want_table:
            assert r["table_id"] == want_table[r["sweep"]], (r["run_dir"], r["table_id"])
        if r.get("pub") is None:
            unmatched.append((r["sweep"], r["task"], r["method"]))
    # every run a published row describes is joined; the only unmatched ones are benchmarks the table lacks
    assert sorted(set(unmatched)) == sorted({
        *(("llava15_visipruner", t, "VisiPruner") for t in
          ("mmbench_en_dev", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmmu_val", "seedbench")),
    }), sorted(set(unmatched))


def test_table2_lavida_dream(tree):
    res, written = tree
    t = _tables(res)["dmllm_redundancy_study/table2"]
    assert t["key_cols"] == ["model", "method", "keep_ratio", "start"]
    # published cells as typed from 2511.15098 Table 2 (published.yaml)
    assert cell(t, "MME", "published", method="DivPrune", keep_ratio=0.25) == 1442.6
    assert cell(t, "ChartQA", "published", method="FastV", keep_ratio=0.25) == 15.1
    assert cell(t, "MME", "published", method="baseline") == 1857.0
    # ours, from the values written: each cell equals its job's metric on the paper's scale
    jobs = {(c["prune"]["name"], c.get("ratio"), c["task"]["name"]): m for (s, _), (c, m) in written.items()
            if s in ("study_table2", "study_table2_vtw", "lavida_dream_baseline")}
    m = jobs[("divprune", 0.25, "mme")]
    assert cell(t, "MME", "ours", method="DivPrune", keep_ratio=0.25) == pytest.approx(
        m["mme_perception_score,none"] + m["mme_cognition_score,none"])
    m = jobs[("fastv", 0.1, "chartqa")]
    assert cell(t, "ChartQA", "ours", method="FastV", keep_ratio=0.1) == pytest.approx(100 * m["relaxed_overall,none"])
    m = jobs[("vtw", 0.5, "mmmu_pro")]
    assert cell(t, "MMMU-Pro", "ours", method="VTW", keep_ratio=0) == pytest.approx(100 * m["mmmu_acc,none"])
    assert cell(t, "MMMU-Pro", "published", method="VTW", keep_ratio=0) is not None
    m = jobs[("trim", 0.25, "gqa")]  # study_trim_lavida
    assert cell(t, "GQA", "ours", method="TRIM", keep_ratio=0.25) == pytest.approx(100 * m["exact_match,none"])
    # every (method, keep) row of ours has all 8 benchmarks beside a published number
    df = t["scores"]
    benches = ["MME", "ScienceQA", "GQA", "POPE", "MMBench", "TextVQA", "ChartQA", "MMMU-Pro"]
    for _, row in df.iterrows():
        has_ours = [row[f"{b}|ours"] == row[f"{b}|ours"] and row[f"{b}|ours"] is not None for b in benches]
        assert all(has_ours), row["method"]
        assert all(row[f"{b}|published"] == row[f"{b}|published"] for b in benches), row["method"]
    assert len(df) == 1 + 5 * 3 + 1  # baseline, 5 methods (TRIM included) x 3 keeps, VTW


def test_fastv_readme_table(tree):
    res, written = tree
    t = _tables(res)["fastv/readme_lmms_eval"]
    row = dict(method="FastV K=3 R=50%", keep_ratio=0.5, start="prefill", layer=3)
    fv = {c["task"]["name"]: m for (s, _), (c, m) in written.items() if s == "fastv_readme"}
    base = {c["task"]["name"]: m for (s, _), (c, m) in written.items() if s == "llava15_baseline"}
    # MME: one run, two cells (perception, cognition), as the README
    assert cell(t, "MME-Perception", "ours", **row) == pytest.approx(fv["mme"]["mme_perception_score,none"])
    assert cell(t, "MME-Cognition", "ours", **row) == pytest.approx(fv["mme"]["mme_cognition_score,none"])
    assert cell(t, "MME-Perception", "published", **row) == 1511.7
    assert cell(t, "MME-Cognition", "published", method="baseline") == 348.2
    assert cell(t, "MME-Cognition", "ours", method="baseline") == pytest.approx(base["mme"]["mme_cognition_score,none"])
    # captions: CIDEr x100, not the first metric (Bleu_4)
    assert cell(t, "COCO caption val2017 (CIDEr)", "ours", **row) == pytest.approx(100 * fv["coco2017_cap_val"]["coco_CIDEr,none"])
    assert cell(t, "NoCaps (CIDEr)", "published", **row) == 105.5
    assert cell(t, "Flickr30K (CIDEr)", "ours", **row) == pytest.approx(100 * fv["flickr30k"]["flickr_CIDEr,none"])
    assert cell(t, "SEED-Bench (image)", "ours", **row) == pytest.approx(100 * fv["seedbench"]["seed_image,none"])
    assert cell(t, "GQA", "published", **row) == 60.4
    assert cell(t, "MMMU", "ours", **row) == pytest.approx(100 * fv["mmmu_val"]["mmmu_acc,none"])
    assert t["benchmarks"] == ["NoCaps (CIDEr)", "COCO caption val2014 (CIDEr)", "COCO caption val2017 (CIDEr)",
                               "Flickr30K (CIDEr)", "GQA", "SEED-Bench (image)", "MMMU", "MME-Cognition", "MME-Perception"]


def test_token_reduction_table(tree):
    res, written = tree
    t = _tables(res)["llava15_token_reduction_secondary/mmtok_table16"]
    runs = {(c["prune"]["name"], c["ratio"], c["task"]["name"]): m for (s, _), (c, m) in written.items()
            if s == "llava15_token_reduction"}
    m = runs[("fastv", 0.3333, "pope")]
    assert cell(t, "POPE (F1)", "ours", method="FastV", keep_ratio=0.3333) == pytest.approx(100 * m["pope_f1_score,none"])
    assert cell(t, "GQA", "published", method="FastV", keep_ratio=0.3333) == 52.7
    m = runs[("sparsevlm", 0.1111, "mme")]
    assert cell(t, "MME (perception+cognition)", "ours", method="SparseVLM", keep_ratio=0.1111) == pytest.approx(
        m["mme_perception_score,none"] + m["mme_cognition_score,none"])
    m = runs[("divprune", 0.2222, "vqav2_val")]
    assert cell(t, "VQAv2", "ours", method="DivPrune", keep_ratio=0.2222) == pytest.approx(100 * m["exact_match,none"])
    assert cell(t, "SEED", "published", method="DivPrune", keep_ratio=0.2222) is not None
    assert cell(t, "GQA", "published", method="baseline") == 61.9
    assert "POPE" not in t["benchmarks"] and "MME" not in t["benchmarks"]  # only the table's own columns
    # every benchmark of every (method, keep) row of ours sits beside a published number
    df = t["scores"]
    for (prune, ratio), label in {(p, r): l for p, l in (("fastv", "FastV"), ("sparsevlm", "SparseVLM"),
                                                          ("divprune", "DivPrune"))
                                  for r in (0.3333, 0.2222, 0.1111)}.items():
        row = df[(df["method"] == label) & (df["keep_ratio"].astype(str) == str(ratio))].iloc[0]
        for b in ["GQA", "MMBench", "MME (perception+cognition)", "POPE (F1)", "ScienceQA", "VQAv2", "TextVQA",
                  "MMMU", "SEED"]:
            assert row[f"{b}|ours"] == row[f"{b}|ours"] and row[f"{b}|published"] == row[f"{b}|published"], (label, ratio, b)


def test_visipruner_and_lavida_tables(tree):
    res, written = tree
    t = _tables(res)["visipruner/repo_log_gqa"]
    m = next(m for (s, _), (c, m) in written.items() if s == "llava15_visipruner" and c["task"]["name"] == "gqa")
    assert cell(t, "GQA", "ours", method="VisiPruner") == pytest.approx(100 * m["exact_match,none"])
    assert cell(t, "GQA", "published", method="VisiPruner") == 59.48
    t = _tables(res)["lavida/readme_coco"]
    want = {(False, 64): ("KV cache off, NFE 100%", 110.2), (True, 64): ("KV cache on (Prefix-DLM), NFE 100%", 107.8),
            (False, 32): ("KV cache off, NFE 50%", 108.5), (True, 32): ("KV cache on (Prefix-DLM), NFE 50%", 104.4)}
    for (s, _), (c, m) in written.items():
        if s != "lavida_prefix_nfe":
            continue
        method, pub = want[(c["model"]["prefix_cache"], c["task"]["gen"]["steps"])]
        assert cell(t, "COCO caption (CIDEr)", "ours", method=method) == pytest.approx(100 * m["coco_CIDEr,none"])
        assert cell(t, "COCO caption (CIDEr)", "published", method=method) == pub
