"""FLOPs of a configuration before running it: from config.json alone, no weights.

`dims_from_config` reads the same dimensions `LLaDAV.dims()` reports after loading (tower
dims from the `mm_vision_tower` folder's config.json when the checkpoint ships one, else the
SigLIP so400m values the official code hard-codes). `image_tokens` counts visual tokens and
tower views from the image size alone (dvlm_exp.models.llava_image). `plan` builds the
`SampleRecord` the engine would write for a run that never stops early (NFE = steps, every
decoder-layer call's (n_q, n_k), LM-head rows = gen_length per forward, the scoring rows of
the method) and prices it with `dvlm_exp.reporting.flops.sample_flops` under both conventions, so a
plan and a finished run's `results.json` agree exactly (tests/test_plan.py checks this
against real tiny runs).

Text tokens: pass the real count when known (`scripts/plan_flops.py --question` counts it
with the checkpoint's tokenizer). The default, `DEFAULT_TEXT_TOKENS = 80`, is the estimate
methods.md §5.6 uses for LLaDA-V: system prompt + chat headers ≈ 50 tokens, plus a short
question and the " /no_think" suffix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from typing import TYPE_CHECKING

from dvlm_exp.reporting import flops
from dvlm_exp.models.checkpoint import CheckpointError, read_config

if TYPE_CHECKING:  # the engine package imports torch and transformers: loaded when a plan is built
    from dvlm_exp.engine.recorder import SampleRecord

DEFAULT_TEXT_TOKENS = 80
MODEL_TYPE = "llava_llada"
# SigLIP so400m/14-384 as the official tower hard-codes it (models.md §1.4); 27 layers in
# the folder, the last one deleted at load, so 26 run.
SO400M_TOWER = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14)
POSITIONS = ("in_forward", "after_step")


# ---------------------------------------------------------------------------------- config
def _load(path_or_dict, tower: Mapping | None = None) -> tuple[dict, dict, Path | None]:
    """(config, tower values, checkpoint folder or None)."""
    base = None
    if isinstance(path_or_dict, Mapping):
        cfg = dict(path_or_dict)
    else:
        p = Path(path_or_dict)
        if p.is_file():  # a config.json (possibly under another name)
            try:
                cfg = json.loads(p.read_text())
            except ValueError as e:
                raise CheckpointError(f"{p} is not valid JSON: {e}") from e
            if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
                raise CheckpointError(f"{p} is not a {MODEL_TYPE} config.json (model_type="
                                      f"{cfg.get('model_type') if isinstance(cfg, dict) else None!r})")
            base = p.parent
        else:
            cfg = read_config(p, MODEL_TYPE)  # clear errors: not a folder, config.json missing, wrong type
            base = p
    vals = dict(SO400M_TOWER)
    if tower is not None:
        vals.update({k: tower[k] for k in SO400M_TOWER if k in tower})
    elif base is not None and cfg.get("mm_vision_tower"):
        tower_cfg = base / str(cfg["mm_vision_tower"]) / "config.json"
        if tower_cfg.is_file():
            tc = json.loads(tower_cfg.read_text())
            vals.update({k: tc[k] for k in SO400M_TOWER if k in tc})
    return cfg, vals, base


def _tokenizer_len(base: Path | None) -> int | None:
    """max id + 1 of the checkpoint's tokenizer.json (what the loader resizes the vocab to)."""
    if base is None or not (base / "tokenizer.json").is_file():
        return None
    tok = json.loads((base / "tokenizer.json").read_text())
    ids = [int(t["id"]) for t in tok.get("added_tokens", [])]
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids += [int(i) for i in vocab.values()]
    return max(ids) + 1 if ids else None


