"""The analysis job (scripts/analyze.py): config -> tapped generator -> data, figures, tables, W&B."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from dvlm_exp.analysis.aggregate import _nanmean
from dvlm_exp.analysis.figures import draw_figures
from dvlm_exp.analysis.session import AnalysisSession
from dvlm_exp.analysis.tables import _clean, load, write_tables


# ---------------------------------------------------------------------------------- the job
def _int_list(v) -> list[int] | None:
    if v is None or v == "":
        return None
    return [int(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str)
                             else str(v).split(","))] or None


def options(cfg) -> dict:
    """`analysis.*` keys with their defaults (docs/analysis.md)."""
    a = cfg.get("analysis") or {}
    return {"out": a.get("out"), "steps": _int_list(a.get("steps")),
            "overlay": int(a.get("overlay", 2)), "overlay_steps": _int_list(a.get("overlay_steps")),
            "contributions": bool(a.get("contributions", True)),
            "contrib_threshold": float(a.get("contrib_threshold", 0.995)), "remake": a.get("remake")}


def _tapped_generator(cfg, model, session: AnalysisSession):
    from omegaconf import OmegaConf

    from dvlm_exp.decoding.generator import GenPreset, Generator
    from dvlm_exp.run.build import build_pruner, build_schedule

    class AnalysisGenerator(Generator):
        """The runner's Generator with the probes, telling the session where samples start."""

        def generate(self, question, images, until=None, sample_id=0):
            session.begin_sample(sample_id, question, images)
            text = super().generate(question, images, until=until, sample_id=sample_id)
            session.end_sample(text, self.recorder.current)
            return text

    preset = GenPreset(**OmegaConf.to_container(cfg.task.gen, resolve=True))
    return AnalysisGenerator(model, build_pruner(cfg), build_schedule(cfg), preset,
                             position_ids=cfg.prune.get("position_ids", "keep"), seed=int(cfg.seed),
                             probes=session.probes)


def _log_wandb(cfg, out_dir: Path, figures: list[Path], summary: dict) -> str | None:
    """W&B images of the figures (offline files without WANDB_API_KEY); never fails the job."""
    try:
        import wandb
        from omegaconf import OmegaConf

        from dvlm_exp.run.wandb_log import WandbSink

        sink = WandbSink(cfg, OmegaConf.to_container(cfg, resolve=True), out_dir)
        try:
            sink.run.log({f"analysis/{p.stem}": wandb.Image(str(p)) for p in figures})
            sink.run.summary.update({f"analysis/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        finally:
            sink.finish(0)
        return sink.mode
    except Exception as e:  # noqa: BLE001
        print(f"warning: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def summarize(data: dict) -> dict:
    agg = data["aggregate"]
    att = [r for r in agg["attention"] if r["query"] == "answer"]
    conf = agg["confidence"]
    return {
        "n_samples": len(data["samples"]),
        "n_layers": data.get("n_layers"),
        "n_steps": 1 + max((r["step"] for r in att), default=-1),
        "answer_to_visual": _nanmean([r["visual"] for r in att]),
        "answer_to_text": _nanmean([r["text"] for r in att]),
        "answer_to_answer": _nanmean([r["answer"] for r in att]),
        "confidence_first": conf[0]["p_masked"] if conf else None,
        "confidence_last": conf[-1]["p_masked"] if conf else None,
        "kept_fraction_last": agg["kept"][-1]["kept_fraction"] if agg["kept"] else None,
    }


def run(cfg, out_dir: Path) -> dict:
    """scripts/analyze.py: model once, the task's first `limit` documents through lmms-eval (the
    same prompts and images as run.py), the generator with the configured method + schedule and
    the probes; writes tables, JSON and figures into out_dir; returns the summary."""
    from omegaconf import OmegaConf

    opt = options(cfg)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if opt["remake"]:
        data, images = load(Path(opt["remake"]))
        figs = draw_figures(data, out_dir, images, opt["steps"], opt["overlay"], opt["overlay_steps"])
        return {"out": str(out_dir), "remade_from": str(opt["remake"]), **summarize(data),
                "files": sorted(p.name for p in figs)}

    from dvlm_exp.evaluation import judge as judging
    from dvlm_exp.run.build import load_model
    from dvlm_exp.run.runner import evaluate
    from dvlm_exp.run.validate import check

    check(cfg)
    model = load_model(cfg)
    session = AnalysisSession(model, opt["contributions"], opt["contrib_threshold"], keep_images=opt["overlay"])
    gen = _tapped_generator(cfg, model, session)
    res, predictions = evaluate(cfg, gen, predict_only=judging.task_judging(cfg) is not None)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    data = session.to_json(config=config, n_layers=len(model.layers))
    metrics = {k: v for k, v in ((res or {}).get("results", {}).get(cfg.task.lmms_task, {}) or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    data["metrics"] = metrics
    files = write_tables(data, out_dir, session.images, opt["overlay"])
    figs = draw_figures(data, out_dir, session.images, opt["steps"], opt["overlay"], opt["overlay_steps"])
    summary = {"out": str(out_dir), "model": cfg.model.name, "prune": cfg.prune.name, "task": cfg.task.name,
               **summarize(data), "metrics": metrics, "wall_s": round(time.perf_counter() - t0, 2)}
    if cfg.logger.name == "wandb":
        summary["wandb"] = _log_wandb(cfg, out_dir, figs, summary)
    summary["files"] = sorted([p.name for p in files + figs] + ["summary.json"])
    summary = _clean(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(cfg) -> dict | None:
    """Entry of scripts/analyze.py: one `error:` line and exit 2 on bad input, JSON summary last."""
    from hydra.core.hydra_config import HydraConfig

    from dvlm_exp.models.checkpoint import CheckpointError
    from dvlm_exp.errors import ConfigError

    out = options(cfg)["out"] or HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, Path(out))
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    s = _clean(summary)

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"dvlm_exp analysis | samples={s['n_samples']} steps={s['n_steps']} layers={s['n_layers']} "
          f"answer->visual {fmt(s['answer_to_visual'])} text {fmt(s['answer_to_text'])} answer {fmt(s['answer_to_answer'])}",
          flush=True)
    print(f"  files in {s['out']}: {', '.join(s['files'])}", flush=True)
    print(json.dumps(s, default=str), flush=True)
    return s
