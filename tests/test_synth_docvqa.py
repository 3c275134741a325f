"""Tests for the synthetic DocVQA dataset and the ``synth_docvqa`` lmms-eval task."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvlm_exp.evaluation.data import synth_docvqa as sd

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "dvlm_exp" / "tasks"
N = 8


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # datasets / huggingface_hub read these at import time; patch the live values too.
    for mod in ("datasets.config", "huggingface_hub.constants"):
        m = pytest.importorskip(mod)
        monkeypatch.setattr(m, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(pytest.importorskip("datasets.config"), "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return sd.generate(tmp_path_factory.mktemp("synth") / "ds", n=N, seed=0)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _rows(d: Path) -> list[dict]:
    from datasets import Image as HFImage
    from datasets import load_from_disk

    ds = load_from_disk(str(d))["validation"].cast_column("image", HFImage(decode=False))
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------------------
# generation


def test_layout_and_schema(data_dir):
    from datasets import load_from_disk

    assert data_dir.is_absolute()
    assert sd.is_complete(data_dir, N, 0)
    meta = sd.read_meta(data_dir)
    assert (meta["n"], meta["seed"], meta["version"]) == (N, 0, sd.GENERATOR_VERSION)
    dd = load_from_disk(str(data_dir))
    assert list(dd) == ["validation"]
    ds = dd["validation"]
    assert len(ds) == N
    assert {"questionId", "question", "answers", "image", "docId"} <= set(ds.features)
    assert type(ds.features["image"]).__name__ == "Image"
    assert len(set(ds["questionId"])) == N
    img = ds[0]["image"]
    assert img.mode == "RGB" and tuple(img.size) in sd.PAGE_SIZES
    assert max(img.size) <= 600
    # no leftovers of the atomic write next to the folder
    assert [p.name for p in data_dir.parent.iterdir()] == [data_dir.name]


def test_deterministic_same_seed(tmp_path, data_dir):
    again = sd.generate(tmp_path / "again", n=N, seed=0)
    assert _files(again) == _files(data_dir)  # byte-identical folder, metadata included
    a, b = _rows(data_dir), _rows(again)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    assert [r["answers"] for r in a] == [r["answers"] for r in b]
    assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]


def test_different_seed_differs(tmp_path, data_dir):
    other = sd.generate(tmp_path / "other", n=N, seed=1)
    a, b = _rows(data_dir), _rows(other)
    assert [r["answers"] for r in a] != [r["answers"] for r in b]
    assert all(x["image"]["bytes"] != y["image"]["bytes"] for x, y in zip(a, b))


def test_answer_is_drawn_in_its_box(data_dir):
    rows = _rows(data_dir)
    kinds = set()
    for row in rows:
        meta = json.loads(row["render_meta"])
        spec = meta["spec"]
        target = spec["blocks"][spec["target"]]
        kinds.add(target["type"])
        answers = row["answers"]
        assert answers and all(isinstance(a, str) and a.strip() for a in answers)
        assert answers == spec["answers"] and answers[0] == target["value"]
        assert row["question"] == spec["question"]

        stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).astype(int)
        assert stored.std() > 10, "page is blank"
        img, boxes = sd.render(spec)
        assert np.array_equal(np.asarray(img).astype(int), stored), "stored image != render(spec)"

        x0, y0, x1, y1 = meta["answer_bbox"]
        h, w = stored.shape[:2]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # the answer region has ink that contrasts with its background
        region = stored[y0:y1, x0:x1].mean(axis=2)
        assert region.max() - region.min() > 100

        # removing the answer text changes the page, and only inside the answer box
        blank = json.loads(json.dumps(spec))
        blank["blocks"][spec["target"]]["value"] = ""
        img_blank, _ = sd.render(blank)
        diff = np.abs(np.asarray(img_blank).astype(int) - stored).sum(axis=2)
        ys, xs = np.nonzero(diff)
        assert len(ys) > 20, "answer text is not on the page"
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
    assert "field" in kinds


def test_generate_reuse_mismatch_and_repair(tmp_path):
    out = tmp_path / "ds"
    p = sd.generate(out, n=3, seed=5)
    arrow = next(p.glob("validation/*.arrow"))
    mtime = arrow.stat().st_mtime_ns
    assert sd.generate(out, n=3, seed=5) == p
    assert sd.ensure(out, n=3, seed=5) == p
    assert arrow.stat().st_mtime_ns == mtime, "complete matching dataset was rewritten"

    with pytest.raises(FileExistsError):
        sd.generate(out, n=4, seed=5)  # different parameters need overwrite/ensure
    sd.ensure(out, n=4, seed=5)
    assert sd.is_complete(out, 4, 5) and not sd.is_complete(out, 3, 5)

    # a damaged folder is detected and repaired
    next(p.glob("validation/*.arrow")).write_bytes(b"truncated")
    assert not sd.is_complete(out)
    with pytest.raises(FileNotFoundError, match="make_synth_data.py"):
        sd.check_dataset(out)
    sd.ensure(out, n=4, seed=5)
    assert sd.check_dataset(out)["n"] == 4

    # never deletes an unrelated folder
    other = tmp_path / "not_a_dataset"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        sd.generate(other, n=2, seed=0, overwrite=True)
    assert (other / "keep.txt").exists()


def test_cli(tmp_path):
    out = tmp_path / "cli_ds"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synth_data.py"), "--out", str(out), "--n", "2", "--seed", "3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert Path(lines[-2]) == out.resolve()
    assert summary["n"] == 2 and summary["seed"] == 3 and summary["reused"] is False
    assert summary["task_entry"] == {"task": "synth_docvqa", "dataset_path": str(out.resolve())}
    assert sd.is_complete(out, 2, 3)


# --------------------------------------------------------------------------------------
# lmms-eval


def test_task_name_is_not_a_builtin():
    import lmms_eval

    builtin = Path(lmms_eval.__file__).parent / "tasks"
    hits = [p for p in builtin.rglob("*.yaml") if "synth_docvqa" in p.read_text(errors="ignore")]
    assert hits == []


@pytest.fixture(scope="module")
def lmms_eval_api():
    pytest.importorskip("lmms_eval.evaluator")
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    class ScriptedLM(lmms):
        """Answers from the doc's own answers ("oracle") or with a fixed wrong string."""

        def __init__(self, mode: str):
            super().__init__()
            self.mode = mode
            self.calls: list[dict] = []

        def loglikelihood(self, requests):
            return [(0.0, False)] * len(requests)

        def generate_until_multi_round(self, requests):
            return self.generate_until(requests)

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                visuals = doc_to_visual(doc)
                self.calls.append({"ctx": ctx, "gen_kwargs": dict(gen_kwargs), "visuals": visuals, "doc": doc})
                out.append(doc["answers"][-1] if self.mode == "oracle" else "#########")
            return out

    return {"lmms": lmms, "simple_evaluate": simple_evaluate, "TaskManager": TaskManager, "ScriptedLM": ScriptedLM}


