"""Shared fixtures: an isolated cache (tiny checkpoints, synthetic data) and offline env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "llada_v"  # copied from the official code's outputs (its README)

# Nothing in the suite may reach a hub or a W&B server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def dvlm_cache(tmp_path_factory):
    """One cache per test session, shared with CLI subprocesses through DVLM_CACHE."""
    path = Path(os.environ.get("DVLM_TEST_CACHE") or tmp_path_factory.mktemp("dvlm_cache"))
    os.environ["DVLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_cfg():
    from dvlm_exp.run.build import compose_config

    return compose_config(["model=tiny", "task=synth_docvqa", "limit=2"])


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from dvlm_exp.run.build import load_model

    return load_model(tiny_cfg)


@pytest.fixture(scope="session")
def doc_images():
    """Two synthetic document pages of different sizes (from the project's generator)."""
    from dvlm_exp.evaluation.data.synth_docvqa import make_spec, render

    return [render(make_spec(0, i))[0] for i in range(2)]


def golden_dir() -> Path:
    return GOLDEN
