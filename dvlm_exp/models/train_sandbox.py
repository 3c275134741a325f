"""Train the sandbox: a tiny LLaDA-V-shaped diffusion VLM that actually answers questions.

    python scripts/train_tiny.py                          # ~10 min on 2 CPU cores -> dvlm_exp/assets/sandbox
    python scripts/train_tiny.py --steps 20 --out /tmp/sb # smoke run

Same architecture and loading path as `model=tiny` (dvlm_exp/models/tiny.py: LLaMA-style
bidirectional decoder layers, SigLIP tower, mlp2x_gelu projector, anyres_max_4 tiling with
image_newline), smaller views (112 px = 8 x 8 patches, 136 visual tokens per image) and a
compact LLaDA tokenizer (the official special tokens after a 512-entry BPE).

Objective: LLaDA's masked-diffusion SFT corruption with a flat weighting. Per sample
t ~ U(eps, 1]; every response slot (the answer token, then <|eot_id|> padding up to the preset's
gen_length, as LLaDA pads with its end token) is masked with probability t (at least one);
the prompt (system + user turn with the image) is never masked. Loss = mean CE over the masked
slots. LLaDA's ELBO weights each masked slot by 1/t: with batches of 16 and 4 slots those
weights (up to 1/eps) made the gradient heavy-tailed and clipping froze learning, so the
weighting is flat (same minimiser: the true posterior at every mask pattern).

Data: dvlm_exp/evaluation/data/synth_shapes.py, the "train" seed stream (the held-out task uses the "test"
stream): 112-px canvases with four small objects (circle, square, triangle, cross), one in colour
and three grey; "What color is the colored shape?", so one visual token per view matters and the
rest are redundant. Curriculum (`CURRICULUM`): during the
first `--curriculum` fraction of the steps, images hold fewer and larger objects (4 x 4 patches
alone, then 2, then 2 x 2 patches, ...), with a quarter of the samples from the task itself;
then only the task's four one-patch objects. From scratch, finding the one token that matters
among 136 is otherwise too slow to learn on a CPU budget.

Two choices make pruning matter (see freeze_tower_attention and Batcher._shorten): the tower is
patch-local (its attention output held at zero), so only the coloured object's two tokens (base
view and tile) carry the answer; and half the batches see a random subset of the visual tokens
(every object's kept, positions consecutive), so renumbering methods are not punished for the
positions alone.

Deterministic under `--seed` for a given `--threads` (default 2). Prints a JSON line per eval
(loss, held-out accuracy of the first answer slot), saves the checkpoint in the official
layout (safetensors + config + tokenizer, written atomically), the training curve as
<out>/train_curve.json and train_curve.png, and a last JSON line with the final held-out
accuracy through the real generator (dvlm_exp.decoding.generator.Generator, the task's preset).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout

import torch
import torch.nn.functional as F
from dvlm_exp.evaluation.data import synth_shapes
from dvlm_exp.models import llava_image
from dvlm_exp.models.llada_v import IMAGE_TOKEN_INDEX
from dvlm_exp.models.sandbox import GEN_PRESET, SANDBOX_PATH, SANDBOX_SPEC
from dvlm_exp.models.tiny import build_model, write_checkpoint
from dvlm_exp.models.tokenizer_tiny import build_llada_tokenizer, special_ids_from_tokenizer


def build_tokenizer(out_dir: Path, seed: int):
    from transformers import PreTrainedTokenizerFast

    words = list(synth_shapes.SHAPES) + list(synth_shapes.COLORS)
    corpus = [synth_shapes.doc_text(synth_shapes.make_spec("train", seed, i)["question"]) for i in range(300)] * 3
    corpus += words * 200  # answers as single tokens
    colors = sorted(synth_shapes.COLORS)
    corpus += [f"{a} {b}" for a in colors for b in colors if a < b] * 40  # two-colour answers: " red" etc.
    build_llada_tokenizer(out_dir, vocab_size=10**6, bpe_vocab=512, corpus=corpus, seed=seed, compact=True)
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


class Batcher:
    """Training samples of one prompt length per batch (no padding inside the bidirectional
    attention), drawn in order from the train stream; deterministic."""

    def __init__(self, model, seed: int, batch: int, gen_length: int, drop_prob: float = 0.0):
        self.model, self.seed, self.batch, self.gen_length = model, seed, batch, gen_length
        self.drop_prob = drop_prob
        self.index = 0
        self.stage = (synth_shapes.N_OBJECTS, 1)
        self.queues: dict[int, list] = {}

    def _one(self):
        n_obj, scale = self.stage
        if n_obj != synth_shapes.N_OBJECTS or scale != 1:  # curriculum: a quarter of the task itself
            if random.Random(f"mix/{self.seed}/{self.index}").random() < 0.25:
                n_obj, scale = synth_shapes.N_OBJECTS, 1
        s = synth_shapes.make_sample("train", self.seed, self.index, n_obj, scale)
        spec = json.loads(s["meta"])
        self.index += 1
        ids = self.model.prompt_ids(synth_shapes.doc_text(s["question"]), n_images=1)
        ans = self.model.tokenizer.encode(s["answer"], add_special_tokens=False)
        eot = self.model.special_ids["eot"]
        if len(ans) >= self.gen_length:
            raise ValueError(f"answer {s['answer']!r} takes {len(ans)} tokens: no room for <|eot_id|> in {self.gen_length}")
        resp = (ans + [eot] * self.gen_length)[: self.gen_length]
        objects = sorted({tok for i in range(len(spec["objects"]))
                          for tok in packed_indices(synth_shapes.object_patches(spec, i))})
        return ids, s["image"], resp, objects

    def next(self):
        while True:
            ids, img, resp, objects = self._one()
            q = self.queues.setdefault(len(ids), [])
            q.append((ids, img, resp, objects))
            if len(q) == self.batch:
                self.queues[len(ids)] = []
                return self._shorten(q)

    def _shorten(self, items):
        """With probability `drop_prob`, the batch sees the image through fewer visual tokens:
        a random number of them (the same for the batch), every token on an object kept, the
        rest a random subset, in order, with consecutive positions. Real LLaDA-V sees images of
        many sizes (hundreds to thousands of visual tokens); without this the sandbox sees one
        layout only and any method that renumbers positions (RedVTP, DivPrune, ToMe) moves the
        answer slots to distances from the prompt it never saw. Which tokens a method keeps is
        still what decides: the question is answerable only from the coloured object's tokens."""
        rng = random.Random(f"shorten/{self.seed}/{self.index}")
        if rng.random() >= self.drop_prob:
            return [(ids, img, resp, None) for ids, img, resp, _ in items]
        need = max(len(o) for *_, o in items)
        n_keep = rng.randint(need, N_VISUAL)
        out = []
        for ids, img, resp, objects in items:
            on_object = set(objects)
            rest = [i for i in range(N_VISUAL) if i not in on_object]
            keep = sorted(objects + rng.sample(rest, n_keep - len(objects)))
            out.append((ids, img, resp, keep))
        return out


