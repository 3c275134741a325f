"""LaViDa (LLaDA and Dream backbones): official checkpoint layouts, vision token counts,
Dream's shifted logits and confidence rules, pruning, against plainly written references.

Tiny checkpoints are written once per module in each official layout
(`dvlm_exp.models.tiny_lavida.write_lavida_checkpoint`) and loaded through `from_pretrained`.
The naive forwards below read the checkpoint tensors BY THEIR OFFICIAL NAMES and run the
layers by hand (RMSNorm, rotate-half RoPE, full bidirectional softmax attention with grouped
KV heads and biases, SwiGLU), so a wrong key map, a causal mask or a missing bias shows up.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dvlm_exp.engine import Engine, Roles
from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.models.checkpoint import CheckpointError
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.pruning.none import NoPruning
from dvlm_exp.decoding.sampler_dream import DreamSampler, confidence, shift_schedule
from dvlm_exp.decoding.sampler import SamplerConfig
from dvlm_exp.schedules.first_step import FirstStep

SPECS = {"llada": dict(num_attention_heads=4, num_key_value_heads=4),
         "dream": dict(num_attention_heads=4, num_key_value_heads=2)}  # Dream: grouped KV heads
VT = "model.vision_tower.vision_tower.vision_model."
COMMON_PATTERNS = (
    re.escape(VT) + r"embeddings\.(patch_embedding\.(weight|bias)|position_embedding\.weight)",
    re.escape(VT) + r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    re.escape(VT) + r"post_layernorm\.(weight|bias)",
    r"model\.mm_projector\.[02]\.(weight|bias)",
    r"model\.image_newline",
)
# shared/reference/models.md section 3.2.
OFFICIAL_LLM_PATTERNS = {
    "llada": (r"model\.transformer\.wte\.weight",
              r"model\.transformer\.blocks\.\d+\.(attn_norm|ff_norm|q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)\.weight",
              r"model\.transformer\.ln_f\.weight", r"model\.transformer\.ff_out\.weight"),
    "dream": (r"model\.embed_tokens\.weight", r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)",
              r"model\.layers\.\d+\.self_attn\.o_proj\.weight", r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
              r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", r"model\.norm\.weight",
              r"lm_head\.weight"),
}
# Official tensor names the naive forward reads (LLaDA: OLMo names, models.md section 2.2).
NAMES = {
    "llada": dict(embed="model.transformer.wte.weight", final_norm="model.transformer.ln_f.weight",
                  head="model.transformer.ff_out.weight", block="model.transformer.blocks.{i}.",
                  attn_norm="attn_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out", mlp_norm="ff_norm",
                  gate="ff_proj", up="up_proj", down="ff_out", eps=1e-5, theta=500000.0),
    "dream": dict(embed="model.embed_tokens.weight", final_norm="model.norm.weight", head="lm_head.weight",
                  block="model.layers.{i}.", attn_norm="input_layernorm", q="self_attn.q_proj",
                  k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                  mlp_norm="post_attention_layernorm", gate="mlp.gate_proj", up="mlp.up_proj",
                  down="mlp.down_proj", eps=1e-6, theta=1000000.0),
}
LAVIDA_PINPOINTS_WH = [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation, which costs ~100x
    when the 2 shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from dvlm_exp.models.tiny_lavida import write_lavida_checkpoint

    root = tmp_path_factory.mktemp("lavida")
    return {bb: write_lavida_checkpoint(root / bb, bb, SPECS[bb], seed=1) for bb in ("llada", "dream")}


@pytest.fixture(scope="module")
def models(ckpts):
    from dvlm_exp.models.lavida import LaViDaDream, LaViDaLLaDA

    return {"llada": LaViDaLLaDA.from_pretrained(ckpts["llada"]), "dream": LaViDaDream.from_pretrained(ckpts["dream"])}


@pytest.fixture(scope="module")
def stored(ckpts):
    out = {}
    for bb, path in ckpts.items():
        out[bb] = {}
        for f in sorted(path.glob("model-*.safetensors")):
            out[bb].update(load_file(str(f)))
    return out


def engine(m) -> Engine:
    e = Engine(m)
    e.recorder.start_sample()
    return e


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- naive references
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    """Rotate-half RoPE on [h, n, dh] at integer positions."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_logits(W: dict, backbone: str, embeds: torch.Tensor, n_heads: int, n_kv: int,
                 rows: torch.Tensor) -> torch.Tensor:
    """Logits [len(rows), V] at sequence positions `rows`, from the checkpoint tensors, by hand."""
    N = NAMES[backbone]
    h = embeds.float()
    n, d = h.shape
    dh = d // n_heads
    pos = torch.arange(n)
    i = 0
    while (N["block"].format(i=i) + N["q"] + ".weight") in W:
        b = N["block"].format(i=i)

        def lin(name, x):
            y = x @ W[b + name + ".weight"].T
            return y + W[b + name + ".bias"] if (b + name + ".bias") in W else y

        x = rms(h, W[b + N["attn_norm"] + ".weight"], N["eps"])
        q = lin(N["q"], x).view(n, n_heads, dh).transpose(0, 1)
        k = lin(N["k"], x).view(n, n_kv, dh).transpose(0, 1)
        v = lin(N["v"], x).view(n, n_kv, dh).transpose(0, 1)
        q, k = rope(q, pos, N["theta"]), rope(k, pos, N["theta"])
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), -1)  # no mask: bidirectional
        h = h + lin(N["o"], (att @ v).transpose(0, 1).reshape(n, d))
        x = rms(h, W[b + N["mlp_norm"] + ".weight"], N["eps"])
        h = h + lin(N["down"], torch.nn.functional.silu(lin(N["gate"], x)) * lin(N["up"], x))
        i += 1
    return rms(h[rows], W[N["final_norm"]], N["eps"]) @ W[N["head"]].T


