"""FLOPs of a configuration (or a sweep) from config.json alone: size a sweep before running it.

    python scripts/plan_flops.py model=llada_v model.path=/data/LLaDA-V prune=fastv prune.layer=20 ratio=0.35 --image 1700x2200
    python scripts/plan_flops.py model=llada_v model.path=/data/LLaDA-V prune=fastv \\
        --ratios 1,0.75,0.5,0.35,0.25 --layers 2,8,16,20,24 --image 1700x2200
    python scripts/plan_flops.py model=tiny prune=fastv --ratios 0.5,0.25 --layers 1,2

Positional arguments are the Hydra overrides of run.py (same config groups: model, prune,
schedule, task; `task.gen.*` gives gen_length / block_length / steps). Only the checkpoint's
config.json (plus the vision-tower folder's config.json and tokenizer.json when present) is
read, never the weights; model=tiny takes its dims from `model.tiny` without writing the
checkpoint. Each row is what the engine would record for one sample that runs all steps
(no stop string fires): `exact` TFLOPs (decoder + LM head + vision tower + scoring rows)
and the `fastv_paper` ratio (decoder only, methods.md §5.2). The last stdout line is JSON.

Visual tokens come from `--image WxH` (default 1700x2200, a DocVQA-like page) or
`--n-visual`; text tokens from `--n-text`, or `--question` counted with the checkpoint's
tokenizer, else the estimate dvlm_exp.reporting.plan.DEFAULT_TEXT_TOKENS (80, methods.md §5.6).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _size(s: str) -> tuple[int, int]:
    try:
        w, h = s.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image must be WIDTHxHEIGHT (e.g. 1700x2200), got {s!r}") from None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (model=llada_v model.path=... prune=fastv ...)")
    ap.add_argument("--image", type=_size, default=(1700, 2200), help="image size WxH (default 1700x2200, a document page)")
    ap.add_argument("--images", type=int, default=1, help="images per sample (>1: the official pad mode, 729 tokens each)")
    ap.add_argument("--n-visual", type=int, default=None, help="visual tokens (overrides --image; give --views for the tower)")
    ap.add_argument("--views", type=int, default=None, help="vision-tower views with --n-visual (default 0: tower left out)")
    ap.add_argument("--n-text", type=int, default=None, help="text tokens of the prompt (default: --question or 80)")
    ap.add_argument("--question", default=None, help="count text tokens of this question with the checkpoint tokenizer")
    ap.add_argument("--ratios", type=_floats, default=None, help="keep ratios to sweep, e.g. 1,0.75,0.5,0.35,0.25")
    ap.add_argument("--layers", type=_ints, default=None, help="pruning layers K to sweep, e.g. 2,8,16,20,24")
    ap.add_argument("--position", default="in_forward", choices=("in_forward", "after_step"),
                    help="in_forward (the engine: before layer K) | after_step (RedVTP-like, analytic)")
    return ap.parse_intermixed_args(argv)


class PlanError(Exception):
    pass


def check_config(cfg) -> None:
    """run.py's checks before weights load, minus the task data's reachability and the weight files
    (planning reads only config.json)."""
    from dvlm_exp.run.validate import check

    check(cfg, data=False, weights=False)


def model_dims(cfg) -> tuple[dict, object, str]:
    """(dims, config source for image_tokens, a label)."""
    from omegaconf import OmegaConf

    from dvlm_exp.reporting import plan
    from dvlm_exp.errors import ConfigError

    m = cfg.model
    resize = bool(m.get("resize_vocab", True))
    if m.get("tiny") is not None:
        from dvlm_exp.models.tiny import official_config, tower_config

        spec = OmegaConf.to_container(m.tiny, resolve=True)
        source = (official_config(spec), tower_config(spec))
        return plan.dims_from_config(source[0], tower=source[1], resize_vocab=resize), source, f"tiny spec ({m.name})"
    if OmegaConf.is_missing(m, "path") or m.get("path") in (None, ""):
        raise ConfigError(f"model={m.name} needs model.path=/path/to/checkpoint (a folder with its config.json)")
    from dvlm_exp.run.paths import resolve_path

    path = resolve_path(m.path)
    return plan.dims_from_config(path, resize_vocab=resize), (path, None), str(path / "config.json")


def count_text(cfg, question: str) -> int:
    from omegaconf import OmegaConf

    from dvlm_exp.models.checkpoint import TOKENIZER_FILES
    from dvlm_exp.models.llada_v import IMAGE_TOKEN_INDEX

    from dvlm_exp.run.paths import resolve_path

    path = None if OmegaConf.is_missing(cfg.model, "path") else cfg.model.get("path")
    path = resolve_path(path) if path else None
    if not path or not all((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise PlanError(f"--question needs the tokenizer ({', '.join(TOKENIZER_FILES)}) in model.path; "
                        f"give --n-text instead")
    from transformers import PreTrainedTokenizerFast

    from dvlm_exp.models.tokenizer_tiny import build_llada_v_prompt

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    ids = build_llada_v_prompt(tok, question, image=True, think=cfg.task.gen.get("think"))
    return sum(1 for t in ids if t != IMAGE_TOKEN_INDEX)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from omegaconf import OmegaConf

    from dvlm_exp.reporting import plan
    from dvlm_exp.models.checkpoint import CheckpointError
    from dvlm_exp.run.build import compose_config
    from dvlm_exp.errors import ConfigError

    sweep = args.ratios is not None or args.layers is not None
    try:
        try:
            cfg = compose_config(args.overrides)
        except Exception as e:  # hydra: unknown group option, bad override syntax
            raise PlanError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        if sweep and cfg.prune.name == "none":
            print("note: prune=none cannot be swept; planning prune=fastv (add prune=<method> to choose)", file=sys.stderr)
            cfg = compose_config(list(args.overrides) + ["prune=fastv"])
        check_config(cfg)
        dims, source, label = model_dims(cfg)
        g = cfg.task.gen
        if args.n_visual is not None:
            n_visual, views, how = args.n_visual, args.views or 0, "given"
        else:
            it = plan.image_tokens(source[0], args.image, n_images=args.images, tower=source[1])
            n_visual, views = it["n_visual"], it["views"]
            how = f"image {args.image[0]}x{args.image[1]}" + (f" x{args.images}" if args.images != 1 else "")
        if args.n_text is not None:
            n_text, text_how = args.n_text, "given"
        elif args.question is not None:
            n_text, text_how = count_text(cfg, args.question), "tokenizer"
        else:
            n_text, text_how = plan.DEFAULT_TEXT_TOKENS, "estimate"
        step = int(cfg.schedule.step) if cfg.schedule.name == "at_step" else 0
        method = cfg.prune.name
        query_set = cfg.prune.get("query_set", "last_token")
        ratios = args.ratios or [float(cfg.ratio)]
        layers = args.layers or [int(cfg.prune.layer)]
        rows = []
        for r in ratios:
            for K in layers:
                c = cfg.copy()
                OmegaConf.update(c, "ratio", float(r))
                OmegaConf.update(c, "prune.layer", int(K))
                check_config(c)  # the same range checks as run.py (ratio in (0, 1], K within the depth)
                p = plan.plan(dims, n_visual, n_text, int(g.gen_length), int(g.block_length), int(g.steps), float(r),
                              int(K), step=step, position=args.position, views=views, method=method, query_set=query_set)
                ex, fp = p["exact"], p["fastv_paper"]
                rows.append({
                    "ratio": float(r), "layer": int(K), "kept_visual": p["kept_visual"], "n_pruned": p["n_pruned"],
                    "exact_tflops": ex["total"] / 1e12, "exact_reduction": ex["reduction"],
                    "exact_decoder_tflops": ex["decoder"] / 1e12, "lm_head_tflops": ex["lm_head"] / 1e12,
                    "vision_tflops": ex["vision"] / 1e12, "scoring_tflops": ex["scoring"] / 1e12,
                    "fastv_paper_ratio": fp["ratio"], "fastv_paper_reduction": fp["reduction"],
                    "visual_layer_avg": p["visual_layer_avg"],
                })
    except (PlanError, ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    ex0, fp0 = p["exact"], p["fastv_paper"]
    print(f"plan | model={cfg.model.name} ({label}: d {dims['d']}, {dims['layers']} layers, vocab {dims['vocab']}) "
          f"task={cfg.task.name} gen {g.gen_length}/{g.block_length}/{g.steps} steps, NFE {p['nfe']}")
    print(f"  tokens    {n_visual} visual ({how}, {views} tower views) + {n_text} text ({text_how}) + "
          f"{g.gen_length} answer = {p['n_full']}")
    print(f"  method    prune={method}" + (f" query_set={query_set}" if method == "fastv" else "")
          + f" schedule={cfg.schedule.name} (step {step}) position={args.position}")
    base_head = ex0["baseline_total"] - ex0["baseline_decoder"] - ex0["vision"]
    print(f"  baseline  exact {ex0['baseline_total'] / 1e12:.2f} TFLOP/sample (decoder "
          f"{ex0['baseline_decoder'] / 1e12:.2f}, LM head {base_head / 1e12:.3f}, vision {ex0['vision'] / 1e12:.2f}); "
          f"fastv_paper {fp0['baseline_total'] / 1e12:.2f} T/sample (4nd²+2n²d+2ndm, decoder only)")
    print(f"  {'ratio':>6} {'layer':>5} {'kept':>6} {'exact TFLOPs':>13} {'reduction':>10} {'fastv_paper ratio':>18}")
    for row in rows:
        print(f"  {row['ratio']:>6.2f} {row['layer']:>5d} {row['kept_visual']:>6d} {row['exact_tflops']:>13.2f} "
              f"{100 * row['exact_reduction']:>9.1f}% {row['fastv_paper_ratio']:>18.3f}")
    summary = {
        "model": cfg.model.name, "config": label, "task": cfg.task.name,
        "gen": {k: int(g[k]) for k in ("gen_length", "block_length", "steps")}, "nfe": p["nfe"],
        "prune": method, "query_set": query_set if method == "fastv" else None,
        "schedule": cfg.schedule.name, "step": step, "position": args.position,
        "n_visual": n_visual, "views": views, "n_text": n_text, "n_text_source": text_how, "n_full": p["n_full"],
        "dims": dims,
        "baseline": {"exact_tflops": ex0["baseline_total"] / 1e12, "fastv_paper_tflops": fp0["baseline_total"] / 1e12},
        "rows": rows,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
