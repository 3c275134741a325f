"""The official LLaDA-V checkpoint layout loads through the real path (`LLaDAV.from_pretrained`),
and every bad checkpoint fails with a `CheckpointError` / `ConfigError` that names the file or
key and what to do, before any model weight is allocated.

One tiny checkpoint (`dvlm_exp.models.tiny.write_checkpoint`, >= 2 shards) is written per
module; every damaging test works on its own copy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import GOLDEN
from dvlm_exp.models.checkpoint import CheckpointError, weight_files
from dvlm_exp.models.llada_v import LLaDAV

GOLDEN_CKPT = GOLDEN / "checkpoint"

SPEC = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    intermediate_size=64, vision_hidden_size=16, vision_layers=1, vision_heads=2,
    vision_intermediate_size=32, max_shard_size="8MB",
)
# Official LLaDA tokenizer ids (shared/reference/models.md, tokenizer_config.json of the release).
OFFICIAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
BANNED = {126081, 126080, 126346, 126347}
TOKENIZER_LEN = 126349
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
VT = "model.vision_tower.vision_tower.vision_model."
# Every key the released GSAI-ML/LLaDA-V checkpoint may hold (models.md section 1.3).
OFFICIAL_KEY_PATTERNS = [re.compile(p) for p in (
    r"model\.embed_tokens\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    re.escape(VT) + r"embeddings\.(patch_embedding\.(weight|bias)|position_embedding\.weight)",
    re.escape(VT) + r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    re.escape(VT) + r"post_layernorm\.(weight|bias)",
    r"model\.mm_projector\.[02]\.(weight|bias)",
    r"model\.image_newline",
)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from dvlm_exp.models.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_llada_v", SPEC, seed=0)


@pytest.fixture(scope="module")
def stored(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read with safetensors directly (not through the loader)."""
    out = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def index(ckpt) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def config(ckpt) -> dict:
    return json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def model(ckpt):
    return LLaDAV.from_pretrained(ckpt, dtype="float32", device="cpu")


@pytest.fixture
def copy(ckpt, tmp_path):
    """A private copy of the tiny checkpoint to damage."""
    def make(name: str = "ckpt") -> Path:
        dst = tmp_path / name
        shutil.copytree(ckpt, dst)
        return dst
    return make