# Visual tokens of one SIZE x SIZE image in the packed order (anyres_max_4 at the sandbox's 112 px):
# the base view's 8 x 8 patches, then the one tile's 8 rows of 8 patches + image_newline.
_SIDE = synth_shapes.SIZE // 14
N_VISUAL = _SIDE * _SIDE + _SIDE * (_SIDE + 1)


def packed_indices(patches) -> list[int]:
    """(row, col) patches of the canvas -> their indices in the packed visual block (both views)."""
    return sorted({r * _SIDE + c for r, c in patches} | {_SIDE * _SIDE + r * (_SIDE + 1) + c for r, c in patches})


# (objects, scale) by fraction of the curriculum done: finding one token among 136 from scratch
# is slow, so objects start 4 x 4 patches large and alone, and shrink to the task's one patch.
CURRICULUM = ((0.25, (1, 4)), (0.45, (2, 4)), (0.65, (2, 2)), (0.85, (4, 2)), (1.0, (3, 1)))


def curriculum_stage(frac: float) -> tuple[int, int]:
    for end, stage in CURRICULUM:
        if frac < end:
            return stage
    return (synth_shapes.N_OBJECTS, 1)


def freeze_tower_attention(model) -> None:
    """Hold every SigLIP layer's attention output projection at zero (not trained): the tower
    is then patch-local (embedding, position, per-token MLPs), and what a visual token carries
    at the LLM's input is its own patch. With attention on, the tower learns to copy the one
    coloured object into every patch (one layer suffices), and random pruning at any layer
    is then as good as any other: nothing left for a pruning method to find. The weights are
    still there, in the official layout, and the loader runs the tower's attention as always."""
    for layer in model.vision_tower.encoder.layers:
        for p in layer.self_attn.out_proj.parameters():
            torch.nn.init.zeros_(p)
            p.requires_grad_(False)


