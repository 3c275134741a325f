"""Latency of masked-diffusion generation, unpruned vs FastV / RedVTP (and peer-style baselines),
against the FLOPs prediction.

Long file: one benchmark, every figure of the README's Performance section (configs, peers,
memory, profile) from one command; the parts share the timing harness.

    python scripts/bench.py                      # CPU, hidden 512, 8 layers, ~1000 visual tokens
    python scripts/bench.py --vocab 32768 --reps 3 --warmup 1 --threads 2
    python scripts/bench.py --keeps 0.5 --methods redvtp --no-peers

A random LLaDA-V-shaped model (dvlm_exp.models.tiny's init recipe, built in memory) decodes
`--gen` answer slots in `--steps` forwards (LLaDA-V's DocVQA preset: gen 32, block 32,
steps 16) through the Engine, from a prompt of `--text` random text tokens around
`--n-visual` random visual embeddings (the vision tower is skipped: its cost is the same
with or without pruning). Every method decides at the first step (FirstStep schedule).
Configs: unpruned; then per keep ratio in `--keeps` (`--keep` = one ratio, the old option):
  fastv_<query set>_k<keep>   FastV at layer K = `--layer` (default layers // 2), one per
                              `--query-sets` (last_token, masked_response)
  redvtp_k<keep>              RedVTP as conf/prune/redvtp.yaml (masked_response, floor, renumber)
  peer_fastv_eager_<qs>_k<keep>, peer_redvtp_eager_all_layers_k<keep>   peer-style baselines
                              (unless --no-peers): the same method and decision, plus the
                              full n x n attention maps the peers' official code computes with
                              output_attentions (FastV: layer K-1; RedVTP: every layer of the
                              scoring forward). EMULATED with our row machinery, see
                              `peer_classes` (a lower bound for peers
                              that run eager attention throughout).
Reps are interleaved across configs so background load hits them alike.

Per config: median latency over `--reps` (after `--warmup`), measured speedup
t_unpruned / t_pruned, FLOPs-predicted speedup = baseline / pruned FLOPs under the `exact`
convention of dvlm_exp.reporting.flops (from the Recorder of the same run; scoring FLOPs count on the
pruned side), their ratio (realized / predicted, target >= 0.95), scoring time
(Recorder.scoring_s) and its share of the acting (scoring) forward's wall time (target
<= 2 %), our speedup over the peer at the same keep ratio (t_peer / t_ours), NFE, LM-head
rows per step with `--head-rows` vs every answer slot and the head's FLOPs both ways, and peak
memory per config from extra untimed runs (see `measure_peak_memory`: CUDA max allocated;
CPU the kernel's RSS high-water mark reset per config, and the peak of torch's live CPU tensor
bytes from the profiler's memory events; `--no-memory` skips them), and tokens/s (answer slots
per second) with the throughput gain over unpruned, beside RedVTP's published LLaDA-V figure
(dvlm_exp/reporting/published.yaml). On CPU a rep during which
another process took a core (CPU use per thread < `--min-util`) is redone, up to `--retries`
times; `cpu_util` per rep is reported. `--profile` adds a per-part breakdown of one extra run
per config. The last stdout line is one JSON object; its "targets" section gathers the issue's
targets per config (reported, never asserted).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass


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
    a("--keeps", default="0.35,0.25", help="keep ratios, comma-separated (each gets every method and peer)")
    a("--keep", type=float, default=None, help="a single keep ratio (overrides --keeps; the old option)")
    a("--layer", type=int, default=None, help="FastV layer K (default: layers // 2)")
    a("--query-sets", default="last_token,masked_response", help="FastV query sets, comma-separated")
    a("--methods", default="fastv,redvtp", help="pruned methods, comma-separated: fastv, redvtp")
    a("--no-peers", action="store_true", help="skip the peer-style (full attention map) baselines")
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
    a("--no-memory", action="store_true",
      help="skip the two untimed peak-memory runs per config (for large configs; memory is then null)")
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


@dataclass
class Config:
    """One benchmarked configuration. `kind`: baseline | ours | peer; a peer names the config of
    ours it emulates (`peer_of`: same method, keep ratio, query rows and decision)."""

    name: str
    pruner: object = None
    schedule: object = None
    position_ids: str = "keep"
    method: str = "none"
    keep: float | None = None
    query_set: str | None = None
    kind: str = "baseline"
    peer_of: str | None = None


@functools.cache
def peer_classes():
    """(PeerFastV, PeerRedVTP): our FastV / RedVTP asking for EVERY query row of the scored layers.

    What the peers' official code does: FastV runs layer K-1 with `output_attentions=True`,
    RedVTP runs every layer of the scoring forward with it; eager attention then computes the
    full n x n softmax in each of those layers and returns the [h, n, n] maps, and the method
    reads a few rows. We emulate that extra work with our row machinery: `AllRowsRequest`
    first computes the method's own rows exactly as `ScoreRequest` does (so the decision, the
    kept set and the answer are bit-identical to ours), then the softmax of all the other
    n - r query rows of that layer (chunked, per head, then head-mean) and keeps the assembled
    head-mean n x n map until the forward's scores are dropped, as the peers hold their
    attention outputs. Work counted: n rows per scored layer, exactly the peers' QK^T + softmax.
    What this does NOT emulate: eager attention materialises the n x n probabilities per head
    ([h, n, n], h times our head-mean map; RedVTP's code keeps every layer's until the forward
    ends) and computes the layer output as probs @ V unfused, instead of SDPA. transformers'
    SDPA path returns no attention weights, so a peer loads the model with eager attention and
    then runs it in EVERY layer at EVERY step: real peers are slower (and bigger) still. At a
    scored layer alone the emulation costs about what eager does (SDPA + the all-row softmax vs
    eager QK^T + softmax + PV; on a 2-core CPU at n=1096, h=8, dh=64: 23 + 76 ms vs 86 ms): the
    emulated peer is a lower bound for a peer running eager everywhere, and close to (slightly
    above) one that would switch to eager only at its scored layers.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from dvlm_exp.engine import attention as attn
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.pruning.redvtp import RedVTP

    class AllRowsRequest(attn.ScoreRequest):
        def compute(self, query, key, scaling, n_groups, value=None):
            want_rows = self.keep_rows
            self.keep_rows = True  # head-mean rows of the method's queries: part of the full map
            super().compute(query, key, scaling, n_groups, value)  # ours, bit for bit
            self.keep_rows = want_rows
            t0 = time.perf_counter()
            dev = query.device
            n = key.shape[2]
            wanted = self.query_index.to(dev)
            rest_mask = torch.ones(n, dtype=torch.bool, device=dev)
            rest_mask[wanted] = False
            rest = torch.nonzero(rest_mask).squeeze(1)
            full = torch.empty(n, n, dtype=torch.float32, device=dev)  # the n x n attention map
            full[wanted] = self.rows
            if rest.numel():
                k = repeat_kv(key, n_groups)[0].float()  # [h, n, dh]
                q = query[0, :, rest].float()  # [h, n - r, dh]
                h, r_rest, dh = q.shape
                chunk = max(1, attn._MAX_BLOCK_ELEMENTS // max(1, h * n))
                kt = k.transpose(1, 2)
                for s in range(0, r_rest, chunk):
                    probs = torch.softmax(torch.matmul(q[:, s : s + chunk], kt) * scaling, dim=-1)
                    full[rest[s : s + chunk]] = probs.mean(0)
                self.flops += 2 * h * r_rest * n * dh
            self.extra["attention_map"] = full
            if not want_rows:
                self.rows = None
            self.n_rows = n
            if full.is_cuda:
                torch.cuda.synchronize(dev)
            self.seconds += time.perf_counter() - t0

    def all_rows(req):
        if req is None:
            return None
        out = AllRowsRequest(req.query_index, keep_rows=req.keep_rows, keep_heads=req.keep_heads,
                             keep_values=req.keep_values)
        out.extra.update(req.extra)
        return out

    class PeerFastV(FastV):
        """FastV with the full attention map of layer K-1 (official code: output_attentions there)."""

        name = "fastv_peer_eager"

        def score_request(self, view):
            return all_rows(super().score_request(view))

    class PeerRedVTP(RedVTP):
        """RedVTP with full attention maps at every layer of the scoring forward (official code)."""

        name = "redvtp_peer_eager"

        def score_request(self, view):
            return all_rows(super().score_request(view))

    return PeerFastV, PeerRedVTP


def parse_keeps(args) -> list[float]:
    if args.keep is not None:  # the old single-ratio option
        return [float(args.keep)]
    return [float(k) for k in args.keeps.split(",") if k.strip()]


def layer_k(args) -> int:
    return args.layer if args.layer is not None else args.layers // 2


def configs(args) -> list[Config]:
    """unpruned; per keep ratio: FastV per query set, RedVTP, then the peers of each (unless --no-peers)."""
    from dvlm_exp.pruning.fastv import FastV
    from dvlm_exp.pruning.redvtp import RedVTP
    from dvlm_exp.schedules.first_step import FirstStep

    K = layer_k(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"fastv", "redvtp"}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)} (fastv, redvtp)")
    PeerFastV, PeerRedVTP = peer_classes()
    out = [Config("unpruned")]
    for keep in parse_keeps(args):
        tag = f"k{keep:g}"
        ours, peers = [], []
        if "fastv" in methods:
            for qs in [q for q in args.query_sets.split(",") if q]:
                name = f"fastv_{qs}_{tag}"
                ours.append(Config(name, FastV(query_set=qs, ratio=keep, layer=K), FirstStep(), "keep",
                                   "fastv", keep, qs, "ours"))
                peers.append(Config(f"peer_fastv_eager_{qs}_{tag}", PeerFastV(query_set=qs, ratio=keep, layer=K),
                                    FirstStep(), "keep", "fastv", keep, qs, "peer", name))
        if "redvtp" in methods:
            # conf/prune/redvtp.yaml: floor rounding, renumbered positions (the authors' code)
            kw = dict(query_set="masked_response", ratio=keep, rounding="floor", position_ids="renumber")
            name = f"redvtp_{tag}"
            ours.append(Config(name, RedVTP(**kw), FirstStep(), "renumber", "redvtp", keep, "masked_response", "ours"))
            peers.append(Config(f"peer_redvtp_eager_all_layers_{tag}", PeerRedVTP(**kw), FirstStep(), "renumber",
                                "redvtp", keep, "masked_response", "peer", name))
        out += ours + ([] if args.no_peers else peers)
    return out


