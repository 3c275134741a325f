"""LLM judge for caption tasks: any OpenAI-compatible chat-completions endpoint.

Config (`conf/judge/*.yaml`, group `judge`; default `judge=none`)::

    judge=openai judge.base_url=http://127.0.0.1:8000/v1 judge.model=Qwen2.5-7B-Instruct
    # or DVLM_JUDGE_URL / DVLM_JUDGE_MODEL in the environment; the key is read from the
    # environment variable named by judge.api_key_env (default OPENAI_API_KEY)

`base_url` is the API root (`.../v1`); a full `.../chat/completions` URL is accepted too. The API
key itself is never part of the config, results.json, predictions or log lines: only the name of
the variable it is read from.

Tasks name their judged metric in their preset (`task.judge_metric`) and how the judge is reached
(`task.judge_via`):

- `dvlm` (synth_video_caption): the task's process_results calls `active()`, a `Judge` the runner
  activates around `simple_evaluate`;
- `lmms_env` (video_dc499): lmms-eval's own judge code, pointed at the endpoint through
  OPENAI_API_URL / MODEL_VERSION / OPENAI_API_KEY, which its utils.py reads at import
  (`lmms_env` sets them, and patches a module imported earlier in the process).

`preflight(cfg)` runs before any weight loads: with a judge configured for a judged task it sends
one cheap request (GET <base_url>/models, or a 1-token completion where /models is missing) and
raises `JudgeUnreachable` (a ConfigError: run.py prints one `error:` line naming the URL, exit 2).
Without a judge, judged tasks run predict-only: predictions are kept, lexical metrics still
computed, and `python scripts/judge.py <run_dir>` scores them later (`score_run`).

The prompt and score parsing are video_dc499's (lmms-eval 0.7.3
`tasks/video_detail_description/utils.py`): a 0-5 "detail orientation" score returned as a Python
dict string, truncated to an integer like lmms-eval's `parse_score`.
"""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dvlm_exp.errors import ConfigError

PREDICT_ONLY_HINT = "judge: none (predict-only) — judge later with `python scripts/judge.py {run_dir}`"

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the detail orientation of generative outputs for "
    "video-based question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine its level of detail, considering both completeness and specificity. Here's how you can accomplish "
    "the task:------##INSTRUCTIONS: - Check if the predicted answer covers all major points from the video. The "
    "response should not leave out any key aspects.\n- Evaluate whether the predicted answer includes specific "
    "details rather than just generic points. It should provide comprehensive information that is tied to specific "
    "elements of the video.\n- Consider synonyms or paraphrases as valid matches.\n- Provide a single evaluation "
    "score that reflects the level of detail orientation of the prediction, considering both completeness and "
    "specificity."
)
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {pred}\n\n"
    "Provide your evaluation only as a detail orientation score where the detail orientation score is an integer "
    "value between 0 and 5, with 5 indicating the highest level of detail orientation. Please generate the response "
    "in the form of a Python dictionary string with keys 'score', where its value is the detail orientation score in "
    "INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary "
    "string. For example, your response should look like this: {{'score': 4.8}}."
)


class JudgeUnreachable(ConfigError):
    pass


@dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    check_timeout_s: float = 5.0
    max_tokens: int = 64
    retry_wait_s: float = 2.0

    @property
    def root(self) -> str:
        u = self.base_url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            if u.endswith(suffix):
                u = u[: -len(suffix)]
        return u

    @property
    def chat_url(self) -> str:
        return self.root + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.root + "/models"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def headers(self) -> dict:
        key = self.api_key()
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def public(self) -> dict:
        """What results.json records: endpoint and model, the key's variable name, never the key."""
        return {"base_url": self.root, "model": self.model, "api_key_env": self.api_key_env,
                "api_key_set": self.api_key() is not None}


