"""The lmms-eval adapter: a thin `lmms` subclass turning requests into `Generator` calls.

It carries no pruning logic. The runner passes a ready `Generator`; lmms-eval's own CLI
(`python -m lmms_eval --model dvlm_exp --model_args 'model=tiny,prune=fastv,ratio=0.35'`)
builds one from Hydra overrides given as model_args (and, for the project's synthetic tasks,
fills in their generated dataset folder: `dvlm_exp.evaluation.lmms_plugin.fill_synthetic_tasks`). There the
generation preset follows the task evaluated (`lmms_plugin.task_config`): the model loads on the
first `generate_until`, when the tasks are known, after their preset is settled; tasks whose
presets differ are refused (one lmms_eval call per preset), before any weight loads.

lmms-eval's output carries the record (lmms-eval 0.7.3's own channels for model metrics):
each answer is a `GenerationResult` with `TokenCounts` (input = prompt tokens with every visual
token, output = generated tokens: the samples' `token_counts` and results["efficiency"]), and each
sample's numbers go to `gen_metrics.log_metrics` (results["throughput"]: avg_flops,
avg_flops_baseline, avg_flops_reduction, avg_visual_tokens, avg_visual_kept, avg_nfe, avg_latency_s,
the preset's avg_gen_length / avg_block_length / avg_steps / avg_temperature and
`avg_preset=<name>` = 1.0 for the conf/task preset used).

Visuals: PIL images go to the model as images; strings (lmms-eval video tasks give absolute
mp4 paths) are videos: `max_frames_num` frames are sampled uniformly (the official LLaDA-V
wrapper's rule and default, 32; model_arg `max_frames_num=N` or the model's
`video_max_frames` overrides it) and passed on as `VideoClip`s.
"""

from __future__ import annotations

import sys

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from tqdm import tqdm

from dvlm_exp.run.distributed import collective_device, is_padding


