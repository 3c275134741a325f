"""Benchmark presets (conf/task/*.yaml): official generation settings, lmms-eval task names,
offline data checks before weights load, LLaDA-V's "Answer: X" parsing, and an end-to-end
lmms-eval run of the LLaDA-V-prompt DocVQA/InfoVQA tasks on a tiny local mirror."""

from __future__ import annotations

import copy
import functools
import re
import time
from pathlib import Path

import pytest

from conftest import REPO

TASK_CONF = REPO / "conf" / "task"
EOT = "<|eot_id|>"

# LLaDA-V eval/scripts/evaluate.sh, transcribed from models.md §1.9 (video caption: the dMLLM
# redundancy study, arXiv 2511.15098 suppl. Tab. 1):
#   preset: (gen_length, block_length, steps, think, stop)
MC = (2, 2, 2, "no_think", [EOT])
OFFICIAL = {
    "docvqa_val": (32, 32, 16, "no_think", [EOT]),
    "infovqa_val": (32, 32, 16, "no_think", [EOT]),
    "chartqa": (16, 16, 16, "no_think", [EOT, "\n"]),
    "textvqa_val": MC, "mme": MC, "pope": MC, "gqa": MC, "scienceqa_img": MC,
    "mmbench_en_dev": MC, "mmmu_pro": MC, "videomme": MC,
    "mathvista_testmini": (96, 96, 48, "think", [EOT]),
    "video_dc499": (128, 128, 64, "think", [EOT]),
}
# preset -> (lmms-eval task name it runs, HF dataset id lmms-eval 0.7.3 loads)
LMMS = {
    "docvqa_val": ("docvqa_val_llada_v", "lmms-lab-encoder/DocVQA"),
    "infovqa_val": ("infovqa_val_llada_v", "lmms-lab-encoder/DocVQA"),
    "chartqa": ("chartqa", "lmms-lab-encoder/ChartQA"),
    "textvqa_val": ("textvqa_val", "lmms-lab-encoder/textvqa"),
    "mme": ("mme", "lmms-lab-encoder/MME"),
    "pope": ("pope", "lmms-lab-encoder/POPE"),
    "gqa": ("gqa", "lmms-lab-encoder/GQA"),
    "scienceqa_img": ("scienceqa_img", "lmms-lab-encoder/ScienceQA"),
    "mmbench_en_dev": ("mmbench_en_dev", "lmms-lab-encoder/MMBench"),
    "mmmu_pro": ("mmmu_pro_vision", "MMMU/MMMU_Pro"),
    "videomme": ("videomme", "lmms-eval/Video-MME"),
    "mathvista_testmini": ("mathvista_testmini_cot", "AI4Math/MathVista"),
    "video_dc499": ("video_dc499", "lmms-lab/VideoDetailDescription"),
}
STOCK = {"docvqa_val": "docvqa_val", "infovqa_val": "infovqa_val"}
LLADA_V_POST = "\nGive the reason and then write your final answer in the format 'Answer: X' where X is the answer to the question."
STOCK_POST = "\nAnswer the question using a single word or phrase."
PRESETS = sorted(p.stem for p in TASK_CONF.glob("*.yaml") if not p.stem.startswith("synth_"))  # benchmarks only


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]):
    from dvlm_exp.run.build import compose_config

    return compose_config(list(overrides))


def compose(*overrides):
    return copy.deepcopy(_compose(tuple(overrides)))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline, with empty, private HF caches (so nothing is 'already cached')."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "lmms_cache"))
    return home


def wanted_lmms_tasks() -> set[str]:
    return {LMMS[n][0] for n in PRESETS} | set(STOCK.values())


@pytest.fixture(scope="module")
def task_manager():
    """lmms-eval's own TaskManager over dvlm_exp/tasks and the built-in task folders of the presets.

    The full built-in index (include_defaults=True, what the runner uses) takes 5-20 s on a small
    machine; lmms-eval indexing just the folders that hold the presets' tasks checks the same names
    with lmms-eval's own parser in about a second. One instance per module.
    """
    from lmms_eval.tasks import TaskManager

    from dvlm_exp.evaluation.task_data import lmms_tasks_dir, task_index
    from dvlm_exp.tasks import TASKS_DIR

    tasks, _ = task_index()
    builtin = lmms_tasks_dir()
    folders = sorted({str(tasks[n].parent) for n in wanted_lmms_tasks() if n in tasks and builtin in tasks[n].parents})
    return TaskManager(include_path=[str(TASKS_DIR), *folders], include_defaults=False)


# --------------------------------------------------------------------------------------
# presets