def dims_from_config(path_or_dict, tower: Mapping | None = None, resize_vocab: bool = True,
                     tokenizer_len: int | None = None) -> dict:
    """The dims `LLaDAV.dims()` would report, from config.json (a checkpoint folder, a file, or a dict).

    `tower`: the vision tower's config (dict) when it is not in the `mm_vision_tower` folder.
    `resize_vocab` mirrors the loader option (default on, as conf/model/*.yaml): the LM head
    keeps len(tokenizer) rows; taken from the folder's tokenizer.json when present, else
    `tokenizer_len`, else the official LLaDA tokenizer's 126349.
    """
    cfg, tv, base = _load(path_or_dict, tower)
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
        m, layers = int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]!r}: not a complete {MODEL_TYPE} config") from e
    if resize_vocab:
        from dvlm_exp.models.tokenizer_tiny import LLADA_TOKENIZER_LEN

        n = tokenizer_len or _tokenizer_len(base) or LLADA_TOKENIZER_LEN
        vocab = min(vocab, n)
    pps = int(tv["image_size"]) // int(tv["patch_size"])
    return dict(
        d=d, m=m, layers=layers, heads=heads, kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=d // heads, vocab=vocab,
        vision_d=int(tv["hidden_size"]), vision_m=int(tv["intermediate_size"]),
        vision_layers=int(tv["num_hidden_layers"]) - 1,  # the official tower drops its last layer
        vision_patches=pps * pps, patch_size=int(tv["patch_size"]),
        mm_hidden=int(cfg.get("mm_hidden_size", tv["hidden_size"])),
    )


def image_tokens(path_or_dict, image_wh, n_images: int = 1, tower: Mapping | None = None) -> dict:
    """Visual tokens and tower views for `n_images` images of size (width, height), as LLaDAV.prepare.

    One image: anyres (base view + tile grid, unpad, anyres_max_N, newline column). Several:
    the official "pad" mode, one square view and pps² tokens each.
    """
    from dvlm_exp.models import llava_image

    cfg, tv, _ = _load(path_or_dict, tower)
    S = int(tv["image_size"])
    pps = S // int(tv["patch_size"])
    if n_images != 1:
        return {"n_visual": n_images * pps * pps, "views": n_images, "grid_cols_rows": None}
    pins = llava_image.parse_grid_pinpoints(cfg.get("image_grid_pinpoints") or [[S, S]], S)
    ar = str(cfg.get("image_aspect_ratio", "anyres_max_4"))
    max_tiles = int(ar.split("anyres_max_")[1]) if ar.startswith("anyres_max_") else None
    w, h = (int(image_wh[0]), int(image_wh[1]))
    cols, rows = llava_image.get_anyres_grid_shape((w, h), pins, S)
    n = llava_image.num_visual_tokens((w, h), pins, image_size=S, patches_per_side=pps, max_tiles=max_tiles)
    return {"n_visual": n, "views": 1 + cols * rows, "grid_cols_rows": (cols, rows)}


# ---------------------------------------------------------------------------------- plan
def _method_traits(method: str) -> tuple[bool, bool]:
    """(active, needs_attention) of a registered pruning method."""
    from dvlm_exp.registry import PRUNERS

    cls = PRUNERS.get(method)
    return bool(getattr(cls, "active", True)), bool(getattr(cls, "needs_attention", False))


def _score_rows(query_set: str, n: int, masked: int, gen_length: int) -> int:
    """Query rows of a FastV score request (dvlm_exp.pruning.fastv.FastV.query_index)."""
    if query_set in ("last_token", "last_prompt_token"):
        return 1
    if query_set == "all":
        return n
    if query_set == "masked_response":
        return masked if masked else gen_length
    raise ValueError(f"query_set must be last_token, all, masked_response or last_prompt_token, got {query_set!r}")


