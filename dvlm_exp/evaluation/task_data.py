"""Is the data of a benchmark task reachable? Checked before any weight loads; no torch, no lmms-eval import.

lmms-eval hides a dataset it cannot load behind five retries and a `tenacity.RetryError`
(ecosystem.md §4.1). `check_task_data(cfg)` answers the question up front, from the task's own
lmms-eval YAML (read as text from site-packages or dvlm_exp/tasks, `include:` resolved):

- `task.dataset_path` given: it must be an existing local directory shaped like a mirror of the
  HF dataset repo (README.md whose `configs:` names the task's `dataset_name`, with files for the
  task's split; or, for tasks without `dataset_name`, data files).
- not given, and the Hub is out of reach (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` set, or
  huggingface_hub's / datasets' offline constant, or a 2 s TCP probe of the Hub endpoint fails
  when no proxy is configured): the HF datasets cache must already hold the dataset, or the check
  fails naming the HF dataset id and `task.dataset_path=/path/to/mirror`.
- video tasks: `$HF_HOME/<cache_dir>` must hold the videos when offline (lmms-eval otherwise
  calls `snapshot_download`), and tasks whose utils.py reads `os.environ["HF_HOME"]` at import
  (video_dc499) need HF_HOME set at all.
- datasets a task's utils.py loads by literal hub id (gqa's images) must be cached when offline:
  `task.dataset_path` does not redirect them.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# dataset_path values that name a local `datasets` builder rather than a hub repo
LOCAL_BUILDERS = {"json", "csv", "parquet", "arrow", "text", "pandas", "imagefolder", "audiofolder", "videofolder",
                  "webdataset", "xml", "sql", "generator"}
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".zip", ".tar")
_TRUE = {"1", "on", "yes", "true"}
_TASK_RE = re.compile(r"""^task[ \t]*:[ \t]*["']?([^"'\s#\[]+)["']?[ \t]*(?:#.*)?$""", re.M)
_GROUP_RE = re.compile(r"""^group:[ \t]*["']?([^"'\s#\[]+)["']?[ \t]*(?:#.*)?$""", re.M)
_HUB_LOAD_RE = re.compile(r"""load_dataset\(\s*["']([\w.\-]+/[\w.\-]+)["']\s*,\s*["']([^"']+)["']""")
_VIDEO_LAYOUT = {  # where lmms-eval's utils look for the files, for the error messages
    "videochatgpt": "Test_Videos/<video_name>.mp4",
    "videomme": "data/<videoID>.mp4",
}


class TaskDataError(ValueError):
    pass


@dataclass
class TaskSpec:
    task: str
    yaml_path: Path
    dataset_path: str | None
    dataset_name: str | None
    split: str | None
    dataset_kwargs: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str | None:
        """The HF dataset repo the task downloads, or None for local builders / load_from_disk."""
        p = self.dataset_path
        if not p or p in LOCAL_BUILDERS or self.dataset_kwargs.get("load_from_disk") or os.path.isabs(p):
            return None
        return p

    @property
    def video(self) -> bool:
        return bool(self.dataset_kwargs.get("video"))

    @property
    def utils_text(self) -> str:
        u = self.yaml_path.parent / "utils.py"
        return u.read_text(errors="ignore") if u.is_file() else ""


# ------------------------------------------------------------------------------------------
# task YAMLs


def lmms_tasks_dir() -> Path | None:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def project_tasks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "tasks"


@functools.lru_cache(maxsize=None)
def task_index() -> tuple[dict[str, Path], dict[str, Path]]:
    """(task name -> YAML, group name -> YAML) over dvlm_exp/tasks and lmms-eval's built-in tasks.

    Built-in names win over project names, as in lmms-eval's TaskManager (ecosystem.md §4.4).
    """
    tasks: dict[str, Path] = {}
    groups: dict[str, Path] = {}
    for root in (project_tasks_dir(), lmms_tasks_dir()):
        if root is None or not root.is_dir():
            continue
        for p in sorted(root.rglob("*.yaml")):
            text = p.read_text(errors="ignore")
            for m in _TASK_RE.finditer(text):
                tasks[m.group(1)] = p
            for m in _GROUP_RE.finditer(text):
                groups[m.group(1)] = p
    return tasks, groups


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !function ... -> None


def load_task_yaml(path: Path, _depth: int = 0) -> dict:
    """A task YAML with its `include:` chain merged (the file's own keys win)."""
    data = yaml.load(path.read_text(errors="ignore"), Loader=_Loader) or {}
    inc = data.pop("include", None)
    if inc and _depth < 8:
        incs = inc if isinstance(inc, list) else [inc]
        base: dict = {}
        for i in incs:
            ip = Path(i) if os.path.isabs(i) else path.parent / i
            if ip.is_file():
                base.update(load_task_yaml(ip, _depth + 1))
        base.update(data)
        data = base
    return data


def task_specs(name: str) -> list[TaskSpec]:
    """The data specs of an lmms-eval task name (a group gives one per member task)."""
    tasks, groups = task_index()
    if name in tasks:
        path = tasks[name]
        d = load_task_yaml(path)
        return [TaskSpec(task=name, yaml_path=path, dataset_path=d.get("dataset_path"),
                         dataset_name=d.get("dataset_name"), split=d.get("test_split"),
                         dataset_kwargs=dict(d.get("dataset_kwargs") or {}))]
    if name in groups:
        members = load_task_yaml(groups[name]).get("task") or []
        out = []
        for m in members if isinstance(members, list) else [members]:
            if isinstance(m, str):
                out += task_specs(m)
        return out
    raise TaskDataError(f"task.lmms_task={name} is not an lmms-eval task (not in lmms-eval's built-in tasks "
                        f"nor in {project_tasks_dir()})")


# ------------------------------------------------------------------------------------------
# offline detection and caches


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in _TRUE


def offline_reason() -> str | None:
    """Why the Hub is known to be out of reach without touching the network, or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var}={os.environ[var]}"
    import sys

    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and getattr(hub, "HF_HUB_OFFLINE", False) is True:
        return "huggingface_hub offline mode"
    dsc = sys.modules.get("datasets.config")
    if dsc is not None and (getattr(dsc, "HF_HUB_OFFLINE", False) is True or getattr(dsc, "HF_DATASETS_OFFLINE", False) is True):
        return "datasets offline mode"
    return None


def hub_reachable(timeout: float = 2.0) -> bool:
    """A TCP connect to the Hub endpoint, bounded (DNS included) by `timeout`.

    Skipped (assumed reachable) behind an HTTP(S) proxy, where a direct connect says nothing.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    m = re.match(r"^(?:(https?)://)?([^/:]+)(?::(\d+))?", endpoint)
    if not m:
        return True
    host, port = m.group(2), int(m.group(3) or (80 if m.group(1) == "http" else 443))
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _hf_home() -> str:
    return os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface"))


def lmms_datasets_cache() -> Path:
    """The cache_dir lmms-eval passes to load_dataset (api/task.py::_resolve_hf_datasets_cache_dir)."""
    explicit = os.environ.get("LMMS_EVAL_DATASETS_CACHE", "").strip()
    if explicit:
        return Path(os.path.expanduser(explicit))
    return datasets_cache()


def datasets_cache() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE", os.path.join(_hf_home(), "datasets"))))


def _snakecase(name: str) -> str:  # datasets.naming.camelcase_to_snakecase, without importing datasets
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name)
    return name.lower()


