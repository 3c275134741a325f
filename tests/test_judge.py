"""LLM judge (dvlm_exp/evaluation/judge.py) against a small OpenAI-compatible server started on 127.0.0.1 by the
test (bounded: at most N requests, then it closes itself): a judged synth_video_caption run, the
unreachable-judge error before weights load, scripts/judge.py re-scoring a predict-only run, the
video_dc499 env wiring, and the API key never written anywhere."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from dvlm_exp.evaluation import judge as judging

SECRET = "sk-dvlm-test-SECRET-7f3a91c2"
TINY = ["model=tiny", "task=synth_video_caption", "limit=2", "task.synthetic.n=2", "task.video.max_frames=2",
        "task.gen.gen_length=8", "task.gen.block_length=8", "task.gen.steps=4", "progress=false"]


class MockJudge:
    """OpenAI-compatible /v1/models + /v1/chat/completions on 127.0.0.1 (ephemeral port). Serves at
    most `max_requests` requests or until `deadline_s`, then closes its socket by itself. Replies
    "{'score': s}" with s cycling through `scores`; `fail_first` requests get HTTP 500 first."""

    def __init__(self, scores=(4, 1), max_requests=16, deadline_s=180.0, model="mock-judge", fail_first=0):
        self.scores, self.model, self.fail_first = list(scores), model, fail_first
        self.requests: list[dict] = []
        self.replies: list[tuple[str, int]] = []  # (user prompt, score returned)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                outer.requests.append({"method": "POST", "path": self.path, "auth": self.headers.get("Authorization"),
                                       "body": body})
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self._send(500, {"error": {"message": "overloaded"}})
                    return
                score = outer.scores[len(outer.replies) % len(outer.scores)]
                outer.replies.append((body["messages"][-1]["content"], score))
                self._send(200, {"id": "c", "object": "chat.completion", "model": outer.model, "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"{{'score': {score}}}"}}]})

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.2
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.max_requests, self.deadline = max_requests, time.monotonic() + deadline_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            while len(self.requests) < self.max_requests and time.monotonic() < self.deadline and not self._stop.is_set():
                self.server.handle_request()
        finally:
            self.server.server_close()

    def close(self):
        self._stop.set()
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def files_text(d: Path) -> str:
    return "\n".join(p.read_text(errors="ignore") for p in Path(d).rglob("*") if p.is_file())


def read_preds(d: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(d) / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for var in ("DVLM_JUDGE_URL", "DVLM_JUDGE_MODEL", "OPENAI_API_URL", "MODEL_VERSION"):
        monkeypatch.delenv(var, raising=False)
    return SECRET


def compose(*overrides):
    from dvlm_exp.run.build import compose_config

    return compose_config(list(overrides))


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize("text,score", [
    ("{'score': 4}", 4), ("{'score': 4.8}", 4), ('{"score": 5}', 5), ("{'score': 9}", 5), ("3", 3),
    ("Sure! {'score': 2} because ...", 2), ("score: 1", 1), ("no idea", None), ("", None), ("{'other': 1}", None),
])
def test_parse_score(text, score):
    assert judging.parse_score(text) == score


def test_config_and_public_record_hold_no_key(secret):
    jc = judging.from_cfg({"base_url": "http://127.0.0.1:9/v1/chat/completions", "model": "m"})
    assert jc.root == "http://127.0.0.1:9/v1" and jc.chat_url.endswith("/v1/chat/completions")
    assert jc.models_url == "http://127.0.0.1:9/v1/models"
    assert jc.headers()["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in json.dumps(jc.public()) and jc.public()["api_key_env"] == "OPENAI_API_KEY"
    assert judging.from_cfg({"base_url": None, "model": "m"}) is None
    with pytest.raises(judging.ConfigError, match="judge.model"):
        judging.from_cfg({"base_url": "http://x/v1", "model": None})
    # judge=openai without an endpoint is an error for a judged task, ignored for judge-free tasks
    with pytest.raises(judging.ConfigError, match=r"judge.base_url"):
        judging.preflight(compose("task=synth_video_caption", "judge=openai"))
    assert judging.preflight(compose("judge=openai")) is None
    assert judging.preflight(compose("task=synth_video_caption")) is None  # judge=none: predict-only


def test_video_dc499_predict_only_without_judge():
    assert judging.lmms_predict_only(compose("task=video_dc499")) is True
    assert judging.lmms_predict_only(compose("task=video_dc499", "judge=openai", "judge.base_url=http://127.0.0.1:9/v1")) is False
    assert judging.lmms_predict_only(compose("task=synth_video_caption")) is False  # lexical metrics still run
    assert judging.lmms_predict_only(compose("task=docvqa_val")) is False


def test_judge_retries_then_scores(secret):
    with MockJudge(scores=(3,), fail_first=1, max_requests=4) as srv:
        j = judging.Judge(judging.from_cfg({"base_url": srv.url, "model": "mock-judge", "retry_wait_s": 0.01}))
        assert j.score("Q?", "the ref", "the pred") == (3, "{'score': 3}")
        assert j.n_requests == 2 and j.n_failed == 0 and j.served_model == "mock-judge"
        body = srv.requests[-1]["body"]
        assert body["model"] == "mock-judge" and body["temperature"] == 0 and body["max_tokens"] == 64
        assert srv.requests[-1]["auth"] == f"Bearer {SECRET}"
        j.close()


def test_lmms_video_dc499_env_wiring(secret, monkeypatch, tmp_path):
    """lmms-eval's own video_dc499 judge code (utils.py reads the env at import) talks to our endpoint."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with MockJudge(scores=(5,), max_requests=4) as srv:
        jc = judging.from_cfg({"base_url": srv.url, "model": "mock-judge"})
        with judging.lmms_env(jc):
            assert os.environ["OPENAI_API_URL"] == srv.url + "/chat/completions"
            assert os.environ["MODEL_VERSION"] == "mock-judge"
            import lmms_eval.tasks.video_detail_description.utils as dc

            review, model = dc.get_eval_generic("Q?", "ref answer", "pred answer", 64)
            assert (dc.parse_score(review), model) == (5, "mock-judge")
        assert "OPENAI_API_URL" not in os.environ and "MODEL_VERSION" not in os.environ
        # imported earlier in the process: the module globals are patched too, then restored
        other = judging.from_cfg({"base_url": srv.url.replace("/v1", "/v2"), "model": "other"})
        with judging.lmms_env(other):
            assert dc.API_URL.endswith("/v2/chat/completions") and dc.GPT_EVAL_MODEL_NAME == "other"
        assert dc.API_URL == srv.url + "/chat/completions"
    post = [r for r in srv.requests if r["method"] == "POST"]
    assert post and post[0]["auth"] == f"Bearer {SECRET}" and "pred answer" in post[0]["body"]["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------ runs


def test_judged_run(tmp_path, secret, capfd):
    from dvlm_exp.run.runner import run

    with MockJudge(scores=(4, 1), max_requests=8) as srv:
        cfg = compose(*TINY, "judge=openai", f"judge.base_url={srv.url}", "judge.model=mock-judge")
        run(cfg, tmp_path)
    out = capfd.readouterr()
    rec = json.loads((tmp_path / "results.json").read_text())
    preds = read_preds(tmp_path)
    assert rec["status"] == "complete" and len(preds) == 2
    # the prompts the judge received: question, reference and prediction of each sample
    assert len(srv.replies) == 2 and srv.requests[0]["method"] == "GET" and srv.requests[0]["path"] == "/v1/models"
    by_prompt = {}
    for p in preds:
        (prompt, score), = [(u, s) for u, s in srv.replies if f"Correct Answer: {p['target']}\n" in u]
        assert f"Question: {p['question']}\n" in prompt and f"Predicted Answer: {p['prediction']}\n" in prompt
        assert p["judge_score"]["score"] == score
        by_prompt[p["doc_id"]] = score
    assert rec["metrics"]["judge_score,none"] == pytest.approx(sum(by_prompt.values()) / 2) == pytest.approx(2.5)
    assert any(k.startswith("lexical_rouge_l") for k in rec["metrics"])
    j = rec["judge"]
    assert (j["model"], j["served_model"], j["base_url"], j["metric"], j["n_failed"]) == (
        "mock-judge", "mock-judge", srv.url, "judge_score", 0)
    assert all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)
    # the key is used, never written
    assert SECRET not in files_text(tmp_path) and SECRET not in out.out + out.err
    assert "judge     mock-judge" in out.out