def prompt_embeds(model, items, grad: bool):
    """[B, P, d] prompt embeddings (text + anyres visual tokens), differentiable."""
    m = model
    px, sizes = zip(*(llava_image.process_image(img, m.grid_pinpoints, m.image_size) for _, img, *_ in items))
    v = px[0].shape[0]
    with torch.set_grad_enabled(grad):
        feats = m.project_views(torch.cat(px))
        out = []
        for i, (ids, _, _, keep) in enumerate(items):
            packed, _ = llava_image.pack_image_features(
                feats[i * v:(i + 1) * v], sizes[i], m.grid_pinpoints, image_size=m.image_size,
                patches_per_side=m.patches_per_side, newline=m.image_newline, max_tiles=m.max_tiles)
            assert packed.shape[0] == N_VISUAL, packed.shape
            if keep is not None:
                packed = packed[keep]
            cut = ids.index(IMAGE_TOKEN_INDEX)
            pre = m.embed_tokens(torch.tensor(ids[:cut]))
            post = m.embed_tokens(torch.tensor(ids[cut + 1:]))
            out.append(torch.cat([pre, packed, post]))
        return torch.stack(out)


def run_layers(model, x):
    pos = torch.arange(x.shape[1])[None]
    cos_sin = model.rotary_emb(x, pos)
    for layer in model.layers:
        x = layer(x, attention_mask=None, position_embeddings=cos_sin)
    return model.norm(x)


def diffusion_loss(model, items, gen: torch.Generator, eps: float = 1e-3):
    B, L = len(items), len(items[0][2])
    resp = torch.tensor([r for _, _, r, _ in items])
    t = (1 - eps) * torch.rand(B, generator=gen) + eps
    mask = torch.rand(B, L, generator=gen) < t[:, None]
    none = ~mask.any(1)
    if none.any():  # at least one masked slot per sample
        mask[none, torch.randint(L, (int(none.sum()),), generator=gen)] = True
    resp_in = torch.where(mask, torch.full_like(resp, model.mask_id), resp)
    x = torch.cat([prompt_embeds(model, items, grad=True), model.embed_tokens(resp_in)], dim=1)
    h = run_layers(model, x)[:, -L:]
    logits = model.lm_head(h[mask]).float()
    return F.cross_entropy(logits, resp[mask])


@torch.no_grad()
def slot_accuracy(model, samples, gen_length: int) -> float:
    """Held-out accuracy of the first answer slot with every slot masked (a cheap curve; the
    final number comes from the real generator)."""
    hits = 0
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        for it in chunk:
            x = torch.cat([prompt_embeds(model, [(*it, None)], grad=False),
                           model.embed_tokens(torch.full((1, gen_length), model.mask_id))], dim=1)
            logits = model.lm_head(run_layers(model, x)[:, -gen_length])
            hits += int(logits.argmax(-1).item() == it[2][0])
    return hits / len(samples)


