"""The lmms-eval adapter: a thin `lmms` subclass turning requests into `Generator` calls.

It carries no pruning logic. The runner passes a ready `Generator`; lmms-eval's own CLI
(`python -m lmms_eval --model dvlm_exp --model_args 'model=tiny,prune=fastv,ratio=0.35'`)
builds one from Hydra overrides given as model_args.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm


class DvlmLMM(lmms):
    is_simple = True

    def __init__(self, generator=None, progress: bool = True, batch_size=1, device=None, **model_args):
        super().__init__()
        if generator is None:
            from dvlm_exp.runner import build_generator, compose_config

            overrides = [f"{k}={v}" for k, v in model_args.items() if k not in ("max_batch_size",)]
            generator = build_generator(compose_config(overrides))
        self.generator = generator
        self.progress = progress
        self.predictions: list[dict] = []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in tqdm(requests, desc="samples", disable=not self.progress, dynamic_ncols=True):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            images = [v for v in visuals if not isinstance(v, str)]
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

    def generate_until_multi_round(self, requests) -> list[str]:
        return self.generate_until(requests)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("dvlm_exp evaluates generation tasks only (loglikelihood is not implemented)")