def _task_manager(api):
    return api["TaskManager"](include_path=str(TASKS_DIR), include_defaults=False)


def test_task_manager_indexes_yaml(lmms_eval_api):
    tm = _task_manager(lmms_eval_api)
    assert "synth_docvqa" in tm.all_tasks
    assert Path(tm.task_index["synth_docvqa"]["yaml_path"]) == TASKS_DIR / "synth_docvqa" / "synth_docvqa.yaml"


@pytest.mark.parametrize("mode,expected", [("oracle", 1.0), ("wrong", 0.0)])
def test_end_to_end_anls(lmms_eval_api, data_dir, mode, expected):
    api = lmms_eval_api
    lm = api["ScriptedLM"](mode)
    entry = sd.task_entry(data_dir)
    assert entry == {"task": "synth_docvqa", "dataset_path": str(data_dir)}
    res = api["simple_evaluate"](
        model=lm,
        tasks=[entry],
        task_manager=_task_manager(api),
        limit=4,
        bootstrap_iters=0,
        log_samples=True,
    )
    r = res["results"]["synth_docvqa"]
    assert r["anls,none"] == pytest.approx(expected)
    assert res["n-samples"]["synth_docvqa"]["effective"] == 4
    samples = res["samples"]["synth_docvqa"]
    assert len(samples) == 4 and all(s["anls"] == pytest.approx(expected) for s in samples)

    assert len(lm.calls) == 4
    for call in lm.calls:
        doc = call["doc"]
        assert call["ctx"] == doc["question"] + "\nAnswer the question using a single word or phrase."
        assert call["gen_kwargs"]["max_new_tokens"] == 32
        assert call["gen_kwargs"]["do_sample"] is False
        assert call["gen_kwargs"]["until"] == ["\n\n"]
        (img,) = call["visuals"]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and tuple(img.size) in sd.PAGE_SIZES


def test_missing_dataset_dir(lmms_eval_api, tmp_path, monkeypatch):
    import tenacity
    from lmms_eval.api.task import ConfigurableTask

    missing = tmp_path / "no_such_dataset"
    # our check: clear error naming the fix
    with pytest.raises(FileNotFoundError, match=r"scripts/make_synth_data\.py --out"):
        sd.check_dataset(missing)
    with pytest.raises(FileNotFoundError):
        sd.task_entry(missing)

    # lmms-eval itself: the FileNotFoundError is hidden inside a tenacity RetryError
    # (5 attempts, 2 s apart; the wait is removed here to keep the test fast).
    monkeypatch.setattr(ConfigurableTask.download.retry, "wait", tenacity.wait_none())
    api = lmms_eval_api
    with pytest.raises(tenacity.RetryError) as info:
        api["simple_evaluate"](
            model=api["ScriptedLM"]("oracle"),
            tasks=[{"task": "synth_docvqa", "dataset_path": str(missing)}],
            task_manager=_task_manager(api),
            limit=1,
            bootstrap_iters=0,
        )
    assert isinstance(info.value.last_attempt.exception(), FileNotFoundError)