def plan_record(dims: dict, n_visual: int, n_text: int, gen_length: int, block_length: int, steps: int,
                keep_ratio: float, layer: int, step: int = 0, position: str = "in_forward", views: int = 0,
                method: str = "fastv", query_set: str = "last_token", rounding: str | None = None) -> "SampleRecord":
    """The SampleRecord the engine writes for this configuration when no stop string fires.

    Mirrors the sampler (blocks, even split of each block's masks, a block ends when it has
    no masks left) and the engine (layers < K at the full length n, layers >= K at
    n̂ = n - dropped visual tokens from the pruning step on, every later step at n̂; the
    score request at layer K-1). `position="after_step"` (RedVTP) is the K = T case of
    methods.md §5.5: the step runs in full and later steps run pruned; the engine itself
    scores the masked-response rows at every layer of that step (RedVTP's all-layer mean).
    `rounding`: the method's keep count rule (None: floor for redvtp, round otherwise).
    """
    from dvlm_exp.engine.recorder import Recorder
    from dvlm_exp.pruning.base import keep_count
    from dvlm_exp.decoding.sampler import num_transfer_tokens

    T = dims["layers"]
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if gen_length <= 0 or block_length <= 0 or steps <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a positive multiple of block_length={block_length}")
    nb = gen_length // block_length
    if steps % nb:
        raise ValueError(f"steps={steps} must be divisible by the number of blocks ({nb})")
    if n_visual < 0 or n_text < 0:
        raise ValueError("n_visual and n_text must be >= 0")
    active, needs_attention = _method_traits(method)
    K = T if position == "after_step" else int(layer)
    if active and not (0 <= K <= T - 1 or position == "after_step"):
        raise ValueError(f"layer={layer} is outside [0, {T - 1}] ({T} decoder layers)")
    if active and needs_attention and K < 1:
        raise ValueError(f"{method} scores at layer K-1: layer must be >= 1")
    if active and not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} is outside (0, 1]")

    n = n_text + n_visual + gen_length
    if rounding is None:
        rounding = "floor" if method == "redvtp" else "round"
    kept = keep_count(n_visual, keep_ratio, rounding) if active else n_visual
    n_hat = n - (n_visual - kept)
    recorder = Recorder()
    rec = recorder.start_sample()
    rec.n_visual, rec.vision_views = n_visual, views
    spb = steps // nb
    per_step = num_transfer_tokens(block_length, spb)
    t, pruned = 0, False
    for b in range(nb):
        committed = 0
        for i in range(spb):
            if committed >= block_length:  # the block has no masks left: next block
                break
            masked = gen_length - b * block_length - committed
            if active and not pruned and t == step:
                for li in range(T):
                    if needs_attention and position == "after_step":  # every layer's masked rows
                        rec.scoring_flops += flops.score_rows_flops(masked if masked else gen_length, n, dims)
                    elif needs_attention and li == K - 1:
                        rec.scoring_flops += flops.score_rows_flops(_score_rows(query_set, n, masked, gen_length), n, dims)
                    length, vis = (n, n_visual) if li < K else (n_hat, kept)
                    recorder.layer(t, li, length, length, vis)
                pruned = True
            else:
                length, vis = (n_hat, kept) if pruned else (n, n_visual)
                for li in range(T):
                    recorder.layer(t, li, length, length, vis)
            recorder.forward(n, gen_length, gen_length)
            committed += per_step[i]
            t += 1
    return rec


def priced(rec: "SampleRecord", dims: dict) -> dict:
    """`flops.sample_flops` of a record under both conventions, with ratio and reduction."""
    out = {}
    for conv in flops.CONVENTIONS:
        f = flops.sample_flops(rec, dims, conv)
        base = f["baseline_total"]
        f["ratio"] = f["total"] / base if base else 1.0
        f["reduction"] = 1.0 - f["ratio"]
        out[conv] = f
    return out


def plan(dims: dict, n_visual: int, n_text: int = DEFAULT_TEXT_TOKENS, gen_length: int = 32, block_length: int = 32,
         steps: int = 16, keep_ratio: float = 1.0, layer: int = 2, step: int = 0, position: str = "in_forward",
         views: int = 0, method: str = "fastv", query_set: str = "last_token") -> dict:
    """FLOPs of one sample of a configuration (no early stop), both conventions.

    Returns {"exact": sample_flops + ratio/reduction, "fastv_paper": ..., "nfe", "n_full",
    "n_pruned", "kept_visual", "visual_layer_avg", "pruned_forwards"}. `views`: vision-tower
    views (image_tokens(...)["views"]); 0 leaves the tower out of the exact total.
    """
    rec = plan_record(dims, n_visual, n_text, gen_length, block_length, steps, keep_ratio, layer, step=step,
                      position=position, views=views, method=method, query_set=query_set)
    n = n_text + n_visual + gen_length
    kept = min(rec.visual_kept) if rec.visual_kept else n_visual
    out = priced(rec, dims)
    out.update(
        nfe=rec.n_forwards, n_full=n, n_pruned=n - (n_visual - kept), kept_visual=kept,
        visual_layer_avg=sum(rec.visual_kept) / len(rec.visual_kept) if rec.visual_kept else 0.0,
        pruned_forwards=sum(1 for (s, li), v in rec.kept_by_step_layer.items() if li == dims["layers"] - 1 and v < n_visual),
    )
    return out

