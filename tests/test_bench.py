"""Smoke test of scripts/bench.py at tiny sizes: the JSON last line, configs, FLOPs and peers.

Timings at this size mean nothing (and the suite shares the cores); only the structure and
the exact quantities (FLOPs, answers, kept sets) are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--hidden", "64", "--layers", "4", "--heads", "4", "--inter", "128", "--vocab", "4096",
        "--n-visual", "64", "--text", "16", "--gen", "8", "--block", "8", "--steps", "4",
        "--reps", "1", "--warmup", "1", "--min-util", "0", "--threads", "1"]
KEEPS = (0.35, 0.25)
QUERY_SETS = ("last_token", "masked_response")


@pytest.fixture(scope="module")
def summary():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *TINY,
                           "--keeps", ",".join(map(str, KEEPS)), "--query-sets", ",".join(QUERY_SETS)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_configs():
    ours, peers = ["unpruned"], {}
    for k in KEEPS:
        tag = f"k{k:g}"
        for qs in QUERY_SETS:
            ours.append(f"fastv_{qs}_{tag}")
            peers[f"peer_fastv_eager_{qs}_{tag}"] = f"fastv_{qs}_{tag}"
        ours.append(f"redvtp_{tag}")
        peers[f"peer_redvtp_eager_all_layers_{tag}"] = f"redvtp_{tag}"
    return ours, peers


def test_every_config_present(summary):
    ours, peers = expected_configs()
    rows = {r["config"]: r for r in summary["results"]}
    assert set(rows) == set(ours) | set(peers)
    assert summary["keeps"] == list(KEEPS) and summary["keep"] == KEEPS[0]
    assert summary["layer"] == 2  # layers // 2
    for name, row in rows.items():
        kind = "baseline" if name == "unpruned" else "peer" if name in peers else "ours"
        assert row["kind"] == kind
        if kind == "peer":
            assert row["peer_of"] == peers[name]
            assert row["keep"] == rows[peers[name]]["keep"]


def test_predicted_speedup_is_flops_ratio(summary):
    rows = {r["config"]: r for r in summary["results"]}
    base = rows["unpruned"]
    assert base["flops"] == base["flops_baseline"] and base["speedup_flops"] == 1.0
    for row in summary["results"]:
        assert row["baseline_matches_unpruned"] and row["flops_baseline"] == base["flops"]
        assert row["speedup_flops"] == pytest.approx(row["flops_baseline"] / row["flops"], abs=1e-4)
        assert row["ratio"] == pytest.approx(row["speedup_measured"] / row["speedup_flops"], rel=1e-2, abs=1e-3)
        if row["kind"] != "baseline":
            assert row["speedup_flops"] > 1
            assert row["visual_kept_last_step"] < summary["n_visual"]
            assert row["scoring_flops"] > 0 and row["scoring_overhead"] is not None
            assert row["acting_forward_ms"] > 0


def test_peers_decide_as_ours_and_pay_more(summary):
    rows = {r["config"]: r for r in summary["results"]}
    n = summary["prompt_len"] + summary["gen"]
    heads, dh = summary["model"]["heads"], summary["model"]["d"] // summary["model"]["heads"]
    row_flops = 2 * heads * n * dh  # one query row against n keys
    for row in summary["results"]:
        if row["kind"] != "peer":
            continue
        ours = rows[row["peer_of"]]
        assert row["same_answer_as_ours"] and row["same_kept_as_ours"]
        assert row["answer_ids"] == ours["answer_ids"]
        assert row["kept_visual_digest"] == ours["kept_visual_digest"]
        assert row["scoring_flops"] > ours["scoring_flops"]
        # every query row of each scored layer: K-1 only for FastV, all layers for RedVTP
        layers = 1 if row["method"] == "fastv" else summary["model"]["layers"]
        assert row["scoring_flops"] == layers * n * row_flops
        assert row["speedup_flops"] < ours["speedup_flops"]  # same kept set, more scoring FLOPs
        # the peers' attention maps are live tensors: never less memory than ours, more for RedVTP's
        # n x n map per layer (torch's own allocations, deterministic)
        assert row["peak_tensor_delta_mb"] >= ours["peak_tensor_delta_mb"]
        if row["method"] == "redvtp":
            assert row["peak_tensor_delta_mb"] > ours["peak_tensor_delta_mb"]
        # both median_s are rounded to 4 decimals: the ratio lies within what that rounding allows
        a, b, h = row["median_s"], ours["median_s"], 5e-5
        assert (a - h) / (b + h) - h <= row["ours_speedup_over_this"] <= (a + h) / (b - h) + h
        assert ours["speedup_over_peers"][row["config"]] == row["ours_speedup_over_this"]
    assert summary["targets"]["peer_answers_identical"] is True


def test_head_rows_and_memory(summary):
    G = summary["gen"]
    for row in summary["results"]:
        assert row["lm_head_rows_per_step"] == pytest.approx(row["lm_head_rows"] / row["nfe"], abs=1e-3)
        assert row["lm_head_rows_per_step_all"] == G
        assert 0 < row["lm_head_saving"] < 1  # head_rows=needed skips decided slots
        assert row["lm_head_saving"] == pytest.approx(1 - row["lm_head_rows"] / (row["nfe"] * G), abs=1e-4)
        assert row["gflops_lm_head"] < row["gflops_lm_head_all_rows"]
        assert row["peak_mem_mb"] > 0 and row["peak_mem_delta_mb"] is not None
        assert row["peak_tensor_delta_mb"] > 0
    assert summary["peak_mem_measure"]


def test_targets_section(summary):
    t = summary["targets"]
    ours = [r for r in summary["results"] if r["kind"] == "ours"]
    assert set(t["meets_0.95"]) == {r["config"] for r in ours}
    assert t["realized_over_predicted_min"] == min(r["ratio"] for r in ours) == summary["min_ratio"]
    assert all(t["meets_0.95"][r["config"]] == (r["ratio"] >= 0.95) for r in ours)
    assert t["scoring_overhead_max"] == max(r["scoring_overhead"] for r in ours)
    assert set(t["meets_scoring_0.02"]) == {r["config"] for r in ours}
    assert set(t["speedup_over_peer"]) == {r["config"] for r in summary["results"] if r["kind"] == "peer"}


def test_no_memory_skips_the_memory_runs():
    """--no-memory (large configs): the timed configs as usual, memory reported as null."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *TINY, "--no-peers", "--no-memory",
                           "--keeps", "0.5", "--methods", "fastv", "--query-sets", "last_token"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["config"] for r in out["results"]] == ["unpruned", "fastv_last_token_k0.5"]
    for r in out["results"]:
        assert r["peak_mem_mb"] is None and r["peak_tensor_delta_mb"] is None
        assert r["median_s"] > 0 and r["speedup_flops"] >= 1.0