# ---------------------------------------------------------------------------- timing
def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(model, seq0, sampler, cfg: Config, seed):
    """One generate call on a fresh copy of the prompt state: (seconds, SampleRecord, answer ids).

    Also sets on the record: `cpu_util`, CPU seconds of this process per wall second and
    thread (well below 1 means other processes took the cores; the wall time is then inflated,
    and more so for runs made of smaller ops, the pruned ones); `acting_forward_s`, the wall
    time of the engine forwards at the schedule's acting steps (the scoring forward: step 0
    under FirstStep), from a thin wrapper around `engine.forward`; `kept_visual`, the original
    indices of the visual tokens left in the final state."""
    import torch

    from dvlm_exp.engine import Engine
    from dvlm_exp.engine.state import Roles

    seq = seq0.keep_prompt(torch.arange(seq0.prompt_embeds.shape[0], device=seq0.roles.device))
    seq.response_ids = seq0.response_ids.clone()
    engine = Engine(model, cfg.pruner, cfg.schedule, position_ids=cfg.position_ids)
    rec = engine.recorder.start_sample()
    inner = engine.forward
    fwd_s = []  # (step, seconds) per forward

    def timed_forward(seq, step, response_rows):
        t0 = time.perf_counter()
        out = inner(seq, step, response_rows)
        sync(model.device)
        fwd_s.append((step, time.perf_counter() - t0))
        return out

    engine.forward = timed_forward  # the sampler calls engine.forward(seq, step, rows)
    torch.manual_seed(seed)
    sync(model.device)
    c0, t0 = os.times(), time.perf_counter()
    ids, final = sampler.generate(engine, seq)
    sync(model.device)
    rec.latency_s = time.perf_counter() - t0
    c1 = os.times()
    rec.output_ids = ids
    rec.cpu_util = (c1.user - c0.user + c1.system - c0.system) / (rec.latency_s * torch.get_num_threads())
    sched = cfg.schedule
    rec.acting_forward_s = (sum(s for step, s in fwd_s if sched.acts_at(step)) if sched is not None
                            else None)
    rec.kept_visual = final.positions[final.roles == Roles.VISUAL].tolist()
    return rec.latency_s, rec, ids