def from_cfg(j) -> JudgeConfig | None:
    """The configured judge (a `judge` config block / dict), or None when no base_url is set."""
    if j is None:
        return None
    get = j.get
    url = get("base_url")
    if url in (None, "", "null", "none"):
        return None
    if not str(url).startswith(("http://", "https://")):
        raise ConfigError(f"judge.base_url={url} must be an http(s) URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    if not get("model"):
        raise ConfigError(f"judge.base_url={url} needs judge.model=<served model name> (or DVLM_JUDGE_MODEL)")
    kw = {k: get(k) for k in ("api_key_env", "timeout_s", "max_retries", "check_timeout_s", "max_tokens", "retry_wait_s")
          if get(k) is not None}
    return JudgeConfig(base_url=str(url), model=str(get("model")), **kw)


def task_judging(cfg) -> tuple[str, str] | None:
    """(judged metric, how the judge is reached) of the configured task, or None for judge-free tasks."""
    t = cfg.task
    metric = t.get("judge_metric")
    if not metric:
        return None
    return str(metric), str(t.get("judge_via") or "dvlm")


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client(jc: JudgeConfig, timeout: float):
    import httpx

    # a judge on loopback must not go through HTTP(S)_PROXY from the environment
    return httpx.Client(timeout=timeout, trust_env=not _is_loopback(jc.root))


def check_reachable(jc: JudgeConfig) -> dict:
    """One cheap request before the run; raises JudgeUnreachable naming the URL. Returns {served_models}."""
    import httpx

    hint = ("start the judge server or fix judge.base_url=, or run without a judge (judge=none: predict-only, "
            "score later with `python scripts/judge.py <run_dir>`)")
    try:
        with _client(jc, jc.check_timeout_s) as c:
            r = c.get(jc.models_url, headers=jc.headers())
            if r.status_code in (404, 405):  # no /models on this server: a 1-token completion instead
                r = c.post(jc.chat_url, headers=jc.headers(), json={
                    "model": jc.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0})
    except httpx.HTTPError as e:
        raise JudgeUnreachable(f"judge at {jc.root} is unreachable ({type(e).__name__}: {e}); {hint}") from None
    if r.status_code in (401, 403):
        raise JudgeUnreachable(f"judge at {jc.root} rejected the request (HTTP {r.status_code}): check the API key in "
                               f"${jc.api_key_env} (judge.api_key_env)")
    if r.status_code >= 400:
        raise JudgeUnreachable(f"judge at {jc.root} answered HTTP {r.status_code} to {r.request.url}; {hint}")
    served: list[str] = []
    try:
        data = r.json().get("data")
        if isinstance(data, list):
            served = [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]
    except (ValueError, AttributeError):
        pass
    if served and jc.model not in served:
        print(f"warning: judge at {jc.root} does not list model {jc.model!r} (serves {served[:8]}); "
              f"requests may fail", file=sys.stderr, flush=True)
    return {"served_models": served}


def parse_score(text: str | None) -> int | None:
    """video_dc499's parsing: a Python dict string {'score': x} -> int(x) (truncated), clamped to [0, 5].
    Falls back to the first number after 'score' or a bare number; None when there is none."""
    if not text:
        return None
    val = None
    try:
        d = ast.literal_eval(text.strip())
        if isinstance(d, dict) and "score" in d:
            val = d["score"]
        elif isinstance(d, (int, float)):
            val = d
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        m = re.search(r"score['\"]?\s*[:=]\s*['\"]?(-?\d+(?:\.\d+)?)", text) or re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*", text)
        if m:
            val = m.group(1)
    try:
        return max(0, min(5, int(float(val)))) if val is not None else None
    except (TypeError, ValueError):
        return None


class Judge:
    """Scores (question, reference, prediction) triples. Thread-safe: lmms-eval runs process_results
    for several documents in parallel threads (one shared httpx client, counters under a lock)."""

    def __init__(self, jc: JudgeConfig):
        self.jc = jc
        self.n_requests = 0
        self.n_failed = 0
        self.served_model: str | None = None
        self._http = None
        self._lock = threading.Lock()

    def messages(self, question: str, answer: str, pred: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)}]

    def _post(self, payload: dict):
        with self._lock:
            if self._http is None:
                self._http = _client(self.jc, self.jc.timeout_s)
            self.n_requests += 1
        return self._http.post(self.jc.chat_url, headers=self.jc.headers(), json=payload)

    def score(self, question: str, answer, pred: str) -> tuple[int | None, str]:
        """(score 0-5 or None when the judge failed after its retries, the judge's reply or the error)."""
        import httpx

        if isinstance(answer, (list, tuple)):
            answer = answer[0] if len(answer) == 1 else " / ".join(map(str, answer))
        payload = {"model": self.jc.model, "messages": self.messages(question, str(answer), str(pred)),
                   "temperature": 0, "max_tokens": int(self.jc.max_tokens)}
        err = "no attempt"
        for attempt in range(int(self.jc.max_retries) + 1):
            if attempt:
                time.sleep(min(30.0, float(self.jc.retry_wait_s) * 2 ** (attempt - 1)))
            try:
                r = self._post(payload)
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
                continue
            if r.status_code >= 400:
                err = f"HTTP {r.status_code}"
                if r.status_code in (400, 401, 403, 404):  # retrying cannot help
                    break
                continue
            try:
                data = r.json()
                content = (data["choices"][0]["message"]["content"] or "").strip()
                self.served_model = data.get("model") or self.served_model
            except (ValueError, KeyError, IndexError, TypeError) as e:
                err = f"bad response ({type(e).__name__})"
                continue
            s = parse_score(content)
            if s is None:
                err = f"unparsable reply: {content[:200]!r}"
                continue
            return s, content
        with self._lock:
            self.n_failed += 1
        return None, f"judge failed: {err}"

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def mean_score(items) -> float | None:
    """Aggregation of judge items ({"score": int | None, ...} or numbers): mean over the scored ones."""
    vals = [it.get("score") if isinstance(it, dict) else it for it in items]
    vals = [float(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------------------
# the judge the task code sees during an evaluation

_ACTIVE: Judge | None = None


def active() -> Judge | None:
    return _ACTIVE


@contextlib.contextmanager
def activate(judge: Judge | None):
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, judge
    try:
        yield judge
    finally:
        _ACTIVE = prev


_LMMS_ENV = ("OPENAI_API_URL", "MODEL_VERSION", "OPENAI_API_KEY", "API_TYPE")


@contextlib.contextmanager
def lmms_env(jc: JudgeConfig | None):
    """Point lmms-eval's built-in judge code (video_dc499) at `jc` for the duration of the block.

    Sets OPENAI_API_URL / MODEL_VERSION / OPENAI_API_KEY / API_TYPE (read by the task's utils.py at
    import) and patches the module globals if it was already imported in this process; restores both."""
    if jc is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in _LMMS_ENV}
    os.environ.update({"OPENAI_API_URL": jc.chat_url, "MODEL_VERSION": jc.model, "API_TYPE": "openai",
                       "OPENAI_API_KEY": jc.api_key() or "EMPTY"})
    patched = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None) or ""
        if f.replace(os.sep, "/").endswith("video_detail_description/utils.py"):
            old = {k: getattr(mod, k, None) for k in ("API_URL", "GPT_EVAL_MODEL_NAME", "headers")}
            mod.API_URL, mod.GPT_EVAL_MODEL_NAME = jc.chat_url, jc.model
            mod.headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}", "Content-Type": "application/json"}
            patched.append((mod, old))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, old in patched:
            for k, v in old.items():
                setattr(mod, k, v)