@pytest.fixture
def no_weight_io(monkeypatch):
    """Any read of tensor data (safetensors or pickle) fails the test."""
    def boom(*a, **k):
        raise AssertionError("weights were read before the checkpoint check failed")
    monkeypatch.setattr("safetensors.torch.load_file", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.fixture
def no_model_weights(monkeypatch):
    """Filling a model with weights fails the test (the loader builds the model on meta first)."""
    def boom(*a, **k):
        raise AssertionError("model weights were assigned before the checkpoint check failed")
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", boom)


def official_to_module_name(key: str) -> str:
    """Independent spelling of the official -> module mapping (not the loader's function)."""
    if key.startswith(VT):
        return "vision_tower." + key[len(VT):]
    if key.startswith("model.mm_projector."):
        return key[len("model."):]
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith("lm_head."):
        return key
    assert key.startswith("model."), key
    return key[len("model."):]


def rewrite_shard(ckpt_dir: Path, shard: str, edit) -> None:
    f = ckpt_dir / shard
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def assert_actionable(msg: str) -> None:
    assert re.search(r"download|copy|fix|point", msg, re.I), f"no remedy in: {msg}"


# ----------------------------------------------------------------------------- layout
def test_layout_shards_and_index(ckpt, index, stored):
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and all(SHARD_RE.fullmatch(s) for s in shards), shards
    nums = [SHARD_RE.fullmatch(s).groups() for s in shards]
    assert [int(x) for x, _ in nums] == list(range(1, len(shards) + 1))
    assert {int(y) for _, y in nums} == {len(shards)}
    assert not (ckpt / "model.safetensors").exists()
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(stored)  # the index covers every tensor, and nothing else
    for shard in shards:
        with safe_open(str(ckpt / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in weight_map.items() if v == shard}
            assert f.metadata() == {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in stored.values())
    assert index["metadata"]["total_size"] == total
    assert weight_files(ckpt) == [ckpt / s for s in shards]


def test_layout_official_key_names(stored):
    keys = set(stored)
    bad = sorted(k for k in keys if not any(p.fullmatch(k) for p in OFFICIAL_KEY_PATTERNS))
    assert not bad, f"non-official key names: {bad}"
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.image_newline",
              "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
              "model.mm_projector.2.bias", VT + "embeddings.patch_embedding.weight", VT + "post_layernorm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert k in keys, k
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1}
    assert {int(k[len(VT):].split(".")[2]) for k in keys if k.startswith(VT + "encoder.layers.")} == {0}
    assert not any(k.startswith(VT + "head.") for k in keys)  # no SigLIP pooling head in the release
    assert stored["model.embed_tokens.weight"].shape == (126464, 32)
    assert stored["model.mm_projector.0.weight"].shape == (32, 16)


def test_layout_key_set_matches_golden(stored):
    """Same key names as the golden checkpoint (written by the official code), up to layer counts."""
    def shape(keys):
        return {re.sub(r"layers\.\d+\.", "layers.N.", k) for k in keys}
    with safe_open(str(GOLDEN_CKPT / "model.safetensors"), framework="pt") as f:
        golden = set(f.keys())
    assert shape(stored) == shape(golden)


def test_layout_config(ckpt, config):
    golden = json.loads((GOLDEN_CKPT / "config.json").read_text())
    assert config["model_type"] == "llava_llada"
    assert config["architectures"] == ["LlavaLLaDAModelLM"]
    assert config["image_aspect_ratio"] == "anyres_max_4"
    pins = config["image_grid_pinpoints"]
    assert len(pins) == 36 and pins == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    assert pins == golden["image_grid_pinpoints"]
    for k in ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature", "mm_patch_merge_type",
              "mm_newline_position", "bos_token_id", "eos_token_id", "vocab_size", "tie_word_embeddings",
              "rope_theta", "rms_norm_eps", "hidden_act", "mm_use_im_start_end", "mm_use_im_patch_token"):
        assert config[k] == golden[k], k
    for k, v in (("hidden_size", 32), ("num_hidden_layers", 2), ("num_attention_heads", 2),
                 ("intermediate_size", 64), ("mm_hidden_size", 16)):
        assert config[k] == v, k
    tower = ckpt / config["mm_vision_tower"]
    assert tower.is_dir() and "siglip" in config["mm_vision_tower"]  # the official builder keys on "siglip"
    tc = json.loads((tower / "config.json").read_text())
    assert tc["hidden_size"] == 16 and tc["num_attention_heads"] == 2
    assert tc["num_hidden_layers"] == 2  # one more than stored: the official tower drops its last layer
    assert json.loads((ckpt / "generation_config.json").read_text()) == {"bos_token_id": 126080, "eos_token_id": 126081}