# Peak memory per config, measured by extra (untimed) runs per config after the timing.
#   cuda: torch.cuda.max_memory_allocated during the run (peak); delta = peak - allocated before
#     (= the run's transient tensor memory, also reported as peak_tensor_delta_mb).
#   cpu, process RSS (Linux): the kernel's resident-set high-water mark VmHWM, reset before the
#     run (/proc/self/clear_refs "5") after gc and glibc malloc_trim(0) have handed freed heap
#     pages back, so the RSS at the reset is about the live set (weights, prompt state);
#     peak_mem_mb = VmHWM after the run, peak_mem_delta_mb = that - VmRSS at the reset (the run's
#     transient memory plus allocator slack). glibc's arena reuse makes it vary by tens of MB
#     from run to run for the same config at the default size: compare configs with the next.
#   cpu, tensors: a second run under torch.profiler(profile_memory=True); every CPU allocation
#     and free of PyTorch's allocator is an event, and peak_tensor_delta_mb is the peak of their
#     running sum (live tensor bytes above those alive at the start, temporaries inside ops
#     included; BLAS/oneDNN scratch and Python objects not). Deterministic for a config.
#   cpu fallback (no clear_refs): getrusage ru_maxrss, monotone over the process: the delta is
#     then only the growth of the process' peak, 0 for a config that needs less than earlier ones.
def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_peak_mb(run):
    """Peak of the live bytes of PyTorch's CPU allocator during `run()`, above the start (MiB),
    from the profiler's memory events; None where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and int(e.device_type()) == 0]  # DeviceType.CPU
    except (AttributeError, RuntimeError, TypeError):
        return None
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def measure_peak_memory(device, run) -> dict:
    """peak_mem_mb, peak_mem_delta_mb (over the memory in use before the run), on CUDA also
    peak_tensor_delta_mb, and what was measured (`kind`); see the comment above."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        peak = torch.cuda.max_memory_allocated(device)
        delta = (peak - base) / 2**20
        return {"peak_mem_mb": peak / 2**20, "peak_mem_delta_mb": delta, "peak_tensor_delta_mb": delta,
                "kind": "cuda max_memory_allocated per config (delta: over allocated before)"}
    _malloc_trim()
    if _reset_hwm():
        base = _status_kb("VmRSS")
        run()
        peak = _status_kb("VmHWM")
        out = {"peak_mem_mb": peak / 1024, "peak_mem_delta_mb": (peak - base) / 1024,
               "kind": "cpu: process VmHWM per config, reset after malloc_trim (delta: over VmRSS at the reset); "
                       "tensor delta: peak live bytes of torch's CPU allocator above the start (profiler memory events)"}
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"peak_mem_mb": peak / 1024, "peak_mem_delta_mb": (peak - base) / 1024,
               "kind": "cpu: ru_maxrss, monotone over the process (delta: growth of the peak); "
                       "tensor delta: peak live bytes of torch's CPU allocator above the start (profiler memory events)"}
    return out