def best_pinpoint(w: int, h: int) -> tuple[int, int]:
    """LLaVA's select_best_resolution over LaViDa's five pinpoints, written out."""
    best, best_eff, best_waste = None, -1, None
    for W_, H_ in LAVIDA_PINPOINTS_WH:
        s = min(W_ / w, H_ / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = W_ * H_ - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (W_, H_), eff, waste
    return best


def expected_lavida_tokens(w: int, h: int) -> tuple[int, int, int]:
    """(tokens, grid rows, grid cols): 196 pooled base + unpadded pooled grid rows x (cols + newline)."""
    W_, H_ = best_pinpoint(w, h)
    rows, cols = 14 * (H_ // 384), 14 * (W_ // 384)
    if w / h > cols / rows:  # letterbox bars top and bottom
        keep = int(h * (cols / w))
        pad = (rows - keep) // 2
        rows = rows - 2 * pad
    else:
        keep = int(w * (rows / h))
        pad = (cols - keep) // 2
        cols = cols - 2 * pad
    return 196 + rows * (cols + 1), rows, cols


# ----------------------------------------------------------------------------- layout and loading
@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_checkpoint_holds_exactly_the_official_keys(backbone, ckpts, stored):
    pats = [re.compile(p) for p in OFFICIAL_LLM_PATTERNS[backbone] + COMMON_PATTERNS]
    keys = set(stored[backbone])
    assert all(any(p.fullmatch(k) for p in pats) for k in keys)
    assert all(any(p.fullmatch(k) for k in keys) for p in pats)  # every official group is present
    index = json.loads((ckpts[backbone] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys and len(set(index["weight_map"].values())) >= 2
    cfg = json.loads((ckpts[backbone] / "config.json").read_text())
    assert cfg["model_type"] == {"llada": "llava_llada", "dream": "llava_dream"}[backbone]
    if backbone == "dream":  # q/k/v biases, none on o_proj; GQA shapes
        assert "model.layers.0.self_attn.k_proj.bias" in keys and "model.layers.0.self_attn.o_proj.bias" not in keys
        assert stored["dream"]["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)


def test_llada_olmo_names_land_on_the_right_layers(models, stored):
    """The pitfalls of the OLMo naming: ff_proj is the gate, block ff_out the down projection,
    top-level ff_out the LM head, attn_out the output projection."""
    m, W = models["llada"], stored["llada"]
    pairs = {
        "model.transformer.blocks.1.ff_proj.weight": m.layers[1].mlp.gate_proj.weight,
        "model.transformer.blocks.1.up_proj.weight": m.layers[1].mlp.up_proj.weight,
        "model.transformer.blocks.1.ff_out.weight": m.layers[1].mlp.down_proj.weight,
        "model.transformer.blocks.0.attn_out.weight": m.layers[0].self_attn.o_proj.weight,
        "model.transformer.blocks.0.attn_norm.weight": m.layers[0].input_layernorm.weight,
        "model.transformer.blocks.0.ff_norm.weight": m.layers[0].post_attention_layernorm.weight,
        "model.transformer.ln_f.weight": m.norm.weight,
    }
    for name, param in pairs.items():
        assert torch.equal(W[name], param), name
    n = m.lm_head.out_features  # resized to len(tokenizer) as the official wrapper does
    assert n == 126349
    assert torch.equal(W["model.transformer.ff_out.weight"][:n], m.lm_head.weight)
    assert torch.equal(W["model.transformer.wte.weight"][:n], m.embed_tokens.weight)


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_engine_forward_matches_naive_forward_from_official_tensors(backbone, models, stored):
    """Answer slot i's logits: position P+i for LLaDA, P+i-1 for Dream (shifted: slot 0 is
    predicted by the last prompt token, which is text)."""
    m = models[backbone]
    ids = m.prompt_ids("What is the total?", n_images=1)
    seq, _ = m.prepare(ids, [noise_image(500, 300)], gen_length=6)
    seq.response_ids[2] = 100  # one slot already decoded
    P, dims = seq.prompt_embeds.shape[0], m.dims()
    W = {k: v.float() for k, v in stored[backbone].items()}
    emb = torch.cat([seq.prompt_embeds, W[NAMES[backbone]["embed"]][seq.response_ids]])
    shift = {"llada": 0, "dream": 1}[backbone]
    assert int(seq.roles[-1]) == Roles.TEXT
    for slots in (torch.arange(6), torch.tensor([0, 3])):
        ref = naive_logits(W, backbone, emb, dims["heads"], dims["kv_heads"], P + slots - shift)
        out = engine(m).forward(seq, 0, slots)
        torch.testing.assert_close(out.logits, ref[:, : m.lm_head.out_features], rtol=2e-4, atol=2e-4)


def _damage(ckpt, tmp_path, drop: str, add: str):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = bad / index["weight_map"][drop]
    tensors = load_file(str(shard))
    del tensors[drop]
    tensors[add] = torch.zeros(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"][add] = index["weight_map"].pop(drop)
    index_path.write_text(json.dumps(index))
    return bad


@pytest.mark.parametrize("backbone,drop", [("llada", "model.transformer.blocks.1.ff_proj.weight"),
                                           ("dream", "model.layers.1.self_attn.v_proj.bias")])
def test_missing_and_unexpected_keys_are_listed(backbone, drop, ckpts, tmp_path):
    from dvlm_exp.models.lavida import LaViDaDream, LaViDaLLaDA

    cls = {"llada": LaViDaLLaDA, "dream": LaViDaDream}[backbone]
    add = "model.transformer.blocks.0.extra_proj.weight"
    bad = _damage(ckpts[backbone], tmp_path, drop, add)
    with pytest.raises(CheckpointError) as e:
        cls.from_pretrained(bad)
    msg = str(e.value)
    assert "missing keys (1): " + drop in msg and "unexpected keys (1): " + add in msg


def test_missing_shard_and_wrong_naming_fail_clearly(ckpts, tmp_path):
    from dvlm_exp.models.lavida import LaViDaDream, LaViDaLLaDA

    bad = tmp_path / "noshard"
    shutil.copytree(ckpts["dream"], bad)
    victim = sorted(bad.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard\(s\) listed in model.safetensors.index.json are missing.*{victim.name}"):
        LaViDaDream.from_pretrained(bad)
    # An LLaDA-V-style (HF-LLaMA named) config under model=lavida_llada points at the right family.
    hf = tmp_path / "hf_named"
    shutil.copytree(ckpts["llada"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("d_model", "n_layers", "n_heads")} | {"hidden_size": 32}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model=llada_v"):
        LaViDaLLaDA.from_pretrained(hf)
    # The OLMo-named checkpoint under model=lavida_dream: wrong model_type, named.
    with pytest.raises(CheckpointError, match="llava_llada.*expected 'llava_dream'"):
        LaViDaDream.from_pretrained(ckpts["llada"])


def test_validate_reads_the_depth_of_an_olmo_config(ckpts):
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.run.validate import model_depth

    for bb, name in (("llada", "lavida_llada"), ("dream", "lavida_dream")):
        cfg = compose_config([f"model={name}", f"model.path={ckpts[bb]}"])
        assert model_depth(cfg) == 2


# ----------------------------------------------------------------------------- vision
@pytest.mark.parametrize("size,table", [((1000, 1000), 1008), ((800, 600), 834), ((1700, 2200), 840),
                                        ((1000, 3000), 826), ((1920, 1080), 660), ((500, 300), None),
                                        ((384, 384), None), ((300, 1000), None)])
def test_visual_tokens_per_image(size, table, models):
    """196 pooled tokens per view, unpadded pooled grid + a newline per row; the counts of
    shared/reference/models.md section 3.3 where given."""
    n_expected, rows, cols = expected_lavida_tokens(*size)
    if table is not None:
        assert n_expected == table
    for m in models.values():
        assert m.num_image_tokens(size) == n_expected
    m = models["dream"]
    img = noise_image(*size, seed=sum(size))
    seq, info = m.prepare(m.prompt_ids("Describe.", 1), [img], gen_length=4)
    assert info["n_visual"] == n_expected == int((seq.roles == Roles.VISUAL).sum())
    vis = seq.prompt_embeds[seq.roles == Roles.VISUAL]
    # Base view: the 27x27 projected patches resized bilinearly to 14x14 (196 tokens).
    from dvlm_exp.models import llava_image

    px, _ = llava_image.process_image(img, m.grid_pinpoints, 384)
    base = m.encode_views(px[:1])[0].reshape(27, 27, -1).permute(2, 0, 1)[None]
    base = torch.nn.functional.interpolate(base, size=(14, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(vis[:196], base[0].permute(1, 2, 0).reshape(196, -1))
    # Newline closes every grid row; nothing else equals it.
    grid = vis[196:].reshape(rows, cols + 1, -1)
    assert torch.equal(grid[:, -1], m.image_newline.expand(rows, -1))
    assert not (grid[:, :-1] == m.image_newline).all(-1).any()


def test_several_images_are_square_padded_and_unpooled(models):
    m = models["llada"]
    imgs = [noise_image(500, 300, 1), noise_image(300, 300, 2)]
    seq, info = m.prepare(m.prompt_ids("Compare.", 2), imgs, gen_length=4)
    assert info["n_visual"] == 2 * 729
    assert sum(1 for t in m.prompt_ids("Compare.", 2) if t == -200) == 2


# ----------------------------------------------------------------------------- prompts
def test_prompts_follow_the_official_templates(models):
    llada, dream = models["llada"], models["dream"]
    ids = llada.prompt_ids("What is the total?", 1)
    i = ids.index(-200)
    # LLaDA chat template (BOS first); tokenizer_image_token's BOS offset drops the "\n" after <image>.
    head = llada.tokenizer.decode(ids[:i])
    assert head.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language")
    assert head.endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert llada.tokenizer.decode(ids[i + 1:]) == (
        "What is the total?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = dream.prompt_ids("What is the total?", 1)
    i = ids.index(-200)
    assert dream.tokenizer.decode(ids[:i]).startswith("<|im_start|>system\nYou are a helpful language")
    assert dream.tokenizer.decode(ids[:i]).endswith("<|im_end|>\n<|im_start|>user\n")
    assert dream.tokenizer.decode(ids[i + 1:]) == "\nWhat is the total?<|im_end|>\n<|im_start|>assistant\n"
    assert dream.mask_id == 151666 and dream.special_ids["eos"] == 151643
    assert llada.mask_id == 126336 and llada.banned_ids == [] and dream.banned_ids == []
    assert llada.stop_ids(["<|eot_id|>"]) == [] and dream.stop_ids(["<|im_end|>"]) == []


# ----------------------------------------------------------------------------- Dream sampling
def test_confidence_rules_match_plain_formulas():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    p = logits.softmax(-1)
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        conf, x0 = confidence(logits, alg)
        for r in range(6):
            probs = sorted(p[r].tolist(), reverse=True)
            want = {"maskgit_plus": probs[0], "topk_margin": probs[0] - probs[1],
                    "entropy": sum(q * math.log(q + 1e-10) for q in p[r].tolist())}[alg]
            assert conf[r].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert x0[r].item() == int(np.argmax(p[r].numpy()))
    with pytest.raises(ValueError, match="alg must be one of"):
        confidence(logits, "origin")


def plain_shift_counts(n: int, steps: int, a: float) -> list[int]:
    steps = min(steps, n)
    t = torch.linspace(0, 1, steps + 1)
    cum = [int(v) for v in (a * t / (1 + (a - 1) * t) * n)]
    per = [max(1, cum[j + 1] - cum[j]) for j in range(steps)]
    j = 0
    while sum(per) > n:  # take the excess back from entries above one, cycling from the start
        if per[j % steps] > 1:
            per[j % steps] -= 1
        j += 1
    return list(reversed(per))


@pytest.mark.parametrize("n,steps,a", [(32, 16, 3.0), (32, 16, 1 / 3), (64, 32, 0.33), (10, 4, 3.0), (7, 7, 3.0), (5, 8, 2.0)])
def test_shift_schedule(n, steps, a):
    got = shift_schedule(n, steps, a)
    assert got == plain_shift_counts(n, steps, a)
    assert sum(got) == n and min(got) >= 1 and len(got) == min(steps, n)
    if a < 1 and n > steps:  # alpha < 1 unmasks more early (the paper's best setting)
        assert got[0] >= got[-1] and got[0] > 1


def test_timestep_rule_counts():
    s = DreamSampler(SamplerConfig(gen_length=32, block_length=32, steps=8), eps=1e-3)
    t = torch.linspace(1, 1e-3, 9)
    left, want = 32, []
    for i in range(8):
        k = left if i == 7 else int(left * (1 - t[i + 1] / t[i]))
        want.append(k)
        left -= k
    assert s.step_counts(32) == want and sum(want) == 32
    with pytest.raises(ValueError, match="grid_steps"):
        DreamSampler(SamplerConfig(gen_length=32, block_length=32, steps=8), grid_steps=4)


def naive_dream_sample(m, W, seq, steps, alg, alg_temp=0.0, schedule=None, shift=3.0):
    """Dream `_sample` written plainly on the naive full forward: shift the logits right by one."""
    dims = m.dims()
    x = seq.response_ids.clone()
    G, P = x.numel(), seq.prompt_embeds.shape[0]
    grid = torch.linspace(1, 1e-3, steps + 1)
    sch = plain_shift_counts(G, steps, shift) if schedule == "shift" else None
    for i in range(steps):
        mask = x == m.mask_id
        if not mask.any():
            break
        emb = torch.cat([seq.prompt_embeds, W[NAMES["dream"]["embed"]][x]])
        # Dream's shift cat(logits[:, :1], logits[:, :-1]): answer slot j reads position P+j-1
        logits = naive_logits(W, "dream", emb, dims["heads"], dims["kv_heads"], P - 1 + torch.arange(G))
        logits = logits[:, : m.lm_head.out_features]
        conf, x0 = confidence(logits[mask], alg)
        n = int(mask.sum())
        k = sch[i] if sch is not None else (int(n * (1 - grid[i + 1] / grid[i])) if i < steps - 1 else n)
        if k > 0:
            sel = torch.topk(conf, k).indices if not alg_temp else torch.multinomial(torch.softmax(conf / alg_temp, -1), k)
            x[torch.nonzero(mask).squeeze(1)[sel]] = x0[sel]
    return x.tolist()


@pytest.mark.parametrize("alg,schedule", [("maskgit_plus", None), ("topk_margin", None), ("entropy", "shift")])
def test_dream_generation_matches_naive_sample(alg, schedule, models, stored):
    m = models["dream"]
    W = {k: v.float() for k, v in stored["dream"].items()}
    img = noise_image(800, 600, 3)
    gen = Generator(m, NoPruning(), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4),
                    sampler_kwargs=dict(alg=alg, schedule=schedule, shift=1 / 3))
    assert isinstance(gen.sampler, DreamSampler)
    gen.generate("What is the date?", [img])
    seq, _ = m.prepare(m.prompt_ids("What is the date?", 1), [img], gen_length=8)
    want = naive_dream_sample(m, W, seq, 4, alg, schedule=schedule, shift=1 / 3)
    assert gen.recorder.current.output_ids == want
    assert m.mask_id not in want


def test_dream_alg_temp_samples_slots_reproducibly(models):
    m = models["dream"]
    img = noise_image(640, 480, 4)
    outs = []
    for _ in range(2):
        gen = Generator(m, NoPruning(), FirstStep(), GenPreset(gen_length=8, block_length=8, steps=4),
                        sampler_kwargs=dict(alg="entropy", alg_temp=0.5), seed=3)
        gen.generate("What?", [img], sample_id=1)
        outs.append(gen.recorder.current.output_ids)
    assert outs[0] == outs[1] and m.mask_id not in outs[0]


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_ratio_one_is_no_pruning_and_a_pruned_run_keeps_the_last_prompt_token(backbone, models):
    m = models[backbone]
    preset = GenPreset(gen_length=8, block_length=8, steps=4)
    img = noise_image(700, 500, 5)
    base = Generator(m, NoPruning(), FirstStep(), preset)
    full = Generator(m, FastV(ratio=1.0, layer=1, query_set="last_token"), FirstStep(), preset)
    a, b = base.generate("What is the total?", [img]), full.generate("What is the total?", [img])
    assert base.recorder.current.output_ids == full.recorder.current.output_ids and a == b

    pruned = Generator(m, FastV(ratio=0.25, layer=1), FirstStep(), preset)
    ids = m.prompt_ids("What is the total?", 1)
    seq, info = m.prepare(ids, [img], preset.gen_length)
    P = seq.prompt_embeds.shape[0]
    pruned.recorder.start_sample()
    out_ids, final = pruned.sampler.generate(pruned.engine, seq)
    assert len(out_ids) == 8 and m.mask_id not in out_ids
    n_vis = info["n_visual"]
    assert int((final.roles == Roles.VISUAL).sum()) == round(0.25 * n_vis)
    # only visual tokens went; the last prompt token (Dream's predictor of slot 0) is still last
    assert int((final.roles == Roles.TEXT).sum()) == int((seq.roles == Roles.TEXT).sum())
    assert int(final.positions[-1]) == P - 1 and int(final.roles[-1]) == Roles.TEXT
    assert isinstance(pruned.generate("What is the total?", [img]), str)
