"""Bad input ends with one `error:` line that says what to do, exit code 2, before any weight is read.

Each CLI case runs the real run.py in a subprocess from a scratch working directory (stdin closed,
HF offline) with `PYTHONPROFILEIMPORTTIME=1` (= `python -X importtime`, kept across the .venv
re-exec): the import log on stderr shows that neither `safetensors` (every weight goes through it)
nor `lmms_eval` was imported, and, for command-line errors, not even torch. W&B cases run offline:
the servers are an unused loopback port or a local stub, never the network.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from conftest import REPO

SMALL = ["model=tiny", "task=synth_docvqa", "limit=1", "task.gen.gen_length=8", "task.gen.block_length=8",
         "task.gen.steps=4", "progress=false"]
SANDBOX = REPO / "dvlm_exp" / "assets" / "sandbox"
FAKE_KEY = "a" * 40  # the shape of a W&B key; no server knows it
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


def run_cli(tmp_path: Path, *args, env_extra=None, timeout=180) -> subprocess.CompletedProcess:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPROFILEIMPORTTIME="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_SILENT="true", NETRC=str(tmp_path / "no-netrc"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "HYDRA_FULL_ERROR"):
        env.pop(var, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={tmp_path / 'run'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def imported(stderr: str) -> set[str]:
    mods = {ln.rsplit("|", 1)[1].strip() for ln in stderr.splitlines() if ln.startswith("import time:") and "|" in ln}
    assert "hydra" in mods, "no import log: PYTHONPROFILEIMPORTTIME did not reach the CLI's Python"
    return mods


def messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if not ln.startswith("import time:")]


def assert_refused(p: subprocess.CompletedProcess, tmp_path: Path, needles: list[str], torch_ok: bool = False) -> str:
    lines = messages(p.stderr)
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert p.returncode == 2, (p.returncode, "\n".join(lines)[-3000:])
    assert len(errors) == 1, "\n".join(lines)[-3000:]
    assert "Traceback" not in p.stderr, "\n".join(lines)[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    mods = imported(p.stderr)
    assert "safetensors" not in mods, "weights were read (safetensors imported) before the error"
    assert "lmms_eval" not in mods
    if not torch_ok:
        assert "torch" not in mods, "torch imported on a path that only checks the config"
    assert not [f for d in (tmp_path / "run", tmp_path / "sweep") if d.exists() for f in d.rglob("results.json")]
    return errors[0]


# ----------------------------------------------------------------------------- 1. the command line
@pytest.mark.parametrize("args,needles", [
    (["model=nope"], ["model=nope: no config 'nope' in group 'model'", "use one of:", "llada_v", "sandbox", "tiny",
                      "conf/model/"]),
    (["prune=nope"], ["prune=nope", "did you mean prune=none?", "use one of:", "fastv", "redvtp", "conf/prune/"]),
    (["task=nope"], ["task=nope", "use one of:", "docvqa_val", "synth_shapes", "conf/task/"]),
    (["schedule=nope"], ["schedule=nope", "use one of:", "at_step", "first_step", "conf/schedule/"]),
    (["ratoi=0.5"], ["ratoi=0.5: ratoi is not a key of the config: did you mean ratio=0.5?", "+ratoi=0.5"]),
    (["prune=fastv", "prune.layr=2"], ["did you mean prune.layer=2?"]),
    (["prune.layer=[1,"], ["cannot parse the override 'prune.layer=[1,'", "key=[a,b]", "override_grammar"]),
    (["-m", "prune=fastv,nope"], ["prune=nope: no config 'nope' in group 'prune'", "use one of:", "fastv",
                                  "[in the multirun job prune=nope]"]),
    (["prune=fastv,nope"], ["prune=fastv,nope gives several values: add -m", "prune='fastv,nope'"]),
])
def test_command_line(tmp_path, args, needles):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags go before the overrides
    p = run_cli(tmp_path, *flags, *SMALL, *[a for a in args if a not in flags], timeout=60)
    assert_refused(p, tmp_path, needles)


# ----------------------------------------------------------------------------- 2. values
@pytest.mark.parametrize("args,needles,env", [
    (["seed=x"], ["seed=x must be a non-negative integer"], None),
    (["seed=-1"], ["seed=-1 must be a non-negative integer"], None),
    (["seed=1.5"], ["seed=1.5 must be a non-negative integer"], None),
    (["loyalty=ture"], ["loyalty=ture must be true or false"], None),
    (["model.dtype=int8"], ["model.dtype=int8 must be one of float32, fp32, bfloat16, bf16, float16, fp16"], None),
    (["model.device=tpu"], ["model.device=tpu is not a device", "auto", "cpu", "cuda"], None),
    (["model.device=cuda"], ["model.device=cuda but torch", "sees no CUDA device", "use model.device=cpu"],
     {"CUDA_VISIBLE_DEVICES": ""}),
    (["task.gen.steps=16"], ["task.gen.steps=16 is more than task.gen.gen_length=8", "task.gen.steps<=8"], None),
])
def test_values(tmp_path, args, needles, env):
    p = run_cli(tmp_path, *SMALL, *args, env_extra=env)
    assert_refused(p, tmp_path, needles, torch_ok=env is not None)


def test_dtype_names_are_the_loaders():
    from dvlm_exp.models.llada_v import _DTYPES
    from dvlm_exp.run.validate import DTYPES

    assert set(DTYPES) == set(_DTYPES)


# ----------------------------------------------------------------------------- 3. checkpoints
def _sandbox_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "sandbox"
    shutil.copytree(SANDBOX, dst)
    return dst


def _truncate(ckpt: Path) -> str:
    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    return f"{f} is truncated: {size // 2} bytes, header says {size}; re-download it"


def _auto_map(ckpt: Path) -> str:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_llava_llada.LlavaLLaDAConfig",
                       "AutoModelForCausalLM": "modeling_llava_llada.LlavaLLaDAModelLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return "never runs remote code"


@pytest.mark.parametrize("damage,extra", [
    (_truncate, []),
    (_auto_map, ["config.json has \"auto_map\" (AutoConfig, AutoModelForCausalLM)", "delete the \"auto_map\" key",
                 "model=llada_v"]),
])
def test_checkpoint(tmp_path, damage, extra):
    ckpt = _sandbox_copy(tmp_path)
    needle = damage(ckpt)
    p = run_cli(tmp_path, "model=sandbox", f"model.path={ckpt}", "limit=1", "progress=false")
    assert_refused(p, tmp_path, [needle, *extra])


def _safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], header_pad: int = 0) -> bytes:
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode() + b" " * header_pad
    return struct.pack("<Q", len(text)) + text + data


def test_safetensors_header_check(tmp_path):
    """check_safetensors reads the header only, and refuses short or inconsistent files naming them;
    a hand-written file that passes it is one safetensors itself reads."""
    from safetensors import safe_open

    from dvlm_exp.models.checkpoint import CheckpointError, check_safetensors, weight_files

    good = _safetensors_bytes({"a": ("F32", [2, 3], bytes(24)), "b": ("BF16", [4], bytes(8))}, header_pad=3)
    f = tmp_path / "model.safetensors"
    f.write_bytes(good)
    check_safetensors(f)
    with safe_open(str(f), framework="numpy") as st:
        assert sorted(st.keys()) == ["a", "b"]
    cases = {
        "short": (good[:5], "is truncated: 5 bytes"),
        "header": (good[:20], "is truncated: 20 bytes, header says at least"),
        "data": (good[:-1], f"is truncated: {len(good) - 1} bytes, header says {len(good)}"),
        "json": (struct.pack("<Q", 4) + b"{no}", "corrupt safetensors header"),
        "size": (_safetensors_bytes({"a": ("F32", [2, 3], bytes(20))}), "F32 [2, 3] needs 24 bytes"),
        "huge": (struct.pack("<Q", 2**40) + bytes(8), "is not a safetensors file"),
    }
    for name, (data, needle) in cases.items():
        f.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            check_safetensors(f)
        assert str(f) in str(e.value) and needle in str(e.value) and "re-download" in str(e.value), (name, str(e.value))

    # a sharded checkpoint: the index's shards are checked one by one
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(good)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(good[:-7])
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is truncated"):
        weight_files(ckpt)


# ----------------------------------------------------------------------------- 4. W&B
class _RejectingServer(BaseHTTPRequestHandler):
    """A W&B server stand-in that rejects every key (HTTP 401), as the real one does for a bad key."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

    do_GET = do_POST  # noqa: N815

    def log_message(self, *a):
        pass


