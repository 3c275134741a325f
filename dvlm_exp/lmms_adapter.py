"""The lmms-eval adapter: a thin `lmms` subclass turning requests into `Generator` calls.

It carries no pruning logic. The runner passes a ready `Generator`; lmms-eval's own CLI
(`python -m lmms_eval --model dvlm_exp --model_args 'model=tiny,prune=fastv,ratio=0.35'`)
builds one from Hydra overrides given as model_args (and, for the project's synthetic tasks,
fills in their generated dataset folder: `dvlm_exp.lmms_plugin.fill_synthetic_tasks`).

Visuals: PIL images go to the model as images; strings (lmms-eval video tasks give absolute
mp4 paths) are videos: `max_frames_num` frames are sampled uniformly (the official LLaDA-V
wrapper's rule and default, 32; model_arg `max_frames_num=N` or the model's
`video_max_frames` overrides it) and passed on as `VideoClip`s.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from dvlm_exp.distributed import collective_device, is_padding


class DvlmLMM(lmms):
    is_simple = True

    def __init__(self, generator=None, progress: bool = True, batch_size=1, device=None,
                 max_frames_num: int | None = None, **model_args):
        super().__init__()
        self.max_frames_num = int(max_frames_num) if max_frames_num is not None else None
        if generator is None:
            from dvlm_exp.lmms_plugin import fill_synthetic_tasks
            from dvlm_exp.runner import build_generator, compose_config

            overrides = [f"{k}={v}" for k, v in model_args.items() if k not in ("max_batch_size",)]
            cfg = compose_config(overrides)
            generator = build_generator(cfg)
            if self.max_frames_num is None and (cfg.task.get("video") or {}).get("max_frames"):
                self.max_frames_num = int(cfg.task.video.max_frames)  # the preset's task.video.max_frames
            fill_synthetic_tasks(cfg)  # lmms-eval CLI: generated data for the synthetic tasks' placeholder paths
        self.generator = generator
        self.progress = progress
        self.predictions: list[dict] = []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in tqdm(requests, desc="samples", disable=not self.progress or self.rank != 0, dynamic_ncols=True):
            if is_padding(req):  # lmms-eval's filler for a shorter shard: its response is dropped
                out.append("")
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
            out.append(text)
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
