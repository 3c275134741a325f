"""One request -> one answer: prompt, vision, masked-diffusion sampling through the engine.

Holds the loaded model, the engine (with method + schedule) and the task's generation preset.
The lmms-eval adapter calls `generate`; tests and benchmarks can too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dvlm_exp.engine import Engine
from dvlm_exp.engine.recorder import Recorder
from dvlm_exp.decoding.sampler import MaskedDiffusionSampler, SamplerConfig


@dataclass
class GenPreset:
    gen_length: int = 32
    block_length: int = 32
    steps: int = 16
    temperature: float = 0.0
    remasking: str = "low_confidence"
    think: str | None = None  # None | "no_think" | "think": suffix appended to the question
    stop: list = field(default_factory=lambda: ["<|eot_id|>"])
    honor_until: bool = False  # also stop on the task's `until` strings (the official wrapper ignores them)
    strip_period: bool = True  # the official wrapper strips one trailing "."
    head_rows: str = "all"  # LM-head rows: all answer slots (official parity) | needed (masked, in block)

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                             temperature=self.temperature, remasking=self.remasking, head_rows=self.head_rows)


def postprocess(text: str, strip_period: bool) -> str:
    """Official LLaDA-V lmms-eval wrapper: decode, drop one trailing '.', strip."""
    if strip_period and text.endswith("."):
        text = text[:-1]
    return text.strip()


class Generator:
    def __init__(self, model, pruner, schedule, preset: GenPreset, position_ids: str = "keep", seed: int = 0,
                 probes=(), sampler_kwargs: dict | None = None, prefix_cache: bool | str = False):
        self.model = model
        self.pruner = pruner
        self.preset = preset
        self.seed = seed
        self.recorder = Recorder()
        if getattr(model, "decoding", "diffusion") == "ar":
            # AR baselines (LLaVA): causal prefill with the method's hooks, then greedy decoding
            # with the pruned KV cache (dvlm_exp/engine/ar.py); gen_length = max_new_tokens
            from dvlm_exp.engine.ar import AREngine, GreedyARSampler

            self.engine = AREngine(model, pruner, schedule, self.recorder, position_ids=position_ids, probes=probes)
            self.sampler = GreedyARSampler(preset.gen_length, model.eos_ids, preset.temperature)
            return
        if prefix_cache:  # LaViDa Prefix-DLM (dvlm_exp/engine/prefix.py): true = cache, "mask_only" = mask, no cache
            from dvlm_exp.engine.prefix import PrefixEngine

            self.engine = PrefixEngine(model, pruner, schedule, self.recorder, position_ids=position_ids,
                                       probes=probes, cache=prefix_cache is True)
        else:
            self.engine = Engine(model, pruner, schedule, self.recorder, position_ids=position_ids, probes=probes)
        # The model picks its sampler (LaViDa-Dream: DreamSampler); model.sampler options go to it.
        sampler_cls = getattr(model, "sampler_class", MaskedDiffusionSampler)
        self.sampler = sampler_cls(preset.sampler_config(), model.banned_ids, **(sampler_kwargs or {}))

    def generate(self, question: str, images: list, until: list[str] | None = None, sample_id: int = 0) -> str:
        p = self.preset
        sample_seed = self.seed * 1_000_003 + int(sample_id)
        torch.manual_seed(sample_seed)
        if hasattr(self.pruner, "reseed"):
            self.pruner.reseed(sample_seed)
        rec = self.recorder.start_sample()
        t0 = time.perf_counter()
        ids = self.model.prompt_ids(question, n_images=len(images), think=p.think)
        # a method acting in the vision path (ToMe in SigLIP, TRIM before the projector) travels
        # with the question into the model's vision path
        tower = {"tower": self.pruner, "question": question} if getattr(self.pruner, "tower_stage", None) else {}
        seq, info = self.model.prepare(ids, images, p.gen_length, **tower)
        rec.n_visual = info["n_visual"]
        rec.vision_views = info.get("views", 0)
        rec.tower(info)  # tower methods: tokens per tower layer, the unpruned visual count
        rec.scoring_flops += int(info.get("method_flops", 0))  # vision-path method overhead (TRIM's text tower)
        stops = list(p.stop) + (list(until) if (until and p.honor_until) else [])
        out_ids, _ = self.sampler.generate(self.engine, seq, self.model.stop_ids(stops))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rec.latency_s = time.perf_counter() - t0
        rec.generated_tokens = len(out_ids)
        rec.output_ids = out_ids
        return postprocess(self.model.decode(out_ids), p.strip_period and getattr(self.model, "strips_period", True))