@pytest.fixture
def rejecting_server():
    srv = HTTPServer(("127.0.0.1", 0), _RejectingServer)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("scenario", ["unreachable", "rejected_key", "wandb_mode_offline"])
def test_wandb_online_failure_does_not_kill_the_run(tmp_path, scenario, request):
    """A bad key or an unreachable server: one `warning:` line, offline files, results.json. With
    WANDB_MODE=offline an API key does not make the run online (no warning, offline files)."""
    url = request.getfixturevalue("rejecting_server") if scenario == "rejected_key" else UNREACHABLE
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": url, "WANDB_INIT_TIMEOUT": "5"}
    if scenario == "wandb_mode_offline":
        env["WANDB_MODE"] = "offline"
    p = run_cli(tmp_path, *SMALL, "logger=wandb", env_extra=env, timeout=90)
    lines = messages(p.stderr)
    assert p.returncode == 0, "\n".join(lines)[-3000:]
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    if scenario == "wandb_mode_offline":
        assert warnings == [], warnings
    else:
        assert len(warnings) == 1, lines[-30:]
        why = "is unreachable (ConnectionError)" if scenario == "unreachable" else "rejected the API key (HTTP 401)"
        assert f"{url} {why}" in warnings[0] and "logging offline to" in warnings[0] and "wandb sync" in warnings[0]
    assert not [ln for ln in lines if ln.startswith("error:")] and "Traceback" not in p.stderr
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["wandb"]["mode"] == "offline"
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@pytest.mark.parametrize("logger_mode,env,settings_mode,creds,want", [
    (None, {}, None, False, "offline"),  # no credentials at all: offline files
    (None, {}, None, True, "online"),  # WANDB_API_KEY or `wandb login`: online
    (None, {"WANDB_MODE": "offline"}, "offline", True, "offline"),  # WANDB_MODE wins over a key
    (None, {"WANDB_MODE": "disabled"}, "disabled", True, "disabled"),
    (None, {"WANDB_MODE": "dryrun"}, "offline", True, "offline"),
    (None, {}, "offline", True, "offline"),  # `wandb offline` (a settings file)
    ("online", {"WANDB_MODE": "offline"}, "offline", True, "online"),  # logger.mode set explicitly
    ("offline", {}, None, True, "offline"),
])
def test_wandb_mode_choice(logger_mode, env, settings_mode, creds, want):
    from dvlm_exp.run.wandb_log import choose_mode

    assert choose_mode(logger_mode, env, settings_mode, creds) == want