def profile_parts(model, seq0, sampler, cfg: Config, seed):
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

    # The engine calls the head through `_lm_head` (oneDNN with a prepacked weight on CPU), so the
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
        total, rec, _ = run_once(model, seq0, sampler, cfg, seed)
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
def published_redvtp() -> dict | None:
    """RedVTP's headline LLaDA-V figures (throughput / latency change, %) from published.yaml,
    to print beside ours; None when the file is not found."""
    import yaml

    from dvlm_exp.reporting.report import published_default

    path = published_default()
    if path is None or not path.is_file():
        return None
    for paper in (yaml.safe_load(path.read_text()) or {}).get("papers") or []:
        if paper.get("key") == "redvtp":
            out = {h["metric"]: h["change_pct"] for h in paper.get("headlines", [])
                   if h.get("model") == "LLaDA-V" and "metric" in h}
            return {"throughput_gain_pct": out.get("token-generation throughput"),
                    "latency_change_pct": out.get("latency"), "source": f"{path.name}: {paper.get('arxiv')}"}
    return None


def _r(x, nd=4):
    return None if x is None else round(x, nd)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dvlm_exp.reporting import flops
    from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig

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
    by_name = {c.name: c for c in cfgs}
    dev = model.device

    results = {c.name: {"times": [], "scoring_s": [], "cpu_util": [], "acting_s": []} for c in cfgs}
    for c in cfgs:  # warmup (and the run whose recorder we account)
        for _ in range(max(1, args.warmup)):
            _, rec, ids = run_once(model, seq0, sampler, c, args.seed)
        r = results[c.name]
        r["record"], r["ids"], r["kept"] = rec, ids, rec.kept_visual
    for _ in range(args.reps):  # interleaved so background load hits every config alike
        for c in cfgs:
            r = results[c.name]
            for attempt in range(1 + args.retries):
                t, rec, ids = run_once(model, seq0, sampler, c, args.seed)
                if ids != r["ids"]:
                    raise RuntimeError(f"{c.name}: output changed between repetitions")
                if dev.type != "cpu" or rec.cpu_util >= args.min_util or attempt == args.retries:
                    break
                r["discarded"] = r.get("discarded", 0) + 1  # another process took a core: redo
            r["times"].append(t)
            r["scoring_s"].append(rec.scoring_s)
            r["cpu_util"].append(rec.cpu_util)
            r["acting_s"].append(rec.acting_forward_s)
    mem_kind = None
    for c in cfgs:  # one extra untimed run per config for its peak memory (after the timing)
        r = results[c.name]
        if args.no_memory:
            r.update(peak_mem_mb=None, peak_mem_delta_mb=None, peak_tensor_delta_mb=None)
            continue
        m = measure_peak_memory(dev, lambda c=c: run_once(model, seq0, sampler, c, args.seed))
        mem_kind = m.pop("kind")
        r.update(m)
    if dev.type != "cuda" and not args.no_memory:  # CPU tensor peaks: one profiled run per config
        for c in cfgs:
            gc.collect()
            results[c.name]["peak_tensor_delta_mb"] = _tensor_peak_mb(
                lambda c=c: run_once(model, seq0, sampler, c, args.seed))

    base_name = cfgs[0].name
    t_base = statistics.median(results[base_name]["times"]) if args.reps else float("nan")
    base_flops = flops.sample_flops(results[base_name]["record"], dims, "exact")["total"]
    head_row_flops = 2 * dims["d"] * dims["vocab"]  # one LM-head row, exact convention
    rows = []
    for c in cfgs:
        r = results[c.name]
        rec = r["record"]
        f = flops.sample_flops(rec, dims, "exact")
        t = statistics.median(r["times"]) if r["times"] else float("nan")
        measured = t_base / t
        predicted = f["baseline_total"] / f["total"]
        overheads = [s / a for s, a in zip(r["scoring_s"], r["acting_s"]) if a]
        all_rows = rec.n_forwards * args.gen  # head rows per run with head_rows=all
        row = {
            "config": c.name,
            "kind": c.kind,
            "method": c.method,
            "keep": c.keep,
            "query_set": c.query_set,
            "layer": layer_k(args) if c.method == "fastv" else None,
            "position_ids": c.position_ids,
            "median_s": round(t, 4),
            "min_s": round(min(r["times"]), 4) if r["times"] else None,
            "times_s": [round(x, 4) for x in r["times"]],
            "cpu_util": [round(x, 2) for x in r["cpu_util"]],
            "reps_redone": r.get("discarded", 0),
            "speedup_measured": round(measured, 4),
            "tokens_per_s": round(args.gen / t, 4),  # answer slots decoded per second (the whole answer)
            "throughput_gain_pct": round(100 * (measured - 1), 2),  # tokens/s over the unpruned run's
            "latency_change_pct": round(100 * (1 / measured - 1), 2),
            "speedup_flops": round(predicted, 4),  # = flops_baseline / flops
            "ratio": round(measured / predicted, 4),  # realized / predicted
            "flops": int(f["total"]),
            "flops_baseline": int(f["baseline_total"]),
            "gflops": round(f["total"] / 1e9, 3),
            "gflops_baseline": round(f["baseline_total"] / 1e9, 3),
            "gflops_lm_head": round(f["lm_head"] / 1e9, 3),
            "baseline_matches_unpruned": f["baseline_total"] == base_flops,
            "nfe": rec.n_forwards,
            "lm_head_rows": rec.lm_head_rows,
            "lm_head_rows_per_step": round(rec.lm_head_rows / max(1, rec.n_forwards), 3),
            "lm_head_rows_per_step_all": args.gen,
            "lm_head_saving": round(1 - rec.lm_head_rows / all_rows, 4) if all_rows else None,
            "gflops_lm_head_all_rows": round(all_rows * head_row_flops / 1e9, 3),
            "visual_kept_last_step": rec.visual_kept[-1] if rec.visual_kept else None,
            "kept_visual_digest": (hashlib.sha1(json.dumps(r["kept"]).encode()).hexdigest()[:12]
                                   if c.kind != "baseline" else None),
            "scoring_ms": round(1e3 * statistics.median(r["scoring_s"]), 3) if r["scoring_s"] else None,
            "scoring_gflops": round(rec.scoring_flops / 1e9, 4),
            "scoring_flops": int(rec.scoring_flops),
            "acting_forward_ms": (round(1e3 * statistics.median(r["acting_s"]), 3)
                                  if c.kind != "baseline" and r["acting_s"] else None),
            "scoring_overhead": round(statistics.median(overheads), 5) if overheads else None,
            "peak_mem_mb": None if r["peak_mem_mb"] is None else round(r["peak_mem_mb"], 1),
            "peak_mem_delta_mb": None if r["peak_mem_delta_mb"] is None else round(r["peak_mem_delta_mb"], 1),
            "peak_tensor_delta_mb": None if r["peak_tensor_delta_mb"] is None else round(r["peak_tensor_delta_mb"], 3),
            "answer_ids": r["ids"],
            "same_answer_as_unpruned": r["ids"] == results[base_name]["ids"],
        }
        if c.kind == "peer":
            ours = results[c.peer_of]
            row["peer_of"] = c.peer_of
            row["same_answer_as_ours"] = r["ids"] == ours["ids"]
            row["same_kept_as_ours"] = r["kept"] == ours["kept"]
        if args.profile:
            row["profile_ms"] = profile_parts(model, seq0, sampler, c, args.seed)
        rows.append(row)
    by_row = {row["config"]: row for row in rows}
    for row in rows:  # our speedup over each peer at the same keep ratio: time_peer / time_ours
        if row["kind"] == "peer":
            ours = by_row[row["peer_of"]]
            s = row["median_s"] / ours["median_s"]
            row["ours_speedup_over_this"] = round(s, 4)
            if row["scoring_ms"] is not None and ours["scoring_ms"] is not None:  # less noisy than the totals
                row["extra_scoring_ms_over_ours"] = round(row["scoring_ms"] - ours["scoring_ms"], 3)
            ours.setdefault("speedup_over_peers", {})[row["config"]] = round(s, 4)

    print(f"model: d={dims['d']} layers={dims['layers']} heads={dims['heads']} inter={dims['m']} vocab={dims['vocab']}"
          f" | prompt {seq0.prompt_len0} tokens ({args.n_visual} visual) + {args.gen} answer slots,"
          f" block {args.block}, steps {args.steps} | device {dev}, threads {torch.get_num_threads()}"
          f" | reps {args.reps} after {args.warmup} warmup | build {t_build:.1f}s")
    hdr = f"{'config':<40}{'median s':>10}{'min s':>8}{'cpu util':>9}{'speedup':>9}{'FLOPs x':>9}{'ratio':>8}{'GFLOPs':>10}{'NFE':>5}{'score ms':>10}{'score %':>9}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        util = statistics.median(row["cpu_util"]) if row["cpu_util"] else float("nan")
        ov = "-" if row["scoring_overhead"] is None else f"{100 * row['scoring_overhead']:.2f}"
        print(f"{row['config']:<40}{row['median_s']:>10.3f}{row['min_s'] or float('nan'):>8.3f}{util:>9.2f}"
              f"{row['speedup_measured']:>9.3f}{row['speedup_flops']:>9.3f}{row['ratio']:>8.3f}{row['gflops']:>10.2f}"
              f"{row['nfe']:>5}{row['scoring_ms'] or 0.0:>10.2f}{ov:>9}")
    hdr2 = f"\n{'config':<40}{'fwd0 ms':>9}{'head rows/step':>15}{'head saving':>12}{'head GF':>9}{'head GF all':>12}{'peak MB':>9}{'delta MB':>9}{'tensor MB':>10}{'ours x':>9}{'kept':>14}"
    print(hdr2)
    print("-" * (len(hdr2) - 1))
    for row in rows:
        fwd0 = "-" if row["acting_forward_ms"] is None else f"{row['acting_forward_ms']:.1f}"
        mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
        dm = "-" if row["peak_mem_delta_mb"] is None else f"{row['peak_mem_delta_mb']:.0f}"
        tm = "-" if row["peak_tensor_delta_mb"] is None else f"{row['peak_tensor_delta_mb']:.1f}"
        vs = row.get("ours_speedup_over_this")
        vs = "-" if vs is None else f"{vs:.3f}"  # on a peer's line: its time over ours (peer_of)
        kept = row["kept_visual_digest"] or "-"
        print(f"{row['config']:<40}{fwd0:>9}{row['lm_head_rows_per_step']:>15.2f}{row['lm_head_saving']:>12.3f}"
              f"{row['gflops_lm_head']:>9.3f}{row['gflops_lm_head_all_rows']:>12.3f}{mem:>9}{dm:>9}{tm:>10}{vs:>9}{kept:>14}")
    print("(fwd0 = the acting (scoring) forward; score % = scoring time / fwd0; ours x = the peer's time / ours (peer_of);"
          " head = LM-head rows with --head-rows vs every answer slot)")
    print(f"peak memory: {mem_kind}")
    pub = published_redvtp()  # also in the JSON below
    gains = ", ".join(f"{row['config']} {row['throughput_gain_pct']:+.0f} %" for row in rows if row["method"] == "redvtp" and row["kind"] == "ours")
    if pub and gains:
        print(f"tokens/s over unpruned: {gains} (RedVTP published, LLaDA-V on GPU: up to "
              f"{pub['throughput_gain_pct']:+g} % throughput, {pub['latency_change_pct']:+g} % latency)")
    if args.profile:
        print("\nper-part wall time of one run (ms):")
        for row in rows:
            print(f"  {row['config']:<38}" + "  ".join(f"{k}={v}" for k, v in row["profile_ms"].items()))

    ours_rows = [row for row in rows if row["kind"] == "ours"]
    peer_rows = [row for row in rows if row["kind"] == "peer"]
    overheads = {row["config"]: row["scoring_overhead"] for row in ours_rows}
    known = [v for v in overheads.values() if v is not None]
    targets = {
        # realized speedup / FLOPs-predicted speedup of our pruned configs (target >= 0.95)
        "realized_over_predicted": {row["config"]: row["ratio"] for row in ours_rows},
        "realized_over_predicted_min": min((row["ratio"] for row in ours_rows), default=None),
        "meets_0.95": {row["config"]: row["ratio"] >= 0.95 for row in ours_rows},
        # scoring time / the acting forward's time (target <= 2 %)
        "scoring_overhead": overheads,
        "scoring_overhead_max": max(known) if known else None,
        "meets_scoring_0.02": {k: (v is not None and v <= 0.02) for k, v in overheads.items()},
        # time_peer / time_ours at the same keep ratio, peers emulated (see peer_classes)
        "speedup_over_peer": {row["config"]: row["ours_speedup_over_this"] for row in peer_rows},
        "speedup_over_peer_min": min((row["ours_speedup_over_this"] for row in peer_rows), default=None),
        "peer_extra_scoring_ms": {row["config"]: row.get("extra_scoring_ms_over_ours") for row in peer_rows},
        "peer_answers_identical": all(row["same_answer_as_ours"] for row in peer_rows) if peer_rows else None,
        "lm_head_saving": {row["config"]: row["lm_head_saving"] for row in rows},
        "peak_mem_delta_mb": {row["config"]: row["peak_mem_delta_mb"] for row in rows},
        "peak_tensor_delta_mb": {row["config"]: row["peak_tensor_delta_mb"] for row in rows},
    }
    keeps = parse_keeps(args)
    summary = {
        "bench": "generate_latency_vs_flops",
        "model": {k: dims[k] for k in ("d", "m", "layers", "heads", "kv_heads", "vocab")},
        "prompt_len": seq0.prompt_len0, "n_visual": args.n_visual, "gen": args.gen, "block": args.block,
        "steps": args.steps, "head_rows": args.head_rows, "keep": keeps[0] if keeps else None, "keeps": keeps,
        "layer": layer_k(args) if any(c.method == "fastv" for c in cfgs) else None,
        "schedule": "FirstStep", "device": str(dev), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "reps": args.reps, "warmup": args.warmup, "flops_convention": "exact",
        "peak_mem_measure": mem_kind,
        "peers": "emulated: our decision plus the peers' full n x n softmax at their scored layers (FastV: K-1; "
                 "RedVTP: all layers of the scoring forward), layer outputs from SDPA; peers running eager "
                 "attention throughout (per-head n x n maps, unfused PV) are slower still",
        "torch": torch.__version__, "python": platform.python_version(),
        "published_redvtp_llada_v": pub,
        "results": rows,
        "min_ratio": min((row["ratio"] for row in ours_rows), default=None),
        "targets": targets,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