# ------------------------------------------------------------------------------------------
# runner hooks


def preflight(cfg) -> JudgeConfig | None:
    """Before weights load: the judge to use for this run (checked reachable), or None (predict-only
    for judged tasks; judge-free tasks ignore the judge block)."""
    if task_judging(cfg) is None:
        return None
    jc = from_cfg(cfg.get("judge"))
    if jc is None:
        if (cfg.get("judge") or {}).get("name") not in (None, "none"):
            raise ConfigError(f"judge={cfg.judge.name} needs judge.base_url=http://host:port/v1 (or DVLM_JUDGE_URL)")
        return None
    check_reachable(jc)
    return jc


def lmms_predict_only(cfg) -> bool:
    """lmms-eval predict_only for tasks judged by lmms-eval's own code (video_dc499) when no judge is
    configured: their scoring would otherwise retry api.openai.com per sample and score 0."""
    tj = task_judging(cfg)
    return tj is not None and tj[1] == "lmms_env" and from_cfg(cfg.get("judge")) is None


@contextlib.contextmanager
def session(cfg, jc: JudgeConfig | None):
    """Around simple_evaluate: the active Judge (via=dvlm) or lmms-eval's env vars (via=lmms_env).
    Yields the Judge object (None without a judge or for via=lmms_env)."""
    tj = task_judging(cfg)
    if jc is None or tj is None:
        yield None
    elif tj[1] == "lmms_env":
        with lmms_env(jc):
            yield None
    else:
        j = Judge(jc)
        try:
            with activate(j):
                yield j
        finally:
            j.close()