def test_wandb_credentials_follow_wandb(tmp_path):
    """The key comes from WANDB_API_KEY, else from the netrc entry of the server (`wandb login`)."""
    from dvlm_exp.run.wandb_log import credentials

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    env = {"NETRC": str(netrc)}
    old = os.environ.get("NETRC")
    os.environ["NETRC"] = str(netrc)  # wandb's netrc reader looks at os.environ
    try:
        assert credentials("https://api.wandb.ai", env) == "b" * 40
        assert credentials("https://api.wandb.ai", {**env, "WANDB_API_KEY": FAKE_KEY}) == FAKE_KEY
        assert credentials("https://other.example", env) is None
    finally:
        if old is None:
            os.environ.pop("NETRC")
        else:
            os.environ["NETRC"] = old


@pytest.mark.parametrize("error,mode", [("CommError", "online"), ("UsageError", "online"), ("CommError", "offline")])
def test_wandb_init_failure_continues_without_wandb(tmp_path, monkeypatch, capsys, error, mode):
    """wandb.init raising (a bad key, an unreachable server after the check, a broken offline dir): one
    `warning:` line, the run goes on with W&B disabled and writes results.json."""
    import wandb

    from dvlm_exp.run import runner, wandb_log

    real_init = wandb.init

    def failing_init(*a, **k):
        if k.get("mode") != "disabled":
            raise getattr(wandb.errors, error)("simulated: the server refused the run")
        return real_init(*a, **k)

    monkeypatch.setattr(wandb, "init", failing_init)
    monkeypatch.setattr(wandb_log, "online_problem", lambda *a, **k: None)
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_BASE_URL", UNREACHABLE)
    from dvlm_exp.run.build import compose_config

    cfg = compose_config([*SMALL, "logger=wandb"])
    capsys.readouterr()
    rec = runner.run(cfg, tmp_path)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and f"W&B {mode} init failed ({error}: simulated" in warnings[0], err[-2000:]
    assert "continues without W&B" in warnings[0]
    assert rec["wandb"]["mode"] == "disabled"
    assert json.loads((tmp_path / "results.json").read_text())["wandb"]["mode"] == "disabled"