def test_layout_tokenizer(ckpt):
    from transformers import AutoTokenizer

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (ckpt / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    assert len(tok) == TOKENIZER_LEN
    for token, tid in OFFICIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"


# ----------------------------------------------------------------------------- loading
def test_load_every_parameter_equals_stored(model, stored):
    state = model.state_dict()
    assert {official_to_module_name(k) for k in stored} == set(state) - set(dict(model.named_buffers()))
    n = TOKENIZER_LEN  # embed_tokens / lm_head resized to len(tokenizer) like the official loader
    for k, t in stored.items():
        got = state[official_to_module_name(k)]
        want = t[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else t
        assert got.dtype == torch.float32 and torch.equal(got, want), k
    # a few by hand, spelled out
    assert torch.equal(model.layers[1].self_attn.o_proj.weight, stored["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(model.vision_tower.encoder.layers[0].mlp.fc2.bias, stored[VT + "encoder.layers.0.mlp.fc2.bias"])
    assert torch.equal(model.mm_projector[2].bias, stored["model.mm_projector.2.bias"])
    assert torch.equal(model.image_newline, stored["model.image_newline"])
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"][:n])


def test_load_dims_from_config(model, config, ckpt):
    tc = json.loads((ckpt / config["mm_vision_tower"] / "config.json").read_text())
    d = model.dims()
    assert (d["d"], d["m"], d["layers"], d["heads"], d["kv_heads"]) == (
        config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
        config["num_attention_heads"], config["num_key_value_heads"])
    assert d["head_dim"] == config["hidden_size"] // config["num_attention_heads"]
    assert d["vocab"] == TOKENIZER_LEN
    assert (d["vision_d"], d["vision_m"], d["mm_hidden"]) == (tc["hidden_size"], tc["intermediate_size"], config["mm_hidden_size"])
    assert model.vision_tower.config.num_attention_heads == tc["num_attention_heads"]
    # the checkpoint's tower layer count (folder config says one more, the tower drops it)
    assert d["vision_layers"] == len(model.vision_tower.encoder.layers) == tc["num_hidden_layers"] - 1 == 1
    assert d["vision_patches"] == 27 * 27 and d["patch_size"] == 14
    assert model.llm_config.rope_parameters["rope_theta"] == config["rope_theta"]
    assert all(layer.self_attn.is_causal is False for layer in model.layers)
    assert model.max_tiles == 4 and len(model.grid_pinpoints) == 36
    assert model.special_ids["mask"] == 126336 and model.special_ids["eot"] == 126348
    assert set(model.banned_ids) == BANNED


def test_load_bf16(ckpt, model, stored):
    m16 = LLaDAV.from_pretrained(ckpt, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert m16.dtype == torch.bfloat16
    assert torch.equal(m16.layers[0].mlp.up_proj.weight, stored["model.layers.0.mlp.up_proj.weight"].bfloat16())
    # RoPE tables stay float32 (official / HF loaders): bf16 inv_freq is off by radians at ~2k positions
    inv = m16.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, model.rotary_emb.inv_freq)
    with pytest.raises(ValueError, match="model.dtype"):
        LLaDAV.from_pretrained(ckpt, dtype="int8")


class _BoostBanned(torch.nn.Module):
    """LM head whose banned ids win every argmax unless the sampler bans them."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        out = self.head(x).clone()
        out[..., sorted(BANNED)] += 1e4
        return out


def _generator(model):
    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.pruning.none import NoPruning
    from dvlm_exp.schedules.first_step import FirstStep

    preset = GenPreset(gen_length=4, block_length=4, steps=2, think=None, stop=[], honor_until=False)
    return Generator(model, NoPruning(), FirstStep(), preset, seed=0)


def test_generation_runs_and_never_emits_banned_ids(model, monkeypatch):
    from PIL import Image

    img = Image.new("RGB", (500, 300), (200, 40, 40))
    img.paste((30, 200, 60), (250, 0, 500, 300))
    gen = _generator(model)
    assert set(gen.sampler.banned_ids) == BANNED
    gen.generate("What colour is the left half?", [img], sample_id=0)
    ids = gen.recorder.samples[-1].output_ids
    assert len(ids) == 4 and model.mask_id not in ids and not BANNED & set(ids), ids
    assert gen.recorder.samples[-1].n_visual > 729  # anyres: base view + tiles went through the tower
    assert gen.recorder.samples[-1].n_forwards == 2

    # With banned ids boosted to win every argmax, the sampler must still never emit them ...
    monkeypatch.setattr(model, "lm_head", _BoostBanned(model.lm_head))
    gen.generate("What colour is the left half?", [img], sample_id=1)
    ids = gen.recorder.samples[-1].output_ids
    assert len(ids) == 4 and not BANNED & set(ids), ids
    # ... and without the ban they would (the check above is not vacuous).
    gen.sampler.banned_ids = []
    gen.generate("What colour is the left half?", [img], sample_id=2)
    assert set(gen.recorder.samples[-1].output_ids) <= BANNED


def test_golden_checkpoint_loads_without_tokenizer():
    assert not (GOLDEN_CKPT / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        LLaDAV.from_pretrained(GOLDEN_CKPT)
    m = LLaDAV.from_pretrained(GOLDEN_CKPT, load_tokenizer=False)
    d = m.dims()
    assert (d["d"], d["m"], d["layers"], d["heads"], d["vocab"]) == (64, 128, 3, 4, 126464)
    # folder config says 3 tower layers; the checkpoint holds 2 and that is what is built
    assert d["vision_layers"] == 2 and d["vision_d"] == 32 and m.vision_tower.config.num_attention_heads == 2
    assert m.tokenizer is None and set(m.banned_ids) == BANNED and m.mask_id == 126336
    golden = load_file(str(GOLDEN_CKPT / "model.safetensors"))
    state = m.state_dict()
    assert {official_to_module_name(k) for k in golden} == set(state) - set(dict(m.named_buffers()))
    for k, t in golden.items():  # stored bf16, loaded float32 exactly
        got = state[official_to_module_name(k)]
        assert got.dtype == torch.float32 and torch.equal(got, t.float()), k


# ----------------------------------------------------------------------------- bad input
def test_missing_directory(tmp_path, no_weight_io):
    path = tmp_path / "nowhere" / "LLaDA-V"
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    assert str(path) in str(e.value) and "download" in str(e.value)


def test_config_missing(copy, no_weight_io):
    path = copy()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    assert str(path / "config.json") in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("bad", ["llada", "llava_llama", None])
def test_wrong_model_type(copy, no_weight_io, bad):
    path = copy()
    cfg = json.loads((path / "config.json").read_text())
    if bad is None:
        del cfg["model_type"]
    else:
        cfg["model_type"] = bad
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    msg = str(e.value)
    assert "config.json" in msg and repr(bad) in msg and "'llava_llada'" in msg and "model.path" in msg


def test_config_not_json(copy, no_weight_io):
    path = copy()
    (path / "config.json").write_text('{"model_type": "llava_llada",')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        LLaDAV.from_pretrained(path)


def test_missing_shard(copy, index, no_weight_io):
    path = copy()
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        weight_files(path)  # torch-free check
    assert shard in str(e.value) and "model.safetensors.index.json" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    assert shard in str(e.value) and "Re-download" in str(e.value)


@pytest.mark.parametrize("key", [
    "model.layers.1.mlp.up_proj.weight",
    "lm_head.weight",
    "model.mm_projector.2.bias",
    "model.image_newline",
    VT + "encoder.layers.0.self_attn.k_proj.bias",
    VT + "embeddings.patch_embedding.weight",  # read to size the tower
    VT + "encoder.layers.0.mlp.fc1.weight",  # read to size the tower
])
def test_missing_key(copy, index, key, no_model_weights):
    path = copy()
    rewrite_shard(path, index["weight_map"][key], lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    msg = str(e.value)
    assert key in msg and "missing" in msg and str(path) in msg
    assert_actionable(msg)


@pytest.mark.parametrize("key", ["model.layers.2.input_layernorm.weight",  # a layer config.json does not have
                                 "vision_tower.post_layernorm.weight",  # module naming instead of official
                                 VT + "head.probe"])  # the SigLIP pooling head (absent in the release)
def test_unexpected_key(copy, index, key, no_model_weights):
    path = copy()
    shard = sorted(set(index["weight_map"].values()))[0]
    rewrite_shard(path, shard, lambda t: t.__setitem__(key, torch.zeros(16)))
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"][key] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    msg = str(e.value)
    assert "unexpected keys (1): " + key in msg and "missing" not in msg
    assert_actionable(msg)


def test_shape_mismatch(copy, index, no_model_weights):
    """config.json and the tensors disagree: named by official key, before weights are assigned."""
    path = copy()
    key = "model.layers.0.self_attn.q_proj.weight"
    rewrite_shard(path, index["weight_map"][key], lambda t: t.__setitem__(key, torch.zeros(16, 32)))
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    assert key in str(e.value) and "[16, 32]" in str(e.value) and "[32, 32]" in str(e.value)


@pytest.mark.parametrize("files", [("tokenizer.json",), ("tokenizer.json", "tokenizer_config.json")])
def test_tokenizer_absent(copy, no_weight_io, files):
    path = copy()
    for f in files:
        (path / f).unlink()
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    msg = str(e.value)
    assert all(f in msg for f in files) and str(path) in msg and "copy the tokenizer" in msg


def test_pickle_only(copy, no_weight_io):
    path = copy()
    for f in list(path.glob("*.safetensors")) + [path / "model.safetensors.index.json"]:
        f.unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")
    with pytest.raises(CheckpointError) as e:
        LLaDAV.from_pretrained(path)
    assert "pickle" in str(e.value) and "safetensors only" in str(e.value) and str(path) in str(e.value)


def test_no_weights_at_all(copy, no_weight_io):
    path = copy()
    for f in list(path.glob("*.safetensors")) + [path / "model.safetensors.index.json"]:
        f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        LLaDAV.from_pretrained(path)


@pytest.mark.parametrize("text", ['{"metadata": {}, "weight_map": {"lm_head.weight": "model-0000',
                                  '{"metadata": {}}', '{"weight_map": ["model-00001-of-00003.safetensors"]}',
                                  '[]'])
def test_index_corrupt(copy, no_weight_io, text):
    path = copy()
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        weight_files(path)
    assert "model.safetensors.index.json is not a valid safetensors index" in str(e.value)
    with pytest.raises(CheckpointError, match="re-download"):
        LLaDAV.from_pretrained(path)


# ----------------------------------------------------------------------------- CLI config check
def _check(*overrides):
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.validate import check

    check(compose_config(list(overrides)))


def test_cli_llada_v_needs_path(no_weight_io):
    from dvlm_exp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.path"):
        _check("model=llada_v")


def test_cli_llada_v_nonexistent_path(tmp_path, no_weight_io):
    from dvlm_exp.errors import ConfigError

    missing = tmp_path / "LLaDA-V"
    for prune in (["prune=none"], ["prune=fastv", "prune.layer=2"]):
        with pytest.raises(ConfigError) as e:
            _check("model=llada_v", f"model.path='{missing}'", *prune)
        assert str(missing) in str(e.value) and "download" in str(e.value)


def test_cli_prune_layer_range_from_config_json(ckpt, no_weight_io):
    from dvlm_exp.errors import ConfigError

    _check("model=llada_v", f"model.path='{ckpt}'")  # prune=none: a valid checkpoint passes
    _check("model=llada_v", f"model.path='{ckpt}'", "prune=fastv", "prune.layer=1")
    with pytest.raises(ConfigError) as e:  # 2 decoder layers (config.json): fastv layer in [1, 1]
        _check("model=llada_v", f"model.path='{ckpt}'", "prune=fastv", "prune.layer=2")
    assert "prune.layer=2" in str(e.value) and "[1, 1]" in str(e.value) and "2 decoder layers" in str(e.value)
    # the golden checkpoint has 3 layers: the same layer is valid there
    _check("model=llada_v", f"model.path='{GOLDEN_CKPT}'", "prune=fastv", "prune.layer=2")
    with pytest.raises(ConfigError, match=r"\[0, 2\] for model=llada_v \(3 decoder layers\)"):
        _check("model=llada_v", f"model.path='{GOLDEN_CKPT}'", "prune=random", "prune.layer=3")