def record_info(cfg, jc: JudgeConfig | None, judge: Judge | None, predictions: list[dict]) -> dict | None:
    """results.json `judge`: null without a judge, else endpoint, model, metric and counts (no key)."""
    tj = task_judging(cfg)
    if jc is None or tj is None:
        return None
    metric, via = tj
    info = {**jc.public(), "metric": metric, "via": via}
    if judge is not None:
        info.update(served_model=judge.served_model, n_requests=judge.n_requests, n_failed=judge.n_failed)
    scored = [p for p in predictions if isinstance(p.get(metric), dict)]
    if scored:
        info["n_scored"] = sum(p[metric].get("score") is not None for p in scored)
    return info


def summary_line(record: dict, run_dir) -> str | None:
    tj = (record.get("config") or {}).get("task", {}).get("judge_metric")
    if not tj:
        return None
    j = record.get("judge")
    if j is None:
        return "  " + PREDICT_ONLY_HINT.format(run_dir=run_dir)
    failed = f", {j['n_failed']} failed" if j.get("n_failed") else ""
    return f"  judge     {j['model']} at {j['base_url']} ({j['metric']}{failed})"


# ------------------------------------------------------------------------------------------
# scripts/judge.py: score a finished (predict-only) run


def score_run(run_dir: str | Path, jc: JudgeConfig, progress: bool = False) -> dict:
    """Score predictions.jsonl of a complete run with the judge; write the judged metric into its
    results.json (atomically, status stays complete) and per-sample scores into predictions.jsonl."""
    from dvlm_exp.run import record as rec_io

    run_dir = Path(run_dir)
    if not rec_io.is_complete(run_dir):
        raise ConfigError(f"{run_dir} holds no complete run (results.json with status complete + .dvlm_complete)")
    record = rec_io.read_results(run_dir)
    task_cfg = (record.get("config") or {}).get("task") or {}
    metric = task_cfg.get("judge_metric")
    if not metric:
        raise ConfigError(f"task {record.get('task')} of {run_dir} has no judged metric (task.judge_metric)")
    pred_path = run_dir / "predictions.jsonl"
    preds = [json.loads(ln) for ln in pred_path.read_text().splitlines() if ln.strip()]
    if not preds:
        raise ConfigError(f"{pred_path} holds no predictions")
    check_reachable(jc)
    judge = Judge(jc)
    from dvlm_exp.evaluation.data.synth_video_caption import QUESTION

    try:
        for i, p in enumerate(preds):
            ref = p.get("target")
            if ref is None:
                raise ConfigError(f"{pred_path}: doc_id={p.get('doc_id')} has no reference (`target`)")
            s, review = judge.score(p.get("question") or QUESTION, ref, p.get("prediction") or "")
            p[metric] = {"score": s, "review": review}
            if progress:
                print(f"judge {i + 1}/{len(preds)}: doc_id={p.get('doc_id')} score={s}", file=sys.stderr, flush=True)
    finally:
        judge.close()
    value = mean_score([p[metric] for p in preds])
    metrics = {k: v for k, v in record.get("metrics", {}).items() if not k.startswith("bypass")}
    metrics[f"{metric},none"] = value
    record["metrics"] = metrics
    record["judge"] = {**jc.public(), "metric": metric, "via": "scripts/judge.py", "served_model": judge.served_model,
                       "n_requests": judge.n_requests, "n_failed": judge.n_failed,
                       "n_scored": sum(p[metric]["score"] is not None for p in preds),
                       "judged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rec_io.write_atomic(pred_path, "".join(json.dumps(p, default=str) + "\n" for p in preds))
    rec_io.write_results(run_dir, record)
    return {"run_dir": str(run_dir), "task": record.get("task"), "metric": metric, "score": value, "n": len(preds),
            "n_failed": judge.n_failed, "judge_model": jc.model, "base_url": jc.root}