def cached(repo_id: str, config: str | None, cache: Path) -> bool:
    """Does a `datasets` cache hold a prepared copy (the layout load_dataset reuses offline)?"""
    ns, _, name = repo_id.rpartition("/")
    root = cache / (f"{ns}___{_snakecase(name)}" if ns else _snakecase(name))
    pattern = os.path.join(glob.escape(str(root)), glob.escape(config) if config else "*", "*", "*")
    return any(os.path.isdir(p) for p in glob.glob(pattern))


# ------------------------------------------------------------------------------------------
# mirror layout


def _readme_configs(mirror: Path) -> list[dict] | None:
    readme = mirror / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="ignore")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    confs = meta.get("configs")
    return confs if isinstance(confs, list) else None


def _split_patterns(conf: dict, split: str | None) -> list[str] | None:
    """The data_files patterns of `split` in a README config; None when the config has no per-split list."""
    files = conf.get("data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and "split" in f for f in files):
        return None
    pats: list[str] = []
    for f in files:
        if f["split"] == split:
            pats += f["path"] if isinstance(f["path"], list) else [f["path"]]
    return pats


def check_mirror(mirror: Path, spec: TaskSpec, override: str) -> None:
    src = f"{spec.hub_id} " if spec.hub_id else ""
    layout = f"a local copy of {src}with README.md (its `configs:` section) and the data shards (ecosystem.md §4.2)"
    confs = _readme_configs(mirror)
    wanted = spec.dataset_name or "default"
    if spec.dataset_name and confs is None:
        raise TaskDataError(f"task.dataset_path={override} has no README.md with a `configs:` section; lmms-eval task "
                            f"{spec.task} loads config '{spec.dataset_name}' of it: mirror {layout}")
    if confs is not None:
        conf = next((c for c in confs if isinstance(c, dict) and c.get("config_name", "default") == wanted), None)
        if conf is None:
            if spec.dataset_name:
                names = [c.get("config_name", "default") for c in confs if isinstance(c, dict)]
                raise TaskDataError(f"task.dataset_path={override}: README.md `configs:` has no config "
                                    f"'{spec.dataset_name}' (has {names}); lmms-eval task {spec.task} needs it: mirror {layout}")
        else:
            pats = _split_patterns(conf, spec.split)
            if pats is not None:
                if not pats:
                    raise TaskDataError(f"task.dataset_path={override}: README.md config '{wanted}' lists no "
                                        f"'{spec.split}' split, which lmms-eval task {spec.task} evaluates")
                if not any(glob.glob(str(mirror / p), recursive=True) for p in pats):
                    raise TaskDataError(f"task.dataset_path={override}: no files match {pats} (config '{wanted}', "
                                        f"split '{spec.split}' of lmms-eval task {spec.task}): copy the shards too")
            return
    if not any(p.suffix in DATA_SUFFIXES and p.is_file() and p.name != "README.md" for p in mirror.rglob("*")):
        raise TaskDataError(f"task.dataset_path={override} holds no data files (.parquet, .arrow, .json[l], .csv): "
                            f"mirror {layout}")


# ------------------------------------------------------------------------------------------
# the check


def check_task_data(cfg) -> None:
    """Raise TaskDataError (one line) when the task's data cannot be reached; no-op for synthetic tasks."""
    t = cfg.task
    if t.get("synthetic") is not None:
        return
    override = t.get("dataset_path")
    mirror = Path(os.path.expanduser(str(override))).resolve() if override not in (None, "") else None
    if mirror is not None and not mirror.is_dir():
        raise TaskDataError(f"task.dataset_path={override} does not exist or is not a directory "
                            f"(a local mirror of the task's HF dataset repo: README.md with `configs:` + the parquet shards)")
    specs = task_specs(str(t.lmms_task))
    reason = offline_reason()
    probed = False

    def unreachable() -> str | None:
        nonlocal reason, probed
        if reason is None and not probed:
            probed = True
            if not hub_reachable():
                reason = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} is unreachable"
        return reason

    for spec in specs:
        if mirror is not None:
            check_mirror(mirror, spec, str(override))
        elif spec.hub_id and not cached(spec.hub_id, spec.dataset_name, lmms_datasets_cache()) and unreachable():
            conf = f" (config {spec.dataset_name})" if spec.dataset_name else ""
            videos = (f"; its videos go under $HF_HOME/{spec.dataset_kwargs.get('cache_dir', '')} (HF_HOME set before the run)"
                      if spec.video else "")
            raise TaskDataError(
                f"task={t.get('name', spec.task)}: lmms-eval task {spec.task} needs the HF dataset {spec.hub_id}{conf}, "
                f"which cannot be downloaded ({reason}) and is not in the datasets cache {lmms_datasets_cache()}; "
                f"pass task.dataset_path=/path/to/mirror (a local copy of {spec.hub_id}: README.md with `configs:` "
                f"+ the parquet shards){videos}")
        if spec.video:
            if 'os.environ["HF_HOME"]' in spec.utils_text or "os.environ['HF_HOME']" in spec.utils_text:
                if not os.environ.get("HF_HOME"):
                    raise TaskDataError(f"lmms-eval task {spec.task} needs HF_HOME set (its utils.py reads it at import) "
                                        f"and the videos under $HF_HOME/{spec.dataset_kwargs.get('cache_dir', '')}")
            sub = str(spec.dataset_kwargs.get("cache_dir") or "")
            vdir = Path(os.path.expanduser(os.path.expandvars(sub)))
            vdir = vdir if vdir.is_absolute() else Path(_hf_home()) / sub
            has = vdir.is_dir() and any(vdir.iterdir())
            if not has and unreachable():
                where = f" ({_VIDEO_LAYOUT[sub]})" if sub in _VIDEO_LAYOUT else ""
                raise TaskDataError(f"lmms-eval task {spec.task} reads its videos from {vdir}{where}, which is missing or "
                                    f"empty, and cannot download them ({reason}): stage the videos there (HF_HOME={_hf_home()})")
        for repo, conf in _HUB_LOAD_RE.findall(spec.utils_text):
            if not cached(repo, conf, datasets_cache()) and unreachable():
                raise TaskDataError(
                    f"lmms-eval task {spec.task} also loads the HF dataset {repo} (config {conf}) by name in its utils.py, "
                    f"which task.dataset_path does not redirect; it cannot be downloaded ({reason}) and is not in the "
                    f"datasets cache {datasets_cache()}: run once online or copy that cache")