def test_unreachable_judge_fails_before_weights(tmp_path, secret, monkeypatch):
    from dvlm_exp.run import build, runner

    url = f"http://127.0.0.1:{closed_port()}/v1"

    def no_weights(cfg):
        raise AssertionError("weights loaded before the judge check")

    monkeypatch.setattr(build, "load_model", no_weights)
    with pytest.raises(judging.JudgeUnreachable, match=f"judge at {url} is unreachable"):
        runner.run(compose(*TINY, "judge=openai", f"judge.base_url={url}", "judge.model=m"), tmp_path)
    # run.py: one error line naming the URL, exit 2, nothing written, no checkpoint materialised
    env = dict(os.environ, DVLM_CACHE=str(tmp_path / "fresh_cache"), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "run.py", *TINY, "judge=openai", f"judge.base_url={url}", "judge.model=m",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and url in errors[0] and "unreachable" in errors[0]
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "fresh_cache" / "models").exists()
    assert SECRET not in p.stdout + p.stderr
    print(f"run.py unreachable judge: {time.perf_counter() - t0:.1f}s")


def test_scripts_judge_rescores_predict_only_run(tmp_path, secret):
    from dvlm_exp.run.record import is_complete
    from dvlm_exp.run.runner import run

    run_dir = tmp_path / "run"
    run(compose(*TINY), run_dir)
    before = json.loads((run_dir / "results.json").read_text())
    assert before["judge"] is None and not any(k.startswith("judge_score") for k in before["metrics"])
    with MockJudge(scores=(5, 2), max_requests=8) as srv:
        p = subprocess.run([sys.executable, "scripts/judge.py", str(run_dir), f"judge.base_url={srv.url}",
                            "judge.model=mock-judge", "judge.retry_wait_s=0.01"],
                           cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["metric"] == "judge_score" and summary["n"] == 2 and summary["score"] == pytest.approx(3.5)
    after = json.loads((run_dir / "results.json").read_text())
    assert is_complete(run_dir) and after["status"] == "complete"
    assert after["metrics"]["judge_score,none"] == pytest.approx(3.5)
    assert {k: v for k, v in after["metrics"].items() if not k.startswith("judge")} == before["metrics"]
    assert after["judge"]["model"] == "mock-judge" and after["judge"]["via"] == "scripts/judge.py"
    preds = read_preds(run_dir)
    assert sorted(p_["judge_score"]["score"] for p_ in preds) == [2, 5]
    for p_ in preds:  # each score came back for that sample's own prompt
        (score,) = [s for u, s in srv.replies if f"Predicted Answer: {p_['prediction']}\n" in u
                    and f"Correct Answer: {p_['target']}\n" in u]
        assert p_["judge_score"]["score"] == score
    assert SECRET not in files_text(run_dir) and SECRET not in p.stdout + p.stderr
    # unreachable judge: error line naming the URL, results untouched
    snapshot = (run_dir / "results.json").read_text()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    p = subprocess.run([sys.executable, "scripts/judge.py", str(run_dir), f"judge.base_url={url}", "judge.model=m"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and url in p.stderr and (run_dir / "results.json").read_text() == snapshot
    shutil.rmtree(run_dir)


def test_video_dc499_preset_predict_only_and_judged(tmp_path, secret, monkeypatch):
    """The built-in video_dc499 preset on a local mirror (one synthetic clip staged where lmms-eval looks
    for the videos): without a judge lmms-eval runs predict-only; with one, lmms-eval's own judge code
    reaches the endpoint through the env vars set from the judge config, which are restored afterwards."""
    from dvlm_exp.evaluation.data.synth_video import make_clip
    from dvlm_exp.evaluation.data.synth_video_caption import QUESTION
    from dvlm_exp.run.runner import run

    hf = tmp_path / "hf"
    vids = hf / "videochatgpt" / "Test_Videos"
    vids.mkdir(parents=True)
    answer = make_clip(vids / "v_synth0.mp4", seed=3, n_frames=8, size=64)
    mirror = tmp_path / "VideoDetailDescription"
    mirror.mkdir()
    (mirror / "test.jsonl").write_text(json.dumps({"video_name": "v_synth0", "question": QUESTION, "answer": answer}) + "\n")
    monkeypatch.setenv("HF_HOME", str(hf))
    common = ["model=tiny", "task=video_dc499", f"task.dataset_path={mirror}", "+task.video.max_frames=2", "limit=1",
              "task.gen.gen_length=8", "task.gen.block_length=8", "task.gen.steps=4", "progress=false"]

    rec = run(compose(*common), tmp_path / "predict_only")
    assert rec["judge"] is None and "bypass,none" in rec["metrics"] and "gpt_eval_score,none" not in rec["metrics"]
    (pred,) = read_preds(tmp_path / "predict_only")
    assert pred["target"] == answer and pred["question"] == QUESTION and pred["n_visual"] == 420

    with MockJudge(scores=(3,), max_requests=6) as srv:
        rec = run(compose(*common, "judge=openai", f"judge.base_url={srv.url}", "judge.model=mock-judge"), tmp_path / "judged")
    assert rec["metrics"]["gpt_eval_score,none"] == 3.0
    assert (rec["judge"]["model"], rec["judge"]["via"], rec["judge"]["metric"]) == ("mock-judge", "lmms_env", "gpt_eval_score")
    (prompt, _), = srv.replies
    (pred,) = read_preds(tmp_path / "judged")
    assert f"Correct Answer: {answer}\n" in prompt and f"Predicted Answer: {pred['prediction']}\n" in prompt
    post = [r for r in srv.requests if r["method"] == "POST"]
    assert post[0]["body"]["model"] == "mock-judge" and post[0]["auth"] == f"Bearer {SECRET}"
    assert "OPENAI_API_URL" not in os.environ and "MODEL_VERSION" not in os.environ
    assert SECRET not in files_text(tmp_path / "judged")

    # and scripts/judge.py scores the predict-only run with the same prompt under lmms-eval's metric name
    with MockJudge(scores=(2,), max_requests=4) as srv:
        p = subprocess.run([sys.executable, "scripts/judge.py", str(tmp_path / "predict_only"), f"judge.base_url={srv.url}",
                            "judge.model=mock-judge", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-2000:]
    after = json.loads((tmp_path / "predict_only" / "results.json").read_text())
    assert after["metrics"] == {"gpt_eval_score,none": 2.0}  # bypass dropped