def generator_accuracy(path: Path, n: int, seed: int) -> float:
    """Held-out accuracy through the runner's path: load the saved checkpoint, Generator with the
    sandbox preset, exact match after postprocessing (the lmms-eval task's metric)."""
    from dvlm_exp.decoding.generator import Generator, GenPreset
    from dvlm_exp.models.llada_v import LLaDAV
    from dvlm_exp.pruning.none import NoPruning
    from dvlm_exp.schedules.first_step import FirstStep

    model = LLaDAV.from_pretrained(path)
    g = Generator(model, NoPruning(), FirstStep(), GenPreset(**GEN_PRESET), seed=seed)
    hits = 0
    for i in range(n):
        s = synth_shapes.make_sample("test", 0, i)
        pred = g.generate(synth_shapes.doc_text(s["question"]), [s["image"]], sample_id=i)
        hits += int(synth_shapes.normalize(pred) == s["answer"])
    return hits / n


def plot(curve: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["loss"] for c in curve], label="train loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [c["heldout_slot_acc"] for c in curve], color="C1", label="held-out first-slot accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("accuracy")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / SANDBOX_PATH)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--curriculum", type=float, default=0.5,
                    help="fraction of the steps spent on easier images (fewer, larger objects) before the task's")
    ap.add_argument("--drop-prob", type=float, default=0.5,
                    help="fraction of batches that see fewer visual tokens (every object token kept; see Batcher)")
    ap.add_argument("--tower-attention", choices=("off", "on"), default="off",
                    help="off: the SigLIP layers' attention output is held at zero, so a visual token carries only "
                         "its own patch (see freeze_tower_attention)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=128, help="held-out samples for the curve")
    ap.add_argument("--final-n", type=int, default=200, help="held-out samples through the generator at the end")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen_length = GEN_PRESET["gen_length"]
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="train_tiny_"))
    try:
        tok = build_tokenizer(work / "tokenizer", args.seed)
        spec = {**SANDBOX_SPEC, "vocab_size": len(tok)}
        model = build_model(spec, seed=args.seed, init="train")
        with torch.no_grad():
            model.embed_tokens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(args.seed))
        model.tokenizer, model.special_ids = tok, special_ids_from_tokenizer(tok)
        if args.tower_attention == "off":
            freeze_tower_attention(model)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

        def lr_at(step):
            if step < args.warmup:
                return (step + 1) / args.warmup
            frac = (step - args.warmup) / max(1, args.steps - args.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        batcher = Batcher(model, args.seed, args.batch, gen_length, args.drop_prob)
        mask_gen = torch.Generator().manual_seed(args.seed + 1)
        heldout = []
        for i in range(args.eval_n):
            s = synth_shapes.make_sample("test", 0, 10_000 + i)  # not the task's first samples
            ids = model.prompt_ids(synth_shapes.doc_text(s["question"]), n_images=1)
            heldout.append((ids, s["image"], tok.encode(s["answer"], add_special_tokens=False)))
        print(json.dumps({"params": n_params, "spec": spec, "steps": args.steps, "batch": args.batch}), flush=True)
        curve, ema = [], None
        for step in range(args.steps):
            batcher.stage = curriculum_stage(step / max(1, args.curriculum * args.steps))
            loss = diffusion_loss(model, batcher.next(), mask_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                model.eval()
                acc = slot_accuracy(model, heldout, gen_length)
                model.train()
                row = {"step": step + 1, "loss": round(ema, 4), "heldout_slot_acc": round(acc, 4),
                       "lr": round(sched.get_last_lr()[0], 6), "elapsed_s": round(time.perf_counter() - t_start, 1)}
                curve.append(row)
                print(json.dumps(row), flush=True)
        model.eval()
        meta = {"trained": {"script": "scripts/train_tiny.py", "steps": args.steps, "batch": args.batch, "lr": args.lr,
                            "seed": args.seed, "drop_prob": args.drop_prob,
                            "tower_attention": args.tower_attention, "task": "synth_shapes (train stream)", "gen_length": gen_length}}
        out = write_checkpoint(args.out, spec, seed=args.seed, model=model, tokenizer_dir=work / "tokenizer", meta=meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train_s = time.perf_counter() - t_start
    (out / "train_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    plot(curve, out / "train_curve.png")
    acc = generator_accuracy(out, args.final_n, args.seed)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"out": str(out), "train_s": round(train_s, 1), "heldout_accuracy": acc, "heldout_n": args.final_n,
                      "checkpoint_bytes": size, "params": n_params}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