def test_every_preset_is_in_the_table():
    assert set(PRESETS) == set(OFFICIAL) == set(LMMS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    from dataclasses import fields

    from omegaconf import OmegaConf

    from dvlm_exp.decoding.generator import GenPreset
    from dvlm_exp.run.validate import check

    cfg = compose(f"task={name}")
    check(cfg, data=False)  # everything but the data
    t = cfg.task
    assert t.name == name and t.builtin is True and t.dataset_path is None
    assert t.lmms_task == LMMS[name][0]
    g = OmegaConf.to_container(t.gen, resolve=True)
    assert set(g) == {f.name for f in fields(GenPreset)}
    GenPreset(**g)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_equals_official_table(name):
    g = compose(f"task={name}").task.gen
    gen_length, block_length, steps, think, stop = OFFICIAL[name]
    assert (g.gen_length, g.block_length, g.steps, g.think) == (gen_length, block_length, steps, think)
    assert list(g.stop) == stop
    assert g.temperature == 0 and g.remasking == "low_confidence"
    # the official wrapper pops `until` and strips one trailing "."
    assert g.honor_until is False and g.strip_period is True


def test_gen_overrides_and_prompt_switch():
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    cfg = compose("task=chartqa", "task.gen.steps=8")  # the dMLLM study's ChartQA setting
    assert cfg.task.gen.steps == 8 and list(cfg.task.gen.stop) == [EOT, "\n"]
    for name, stock in STOCK.items():
        assert compose(f"task={name}").task.prompt == "llada_v"
        assert compose(f"task={name}", "task.prompt=stock").task.lmms_task == stock
    with pytest.raises(ConfigError, match=r"task\.prompt=plain must be one of stock, llada_v"):
        check(compose("task=docvqa_val", "task.prompt=plain"), data=False)
    with pytest.raises(ConfigError, match=r"task\.gen\.think=maybe"):
        check(compose("task=mme", "task.gen.think=maybe"), data=False)
    # synth_docvqa carries the DocVQA preset and, like the official wrapper, ignores `until`
    g = compose("task=synth_docvqa").task.gen
    assert (g.gen_length, g.block_length, g.steps, g.honor_until) == (32, 32, 16, False)


def test_lmms_task_names_exist(task_manager):
    from dvlm_exp.evaluation.task_data import lmms_tasks_dir, project_tasks_dir, task_index

    names = set(task_manager.all_tasks)
    wanted = wanted_lmms_tasks()
    assert wanted <= names, sorted(wanted - names)
    tasks, _ = task_index()  # the static scan validate uses finds the same files
    assert wanted <= set(tasks)
    for name in wanted:
        assert task_manager.task_index[name]["yaml_path"] == str(tasks[name]), name
    # built-in tasks (stock prompts) come from lmms-eval; the LLaDA-V variants are ours, with names
    # no built-in task shadows (built-ins win in the static index, as in TaskManager)
    for name in wanted - {"docvqa_val_llada_v", "infovqa_val_llada_v"}:
        assert lmms_tasks_dir() in tasks[name].parents, name
    for name in ("docvqa_val_llada_v", "infovqa_val_llada_v"):
        assert project_tasks_dir() in tasks[name].parents


# --------------------------------------------------------------------------------------
# data checks (no network: offline env vars, or a patched probe)


@pytest.mark.parametrize("name", PRESETS)
def test_offline_without_mirror_fails_fast(name, offline):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    cfg = compose(f"task={name}")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert time.perf_counter() - t0 < 3.0  # not lmms-eval's 5 retries
    msg = str(e.value)
    assert "\n" not in msg
    assert LMMS[name][1] in msg and "task.dataset_path=" in msg and "HF_HUB_OFFLINE" in msg


def test_dataset_path_missing(tmp_path):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    missing = tmp_path / "no" / "such" / "mirror"
    with pytest.raises(ConfigError, match=rf"task\.dataset_path={missing} does not exist"):
        check(compose("task=docvqa_val", f"task.dataset_path={missing}"))


def test_mirror_layout_is_checked(tmp_path, offline):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    bare = tmp_path / "bare"
    (bare / "DocVQA").mkdir(parents=True)
    (bare / "DocVQA" / "validation-00000.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no README\.md with a `configs:` section.*config 'DocVQA'"):
        check(compose("task=docvqa_val", f"task.dataset_path={bare}"))
    (bare / "README.md").write_text(_readme({"InfographicVQA": "InfographicVQA/validation-*"}))
    with pytest.raises(ConfigError, match=r"no config 'DocVQA'"):
        check(compose("task=docvqa_val", f"task.dataset_path={bare}"))
    with pytest.raises(ConfigError, match=r"no files match"):
        check(compose("task=infovqa_val", f"task.dataset_path={bare}"))
    (bare / "README.md").write_text(_readme({"DocVQA": "DocVQA/validation-*"}))
    check(compose("task=docvqa_val", f"task.dataset_path={bare}"))  # layout ok (content is lmms-eval's business)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"holds no data files"):
        check(compose("task=chartqa", f"task.dataset_path={empty}"))


def test_cached_dataset_passes_offline(offline):
    """Offline, the check passes exactly when lmms-eval's datasets cache holds the task's dataset
    in the layout `datasets` reuses (<cache>/<ns>___<snake_name>/<config>/<version>/<hash>/), and
    fails naming the dataset and the cache otherwise. Catches a cache detection (task_data.cached)
    that always says yes (a missing or misnamed copy would pass, and lmms-eval would then retry
    the Hub 5 times) or always says no (a cached dataset would be refused)."""
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    cache = offline.parent / "lmms_cache"
    cfg = compose("task=docvqa_val")
    refused = r"lmms-lab-encoder/DocVQA \(config DocVQA\).*HF_HUB_OFFLINE=1.*not in the datasets cache " + re.escape(str(cache))
    with pytest.raises(ConfigError, match=refused):
        check(cfg)  # nothing cached
    wrong = [
        cache / "lmms-lab-encoder___DocVQA" / "DocVQA" / "0.0.0" / "abc123",             # name not snake_cased
        cache / "lmms-lab-encoder___doc_vqa" / "InfographicVQA" / "0.0.0" / "abc123",    # another config
        cache / "lmms-lab-encoder___doc_vqa" / "DocVQA" / "0.0.0",                       # no prepared copy inside
        offline / "datasets" / "lmms-lab-encoder___doc_vqa" / "DocVQA" / "0.0.0" / "abc123",  # not lmms-eval's cache
    ]
    for path in wrong:
        path.mkdir(parents=True, exist_ok=True)
        with pytest.raises(ConfigError, match=refused):
            check(cfg)
    (cache / "lmms-lab-encoder___doc_vqa" / "DocVQA" / "0.0.0" / "abc123").mkdir(parents=True)
    check(cfg)  # the cached copy lmms-eval will load offline: no error


def test_online_passes_and_unreachable_hub_fails(monkeypatch, tmp_path):
    from dvlm_exp.evaluation import task_data
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr(task_data, "offline_reason", lambda: None)
    monkeypatch.setattr(task_data, "hub_reachable", lambda timeout=2.0: True)
    check(compose("task=mme"))  # lmms-eval downloads it
    monkeypatch.setattr(task_data, "hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(ConfigError, match=r"lmms-lab-encoder/MME.*unreachable.*task\.dataset_path="):
        check(compose("task=mme"))


def test_video_tasks_need_hf_home_and_videos(tmp_path, offline, monkeypatch):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    mirror = tmp_path / "vdd"
    (mirror / "data").mkdir(parents=True)
    (mirror / "data" / "test-00000.parquet").write_bytes(b"")
    cfg = compose("task=video_dc499", f"task.dataset_path={mirror}")
    with pytest.raises(ConfigError, match=r"videochatgpt.*Test_Videos"):
        check(cfg)
    (offline / "videochatgpt" / "Test_Videos").mkdir(parents=True)
    check(cfg)
    monkeypatch.delenv("HF_HOME")
    with pytest.raises(ConfigError, match=r"video_dc499 needs HF_HOME set"):
        check(cfg)


def test_gqa_images_loaded_by_name_need_the_cache(tmp_path, offline):
    from dvlm_exp.errors import ConfigError
    from dvlm_exp.run.validate import check

    mirror = tmp_path / "gqa"
    mirror.mkdir()
    (mirror / "README.md").write_text(_readme({"testdev_balanced_instructions": "x/testdev-*"}, split="testdev"))
    (mirror / "x").mkdir()
    (mirror / "x" / "testdev-0.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"lmms-lab-encoder/GQA \(config testdev_balanced_images\)"):
        check(compose("task=gqa", f"task.dataset_path={mirror}"))


# --------------------------------------------------------------------------------------
# LLaDA-V's answer parsing


@pytest.mark.parametrize("text,answer", [
    ("The page says 12. Answer: 4821", "4821"),
    ("  4821  ", "4821"),  # no "Answer:" -> the whole reply, stripped
    ("Answer: 12. Then again, Answer: 4821.", "4821"),  # the last one wins
    ("The total is shown. **Answer:** $1,200.", "$1,200"),
    ("Answer: 10:30", "10:30"),
    ("Reason only, no final answer", "Reason only, no final answer"),
])
def test_parse_answer(text, answer):
    from dvlm_exp.tasks.llada_v_docvqa.utils import parse_answer

    assert parse_answer(text) == answer


def test_parse_answer_strict_and_scoring():
    from dvlm_exp.tasks.llada_v_docvqa.utils import parse_answer, process_results

    assert parse_answer("no marker", strict=True) is None
    doc = {"answers": ["4821", "4,821"]}
    assert process_results(doc, ["The page says 12. Answer: 4821"]) == {"anls": 1.0}
    assert process_results(doc, ["Answer: 12"]) == {"anls": 0}
    assert process_results(doc, ["  4821 "]) == {"anls": 1.0}  # no marker: the whole reply


# --------------------------------------------------------------------------------------
# end to end: lmms-eval on a tiny local mirror of lmms-lab-encoder/DocVQA


def _readme(configs: dict[str, str], split: str = "validation") -> str:
    lines = ["---", "configs:"]
    for name, pattern in configs.items():
        lines += [f"- config_name: {name}", "  data_files:", f"  - split: {split}", f"    path: {pattern}"]
    return "\n".join(lines + ["---", "", "# local mirror for tests", ""])


GOLD = {"DocVQA": ["4821", "Acme Corp", "12/03/1998"], "InfographicVQA": ["37%", "blue", "1,024"]}


def build_mirror(root: Path) -> Path:
    """README.md with configs + <config>/validation-*.parquet, DocVQA's schema, 3 questions each."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    features = Features({
        "questionId": Value("string"), "question": Value("string"), "question_types": Sequence(Value("string")),
        "image": Image(), "docId": Value("int32"), "ucsf_document_id": Value("string"),
        "ucsf_document_page_no": Value("string"), "answers": Sequence(Value("string")), "data_split": Value("string"),
    })
    for config, golds in GOLD.items():
        rows = {k: [] for k in features}
        for i, gold in enumerate(golds):
            rows["questionId"].append(f"{config}-{i}")
            rows["question"].append(f"What is field {i}?")
            rows["question_types"].append(["form"])
            rows["image"].append(PILImage.new("RGB", (64 + 8 * i, 48), (255, 255 - 40 * i, 255)))
            rows["docId"].append(i)
            rows["ucsf_document_id"].append(f"doc{i}")
            rows["ucsf_document_page_no"].append("1")
            rows["answers"].append([gold, gold.upper()])
            rows["data_split"].append("val")
        (root / config).mkdir(parents=True)
        Dataset.from_dict(rows, features=features).to_parquet(str(root / config / "validation-00000-of-00001.parquet"))
    (root / "README.md").write_text(_readme({c: f"{c}/validation-*" for c in GOLD}))
    return root


def test_llada_v_docvqa_end_to_end_on_local_mirror(tmp_path, offline, task_manager):
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate

    from dvlm_exp.run.build import task_entry
    from dvlm_exp.run.validate import check

    mirror = build_mirror(tmp_path / "DocVQA")

    class Oracle(lmms):
        """Reads the gold answer; replies LLaDA-V style to the 'Answer: X' prompt, plainly otherwise."""

        def __init__(self):
            super().__init__()
            self.contexts = {}

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, _gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                assert doc_to_visual(doc)[0].mode == "RGB"
                gold = doc["answers"][0]
                self.contexts.setdefault(task, []).append(ctx)
                if ctx.endswith(LLADA_V_POST):
                    out.append(f"The form has a field labelled Answer: blank. Reading the page... Answer: {gold}.")
                else:
                    out.append(gold)
            return out

        def generate_until_multi_round(self, requests):
            return self.generate_until(requests)

        def loglikelihood(self, requests):
            raise NotImplementedError

    entries = []
    for name, prompt in [("docvqa_val", "llada_v"), ("docvqa_val", "stock"), ("infovqa_val", "llada_v")]:
        cfg = compose(f"task={name}", f"task.prompt={prompt}", f"task.dataset_path={mirror}", "limit=null")
        check(cfg)  # the mirror passes the offline data check
        entries.append(task_entry(cfg))
    assert entries[0] == {"task": "docvqa_val_llada_v", "dataset_path": str(mirror.resolve())}

    lm = Oracle()
    res = simple_evaluate(model=lm, tasks=entries, task_manager=task_manager, limit=None, bootstrap_iters=0,
                          log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    for task in ("docvqa_val_llada_v", "docvqa_val", "infovqa_val_llada_v"):
        assert res["results"][task]["anls,none"] == pytest.approx(1.0), task
        assert len(res["samples"][task]) == 3
        assert len(lm.contexts[task]) == 3
    assert all(c.endswith(LLADA_V_POST) for c in lm.contexts["docvqa_val_llada_v"])
    assert all(c.endswith(STOCK_POST) for c in lm.contexts["docvqa_val"])
    assert {c.split("\n")[0] for c in lm.contexts["infovqa_val_llada_v"]} == {f"What is field {i}?" for i in range(3)}
    # unparsed, the same LLaDA-V-style replies score 0 under the stock task's plain ANLS
    from lmms_eval.api.metrics import anls

    assert anls(["4821"], ["The form has a field labelled Answer: blank. Reading the page... Answer: 4821"])["anls"] == 0