class DvlmLMM(lmms):
    is_simple = True

    def __init__(self, generator=None, progress: bool = True, batch_size=1, device=None,
                 max_frames_num: int | None = None, **model_args):
        super().__init__()
        self.max_frames_num = int(max_frames_num) if max_frames_num is not None else None
        self.overrides = None
        self.preset_names: dict[str, str] = {}  # lmms-eval task -> conf/task preset (CLI path: settled in _build)
        if generator is None:  # lmms-eval's CLI: model_args are run.py overrides; the model loads once tasks are known
            from dvlm_exp.evaluation.lmms_plugin import fill_synthetic_tasks

            self.overrides = [f"{k}={v}" for k, v in model_args.items() if k not in ("max_batch_size",)]
            fill_synthetic_tasks(self.overrides)  # generated data for the synthetic tasks' placeholder paths
        self.generator = generator
        self.progress = progress
        self.predictions: list[dict] = []

    def _build(self, tasks: list[str]) -> None:
        """lmms-eval CLI: the config of the evaluated tasks' one generation preset, then the model.
        Bad input (no preset, conflicting presets, a bad override) ends the process with `error:`
        and exit code 2 before any weight loads (lmms-eval's CLI would log an Exception and exit 0)."""
        import json
        from dataclasses import asdict

        from omegaconf import OmegaConf

        from dvlm_exp.decoding.generator import GenPreset
        from dvlm_exp.evaluation.lmms_plugin import PresetError, task_config
        from dvlm_exp.models.checkpoint import CheckpointError
        from dvlm_exp.run.build import build_generator
        from dvlm_exp.errors import ConfigError
        from dvlm_exp.run.validate import check

        try:
            cfgs = {t: task_config(t, self.overrides) for t in tasks}
            for c in cfgs.values():
                check(c)
            # the settings the generator would run (GenPreset's defaults fill keys a preset leaves out)
            gens = {t: asdict(GenPreset(**OmegaConf.to_container(c.task.gen, resolve=True))) for t, c in cfgs.items()}
            if len({json.dumps(g, sort_keys=True) for g in gens.values()}) > 1:
                keys = sorted({k for g in gens.values() for k in g if any(h.get(k) != g.get(k) for h in gens.values())})
                lines = "; ".join(f"{t}: task={cfgs[t].task.name} " + " ".join(f"{k}={gens[t].get(k)}" for k in keys)
                                  for t in tasks)
                raise PresetError(f"--tasks {','.join(tasks)} need different generation presets ({lines}): "
                                  f"run one lmms_eval per preset")
        except (PresetError, ConfigError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from e
        cfg = cfgs[tasks[0]]
        self.preset_names = {t: str(c.task.name) for t, c in cfgs.items()}
        if self.max_frames_num is None and (cfg.task.get("video") or {}).get("max_frames"):
            self.max_frames_num = int(cfg.task.video.max_frames)  # the preset's task.video.max_frames
        self.generator = build_generator(cfg)

    def _log(self, task: str, rec) -> None:
        """One sample's record into lmms-eval's throughput metrics (results["throughput"]); FLOPs in the
        `exact` convention of results.json (dvlm_exp.reporting.flops.sample_flops)."""
        from dvlm_exp.reporting import flops

        p = self.generator.preset
        f = flops.sample_flops(rec, self.generator.model.dims())
        kept = rec.visual_kept[-1] if rec.visual_kept else 0  # seen by the last layer call (runner.build_record)
        if task not in self.preset_names:  # the runner's path: the preset of its task
            from dvlm_exp.evaluation.lmms_plugin import lmms_task_presets

            self.preset_names[task] = lmms_task_presets().get(task, (task,))[0]
        preset = self.preset_names[task]
        log_metrics(total_elapsed_time=rec.latency_s, total_gen_tokens=rec.generated_tokens,
                    avg_speed=rec.generated_tokens / rec.latency_s if rec.latency_s else 0.0,
                    additional_metrics={
                        "total_requests": 1, "flops": f["total"], "flops_baseline": f["baseline_total"],
                        "flops_reduction": 1.0 - f["total"] / f["baseline_total"] if f["baseline_total"] else 0.0,
                        "visual_tokens": rec.n_visual, "visual_kept": kept,
                        "visual_layer_avg": sum(rec.visual_kept) / len(rec.visual_kept) if rec.visual_kept else 0.0,
                        "nfe": rec.n_forwards, "latency_s": rec.latency_s, "gen_length": p.gen_length,
                        "block_length": p.block_length, "steps": p.steps, "temperature": p.temperature,
                        f"preset={preset}": 1.0})

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        if self.generator is None:
            self._build(sorted({req.args[4] for req in requests}))
        out = []
        for req in tqdm(requests, desc="samples", disable=not self.progress or self.rank != 0, dynamic_ncols=True):
            if is_padding(req):  # lmms-eval's filler for a shorter shard: its response is dropped
                out.append(GenerationResult(text=""))
                continue
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            images = self.load_visuals(visuals, where=f"{task} doc_id={doc_id}")
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            text = self.generator.generate(ctx, images, until=until, sample_id=doc_id)
            rec = self.generator.recorder.current
            self.predictions.append({"task": task, "doc_id": doc_id, "prediction": text,
                                     "n_visual": rec.n_visual, "latency_s": rec.latency_s,
                                     "nfe": rec.n_forwards})
            self._log(task, rec)
            # input: the full prompt (text + every visual token) = the unpruned forward's length less the answer slots
            full = max(rec.baseline_forwards) if rec.baseline_forwards else None
            out.append(GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=full - self.generator.preset.gen_length if full else None,
                output_tokens=rec.generated_tokens)))
        return out

    @property
    def device(self) -> str:
        return collective_device()  # lmms-eval's torchrun path puts its collectives' tensors here

    def video_max_frames(self) -> int:
        from dvlm_exp.models.llada_v import OFFICIAL_MAX_FRAMES_NUM

        if self.max_frames_num is not None:
            return self.max_frames_num
        return int(getattr(self.generator.model, "video_max_frames", OFFICIAL_MAX_FRAMES_NUM))

    def load_visuals(self, visuals, where: str = "") -> list:
        """PIL images stay images; string visuals (video paths) become sampled `VideoClip`s.
        A visual that cannot be decoded is an error naming the sample, never a silent skip."""
        from dvlm_exp.models.llada_v import VideoClip, load_video_frames

        out = []
        for v in visuals or []:
            try:
                if isinstance(v, str):
                    out.append(VideoClip(load_video_frames(v, self.video_max_frames()), path=v))
                else:
                    v.load()  # PIL decodes lazily: surface a broken file here, with its sample
                    out.append(v)
            except (OSError, ValueError, SyntaxError) as e:
                raise ValueError(f"{where}: visual could not be decoded ({type(e).__name__}: {e}); "
                                 f"check or re-create the dataset files") from e
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        return self.generate_until(requests)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("dvlm_exp evaluates generation tasks only (loglikelihood is not implemented)")