def test_throughput_fields(summary):
    """tokens/s = answer slots / latency; the gain and latency change follow the measured speedup."""
    rows = {r["config"]: r for r in summary["results"]}
    gen = summary["gen"]
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(gen / r["median_s"], rel=1e-2)  # median_s is rounded
        assert r["throughput_gain_pct"] == pytest.approx(100 * (r["speedup_measured"] - 1), abs=0.0101)
        # speedup_measured is rounded to 4 decimals: 1/s amplifies that rounding by 1/s**2
        s = r["speedup_measured"]
        assert r["latency_change_pct"] == pytest.approx(100 * (1 / s - 1), abs=0.005 + 100 * 5e-5 / s**2 + 1e-9)
    assert rows["unpruned"]["throughput_gain_pct"] == 0.0


def test_published_redvtp_headline_is_read_from_the_yaml(tmp_path, monkeypatch):
    from dvlm_exp.reporting import bench
    pub = tmp_path / "published.yaml"
    pub.write_text("papers:\n- key: fastv\n  headlines: []\n- key: redvtp\n  arxiv: '1.2'\n  headlines:\n"
                   "  - {model: LLaDA-V, metric: token-generation throughput, change_pct: 186}\n"
                   "  - {model: LLaDA-V, metric: latency, change_pct: -64.97}\n"
                   "  - {model: LaViDa, metric: token-generation throughput, change_pct: 28}\n")
    monkeypatch.setenv("DVLM_PUBLISHED", str(pub))
    got = bench.published_redvtp()
    assert got["throughput_gain_pct"] == 186 and got["latency_change_pct"] == -64.97
    monkeypatch.setenv("DVLM_PUBLISHED", str(tmp_path / "absent.yaml"))
    assert bench.published_redvtp() is None
