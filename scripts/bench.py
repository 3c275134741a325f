#!/usr/bin/env python
"""Latency of masked-diffusion generation, unpruned vs FastV, against the FLOPs prediction.

    python scripts/bench.py                      # CPU, hidden 512, 8 layers, ~1000 visual tokens
    python scripts/bench.py --vocab 32768 --reps 3 --warmup 1 --threads 2

A random LLaDA-V-shaped model (dvlm_exp.models.tiny's init recipe, built in memory) decodes
`--gen` answer slots in `--steps` forwards (LLaDA-V's DocVQA preset: gen 32, block 32,
steps 16) through the Engine, from a prompt of `--text` random text tokens around
`--n-visual` random visual embeddings (the vision tower is skipped: its cost is the same
with or without pruning). Configs: unpruned, and FastV keep `--keep` at layer `--layer`
decided at the first step (FirstStep schedule) with query sets last_token and
masked_response. Reps are interleaved across configs so background load hits them alike.

Per config: median latency over `--reps` (after `--warmup`), measured speedup
t_unpruned / t_pruned, FLOPs-predicted speedup = baseline / pruned FLOPs under the `exact`
convention of dvlm_exp.flops (from the Recorder of the same run), their ratio, scoring
time (Recorder.scoring_s), NFE and peak memory (CUDA: max allocated per config; CPU: the
process' peak RSS, monotone over the run). On CPU a rep during which another process took
a core (CPU use per thread < `--min-util`) is redone, up to `--retries` times; `cpu_util`
per rep is reported. `--profile` adds a per-part breakdown of one extra run per config.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_REPO))

N_SPECIAL = 6  # bos, eos, mask, start_header, end_header, eot


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--hidden", type=int, default=512)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int, default=None, help="default: --heads")
    a("--inter", type=int, default=1376)
    a("--vocab", type=int, default=126464,
      help="LM-head / embedding rows (default: LLaDA's 126464; smaller vocabs move the special ids to the top rows)")
    a("--n-visual", type=int, default=1000, help="visual tokens in the prompt")
    a("--text", type=int, default=64, help="text tokens in the prompt (8 before the image, the rest after)")
    a("--gen", type=int, default=32)
    a("--block", type=int, default=32)
    a("--steps", type=int, default=16)
    a("--keep", type=float, default=0.35, help="FastV keep ratio")
    a("--layer", type=int, default=None, help="FastV layer K (default: layers // 2)")
    a("--query-sets", default="last_token,masked_response")
    a("--head-rows", default="needed", choices=("all", "needed"),
      help="LM-head rows per step (task.gen.head_rows): needed = masked slots that can be picked; all = every slot")
    a("--reps", type=int, default=5)
    a("--warmup", type=int, default=1)
    a("--threads", type=int, default=2)
    a("--min-util", type=float, default=0.9,
      help="CPU: redo a rep whose CPU use per thread fell below this (other processes took a core)")
    a("--retries", type=int, default=2, help="redos per rep at most (the last attempt is kept)")
    a("--device", default="cpu")
    a("--dtype", default="float32")
    a("--seed", type=int, default=0)
    a("--profile", action="store_true", help="also time each part of one run per config")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- setup
def build_model(args):
    import torch
    from transformers import SiglipVisionConfig

    from dvlm_exp.models import llada_v, tiny

    spec = dict(tiny.DEFAULT_SPEC, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                intermediate_size=args.inter, vocab_size=args.vocab)
    cfg = tiny.official_config(spec)
    tc = tiny.tower_config(spec)
    vcfg = SiglipVisionConfig(**{k: v for k, v in tc.items() if k not in ("architectures", "model_type", "image_mean")},
                              vision_use_head=False)
    vcfg.num_hidden_layers = spec["vision_layers"]
    torch.manual_seed(args.seed)
    model = llada_v.LLaDAV(cfg, vcfg)
    tiny._init_(model, args.seed)  # write_checkpoint's recipe, without the round trip to disk
    model.to(device=llada_v.resolve_device(args.device), dtype=llada_v.resolve_dtype(args.dtype)).eval()
    if args.vocab <= max(llada_v.DEFAULT_SPECIAL_IDS.values()):
        top = args.vocab - N_SPECIAL
        model.special_ids = {k: top + i for i, k in enumerate(llada_v.DEFAULT_SPECIAL_IDS)}
    return model


def build_prompt(model, args):
    """[8 text] + [n_visual visual] + [text - 8 text] + [gen masks], as `LLaDAV.prepare` lays it out."""
    import torch

    from dvlm_exp.engine.state import Roles, Sequence

    g = torch.Generator().manual_seed(args.seed + 1)
    n_before = min(8, args.text)
    n_after = args.text - n_before
    low = min(model.special_ids.values())  # ordinary ids lie below every special id
    text_ids = torch.randint(0, low, (args.text,), generator=g).to(model.device)
    with torch.inference_mode():
        text = model.embed_tokens(text_ids)
    visual = torch.randn(args.n_visual, args.hidden, generator=g).to(device=model.device, dtype=model.dtype)
    emb = torch.cat([text[:n_before], visual, text[n_before:]])
    roles = torch.cat([torch.full((n_before,), Roles.TEXT, dtype=torch.int8),
                       torch.full((args.n_visual,), Roles.VISUAL, dtype=torch.int8),
                       torch.full((n_after,), Roles.TEXT, dtype=torch.int8)]).to(model.device)
    P = emb.shape[0]
    return Sequence(prompt_embeds=emb, roles=roles, positions=torch.arange(P, device=model.device),
                    response_ids=torch.full((args.gen,), model.mask_id, dtype=torch.long, device=model.device),
                    prompt_len0=P, mask_id=model.mask_id)


def configs(args):
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.schedule import FirstStep

    K = args.layer if args.layer is not None else args.layers // 2
    out = [("unpruned", None, None)]
    for qs in [q for q in args.query_sets.split(",") if q]:
        out.append((f"fastv_{qs}", FastV(query_set=qs, ratio=args.keep, layer=K), FirstStep()))
    return out


# ---------------------------------------------------------------------------- timing
def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(model, seq0, sampler, pruner, schedule, seed):
    """One generate call on a fresh copy of the prompt state: (seconds, SampleRecord, answer ids).

    Also sets `cpu_util` on the record: CPU seconds of this process per wall second and
    thread. Well below 1 means other processes took the cores; the wall time is then
    inflated, and more so for runs made of smaller ops (the pruned ones)."""
    import torch

    from dvlm_exp.engine import Engine

    seq = seq0.keep_prompt(torch.arange(seq0.prompt_embeds.shape[0], device=seq0.roles.device))
    seq.response_ids = seq0.response_ids.clone()
    engine = Engine(model, pruner, schedule)
    rec = engine.recorder.start_sample()
    torch.manual_seed(seed)
    sync(model.device)
    c0, t0 = os.times(), time.perf_counter()
    ids, _ = sampler.generate(engine, seq)
    sync(model.device)
    rec.latency_s = time.perf_counter() - t0
    c1 = os.times()
    rec.output_ids = ids
    rec.cpu_util = (c1.user - c0.user + c1.system - c0.system) / (rec.latency_s * torch.get_num_threads())
    return rec.latency_s, rec, ids


def peak_memory_mb(device, reset=False):
    import torch

    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return None
        return torch.cuda.max_memory_allocated(device) / 2**20
    if reset:
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def profile_parts(model, seq0, sampler, pruner, schedule, seed):
    """Wall time per part of one generate call: decoder layers, LM head (norm + matmul),
    sampler work after the forward, the rest of the engine's forward (embedding, concat,
    RoPE, gathers). Uses forward hooks and a timed sampler; adds a little overhead."""
    import torch

    parts = {"layers": 0.0, "lm_head": 0.0}
    marks = {}

    def pre(name):
        def hook(_m, _inp):
            sync(model.device)
            marks[name] = time.perf_counter()
        return hook

    def post(name, key):
        def hook(_m, _inp, _out):
            sync(model.device)
            parts[key] += time.perf_counter() - marks[name]
        return hook

    from dvlm_exp.engine import Engine
    from dvlm_exp.engine import engine as engine_mod

    # The engine calls the head through `_lm_head` (vocabulary chunks on CPU), so the
    # module's hooks may not fire: time that function when the engine has it.
    head_fn = getattr(engine_mod, "_lm_head", None)

    def timed_head(*a, **kw):
        t0 = time.perf_counter()
        out = head_fn(*a, **kw)
        sync(model.device)
        parts["lm_head"] += time.perf_counter() - t0
        return out

    handles = []
    for li, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(pre(f"l{li}")))
        handles.append(layer.register_forward_hook(post(f"l{li}", "layers")))
    for name, mod in (("norm", model.norm), ("head", model.lm_head)):
        if name == "head" and head_fn is not None:
            engine_mod._lm_head = timed_head
            continue
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name, "lm_head")))

    engine_forward = Engine.forward
    fwd_total = [0.0]

    def timed_forward(self, *a, **kw):
        t0 = time.perf_counter()
        out = engine_forward(self, *a, **kw)
        sync(model.device)
        fwd_total[0] += time.perf_counter() - t0
        return out

    Engine.forward = timed_forward
    try:
        total, rec, _ = run_once(model, seq0, sampler, pruner, schedule, seed)
    finally:
        Engine.forward = engine_forward
        if head_fn is not None:
            engine_mod._lm_head = head_fn
        for h in handles:
            h.remove()
    parts["engine_other"] = fwd_total[0] - parts["layers"] - parts["lm_head"]
    parts["sampler"] = total - fwd_total[0]
    parts["scoring"] = rec.scoring_s
    parts["total"] = total
    return {k: round(v * 1e3, 2) for k, v in parts.items()}


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dvlm_exp import flops
    from dvlm_exp.sampler import MaskedDiffusionSampler, SamplerConfig

    torch.set_num_threads(args.threads)
    t_build = time.perf_counter()
    model = build_model(args)
    seq0 = build_prompt(model, args)
    t_build = time.perf_counter() - t_build
    dims = model.dims()
    sampler = MaskedDiffusionSampler(SamplerConfig(gen_length=args.gen, block_length=args.block, steps=args.steps,
                                                   head_rows=args.head_rows),
                                     model.banned_ids)
    cfgs = configs(args)
    dev = model.device

    results = {name: {"times": [], "scoring_s": [], "cpu_util": []} for name, _, _ in cfgs}
    for name, pruner, schedule in cfgs:  # warmup (and the run whose recorder we account)
        peak_memory_mb(dev, reset=True)
        for _ in range(max(1, args.warmup)):
            _, rec, ids = run_once(model, seq0, sampler, pruner, schedule, args.seed)
        r = results[name]
        r["record"], r["ids"] = rec, ids
        r["peak_mem_mb"] = peak_memory_mb(dev)
    for _ in range(args.reps):  # interleaved so background load hits every config alike
        for name, pruner, schedule in cfgs:
            r = results[name]
            for attempt in range(1 + args.retries):
                t, rec, ids = run_once(model, seq0, sampler, pruner, schedule, args.seed)
                if ids != r["ids"]:
                    raise RuntimeError(f"{name}: output changed between repetitions")
                if dev.type != "cpu" or rec.cpu_util >= args.min_util or attempt == args.retries:
                    break
                r["discarded"] = r.get("discarded", 0) + 1  # another process took a core: redo
            r["times"].append(t)
            r["scoring_s"].append(rec.scoring_s)
            r["cpu_util"].append(rec.cpu_util)

    base_name = cfgs[0][0]
    t_base = statistics.median(results[base_name]["times"])
    base_flops = flops.sample_flops(results[base_name]["record"], dims, "exact")["total"]
    rows = []
    for name, pruner, schedule in cfgs:
        r = results[name]
        rec = r["record"]
        f = flops.sample_flops(rec, dims, "exact")
        t = statistics.median(r["times"])
        measured = t_base / t
        predicted = f["baseline_total"] / f["total"]
        row = {
            "config": name,
            "median_s": round(t, 4),
            "min_s": round(min(r["times"]), 4),
            "times_s": [round(x, 4) for x in r["times"]],
            "cpu_util": [round(x, 2) for x in r["cpu_util"]],
            "reps_redone": r.get("discarded", 0),
            "speedup_measured": round(measured, 4),
            "speedup_flops": round(predicted, 4),
            "ratio": round(measured / predicted, 4),
            "gflops": round(f["total"] / 1e9, 3),
            "gflops_baseline": round(f["baseline_total"] / 1e9, 3),
            "gflops_lm_head": round(f["lm_head"] / 1e9, 3),
            "baseline_matches_unpruned": f["baseline_total"] == base_flops,
            "nfe": rec.n_forwards,
            "lm_head_rows": rec.lm_head_rows,
            "visual_kept_last_step": rec.visual_kept[-1] if rec.visual_kept else None,
            "scoring_ms": round(1e3 * statistics.median(r["scoring_s"]), 3),
            "scoring_gflops": round(rec.scoring_flops / 1e9, 4),
            "peak_mem_mb": None if r["peak_mem_mb"] is None else round(r["peak_mem_mb"], 1),
            "same_answer_as_unpruned": r["ids"] == results[base_name]["ids"],
        }
        if args.profile:
            row["profile_ms"] = profile_parts(model, seq0, sampler, pruner, schedule, args.seed)
        rows.append(row)

    print(f"model: d={dims['d']} layers={dims['layers']} heads={dims['heads']} inter={dims['m']} vocab={dims['vocab']}"
          f" | prompt {seq0.prompt_len0} tokens ({args.n_visual} visual) + {args.gen} answer slots,"
          f" block {args.block}, steps {args.steps} | device {dev}, threads {torch.get_num_threads()}"
          f" | reps {args.reps} after {args.warmup} warmup | build {t_build:.1f}s")
    hdr = f"{'config':<24}{'median s':>10}{'min s':>8}{'cpu util':>9}{'speedup':>9}{'FLOPs x':>9}{'ratio':>8}{'GFLOPs':>10}{'NFE':>5}{'score ms':>10}{'peak MB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
        util = statistics.median(row["cpu_util"]) if row["cpu_util"] else float("nan")
        print(f"{row['config']:<24}{row['median_s']:>10.3f}{row['min_s']:>8.3f}{util:>9.2f}{row['speedup_measured']:>9.3f}{row['speedup_flops']:>9.3f}"
              f"{row['ratio']:>8.3f}{row['gflops']:>10.2f}{row['nfe']:>5}{row['scoring_ms']:>10.2f}{mem:>9}")
    if args.profile:
        print("\nper-part wall time of one run (ms):")
        for row in rows:
            print(f"  {row['config']:<22}" + "  ".join(f"{k}={v}" for k, v in row["profile_ms"].items()))
    if dev.type == "cpu":
        print("peak MB on CPU is the process' max RSS so far (monotone), not a per-config figure")

    summary = {
        "bench": "generate_latency_vs_flops",
        "model": {k: dims[k] for k in ("d", "m", "layers", "heads", "kv_heads", "vocab")},
        "prompt_len": seq0.prompt_len0, "n_visual": args.n_visual, "gen": args.gen, "block": args.block,
        "steps": args.steps, "head_rows": args.head_rows, "keep": args.keep, "layer": cfgs[-1][1].layer if len(cfgs) > 1 else None,
        "schedule": "FirstStep", "device": str(dev), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "reps": args.reps, "warmup": args.warmup, "flops_convention": "exact",
        "torch": torch.__version__, "python": platform.python_version(),
        "results": rows,
        "min_ratio": min((r["ratio"] for r in rows[1:]), default=None),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
