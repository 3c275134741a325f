"""Synthetic shape-and-colour VQA: the sandbox task where a few visual tokens matter.

Each image is a small square canvas (112 px = 8 x 8 SigLIP patches of the sandbox model) on a
plain background with four small objects (circle, square, triangle, cross), each inside one
patch cell (so one visual token per view carries it): one or two in colour (half the samples
each; two coloured objects have different colours), the rest grey.

    "What color is the colored shape?"                     -> "blue"
    "What colors are the two colored shapes?"              -> "blue red"   (alphabetical order)

so the answer is readable only from the patches the coloured objects lie in: the rest of the
image (background and distractors) is redundant for the question. A one-colour question needs
one token; a two-colour question needs one token of EACH object, and anyres gives every object
two tokens (base view and tile), so a method that keeps both copies of one object is wrong where
one that keeps one copy of each is right. Attention-based pruning that finds the targets keeps
accuracy; random pruning loses them at low keep ratios; at a few kept tokens methods differ.

`make_sample(split_seed, index)` is pure (a `random.Random` seeded per sample), so the training
stream (`scripts/train_tiny.py`, split "train") and the held-out evaluation set (split "test",
a different seed stream) never share a sample. The evaluation folder is a
`DatasetDict({"test": ...}).save_to_disk` written atomically by `ensure` (dvlm_exp/evaluation/data/publish.py);
lmms-eval reads it through dvlm_exp/tasks/synth_shapes/.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from dvlm_exp.evaluation.data import publish

GENERATOR_ID = "dvlm_exp.data.synth_shapes"  # an identity (seeds, data metadata): the module's path when it was made, kept
GENERATOR_VERSION = "2"
TASK_NAME = "synth_shapes"
SPLIT = "test"
SIZE = 112            # canvas side (the sandbox tower sees 112 px views: 8 x 8 patches of 14 px)
CELL = 14             # one SigLIP patch; every object lies inside one cell
GRID = SIZE // CELL
N_OBJECTS = 4
OBJ_MIN, OBJ_MAX = 10, 13  # object side in pixels
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (150, 60, 190), "orange": (245, 130, 20)}
BACKGROUNDS = ((235, 235, 235), (225, 230, 240), (240, 232, 220))
GREY = (90, 170)      # distractors: grey shapes
POST_PROMPT = "\nAnswer with the color names only, in alphabetical order."
# Shape questions ("Which shape is colored?") were tried: a 4-layer model trained for 20 min
# on 2 CPU cores did not learn one-patch shape recognition (held-out accuracy stalled at ~0.6).
QUESTIONS = ("What color is the colored shape?", "What is the color of the colored object?")
QUESTIONS_TWO = ("What colors are the two colored shapes?", "What are the colors of the two colored objects?")
# Seed streams: the held-out set and the training stream never overlap.
STREAMS = {"test": 0, "train": 1}


def _rng(stream: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{GENERATOR_ID}/{STREAMS[stream]}/{int(seed)}/{int(index)}")


def make_spec(stream: str, seed: int, index: int, n_objects: int = N_OBJECTS, scale: int = 1) -> dict:
    """Everything random about one sample: objects (shape, colour, box), which are coloured
    (`targets`: one or two, half the samples each; one where `n_objects` is 1) and the question.
    `n_objects` < 4 and `scale` > 1 (objects `scale` x `scale` patches large, in cells of that
    size) only for training's curriculum; the task always has 4 one-patch objects."""
    if not 1 <= n_objects <= len(SHAPES) or scale not in (1, 2, 4):
        raise ValueError(f"need n_objects in [1, {len(SHAPES)}] and scale in (1, 2, 4), got {n_objects}, {scale}")
    grid, cell = GRID // scale, CELL * scale
    if n_objects > grid * grid:
        raise ValueError(f"{n_objects} objects do not fit a {grid} x {grid} grid")
    rng = _rng(stream, seed, index)
    shapes = list(SHAPES)
    rng.shuffle(shapes)
    n_colored = 1 if n_objects == 1 else rng.choice((1, 2))
    targets = sorted(rng.sample(range(n_objects), n_colored))
    colors = rng.sample(sorted(COLORS), n_colored)
    objects = []
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n_objects)
    for i, ((r, c), shape) in enumerate(zip(cells, shapes)):
        s = rng.randint(OBJ_MIN, OBJ_MAX) * scale
        x, y = c * cell + rng.randint(0, cell - s), r * cell + rng.randint(0, cell - s)
        color = colors[targets.index(i)] if i in targets else None
        grey = rng.randint(*GREY)
        objects.append({"shape": shape, "color": color, "grey": grey, "box": [x, y, x + s, y + s]})
    question = rng.choice(QUESTIONS if n_colored == 1 else QUESTIONS_TWO)
    answer = " ".join(sorted(objects[t]["color"] for t in targets))
    return {"objects": objects, "targets": targets, "question": question, "answer": answer,
            "background": list(rng.choice(BACKGROUNDS))}


def render(spec: dict) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), tuple(spec["background"]))
    d = ImageDraw.Draw(img)
    for o in spec["objects"]:
        x0, y0, x1, y1 = o["box"]
        c = COLORS[o["color"]] if o["color"] else (o["grey"],) * 3
        if o["shape"] == "circle":
            d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=c)
        elif o["shape"] == "square":
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=c)
        elif o["shape"] == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=c)
        else:  # cross
            w = max(3, (x1 - x0) // 3)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            d.rectangle((x0, cy - w // 2, x1 - 1, cy - w // 2 + w - 1), fill=c)
            d.rectangle((cx - w // 2, y0, cx - w // 2 + w - 1, y1 - 1), fill=c)
    return img


def make_sample(stream: str, seed: int, index: int, n_objects: int = N_OBJECTS, scale: int = 1) -> dict:
    spec = make_spec(stream, seed, index, n_objects, scale)
    return {"question_id": f"{stream}-{seed}-{index}", "question": spec["question"], "answer": spec["answer"],
            "image": render(spec), "meta": json.dumps(spec, sort_keys=True)}


def doc_text(question: str) -> str:
    """The prompt text the model sees (the lmms-eval task's doc_to_text; training uses the same)."""
    return question + POST_PROMPT


def normalize(text: str) -> str:
    """Prediction -> answer form for exact match: lower case, no punctuation, no "and", words
    joined by one space ("Blue, red." -> "blue red"). Order is kept: the answer is alphabetical."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return " ".join(w for w in words if w != "and")


def target_patches(spec: dict, patch: int = 14) -> list[tuple[int, int]]:
    """(row, col) of the patches the coloured objects' boxes touch, on the SIZE x SIZE view."""
    return sorted({rc for t in spec["targets"] for rc in object_patches(spec, t, patch)})


def object_patches(spec: dict, i: int, patch: int = 14) -> list[tuple[int, int]]:
    """(row, col) of the patches object `i`'s box touches, on the SIZE x SIZE view."""
    x0, y0, x1, y1 = spec["objects"][i]["box"]
    return [(r, c) for r in range(y0 // patch, (y1 - 1) // patch + 1) for c in range(x0 // patch, (x1 - 1) // patch + 1)]


def _expected(n: int, seed: int) -> dict:
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "n": n, "seed": seed, "split": SPLIT,
            "task": TASK_NAME}


def _build(tmp_dir: Path, n: int, seed: int) -> None:
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    rows = [make_sample("test", seed, i) for i in range(n)]
    for r in rows:
        buf = io.BytesIO()
        r["image"].save(buf, format="PNG")
        r["image"] = {"bytes": buf.getvalue(), "path": None}
    feats = Features({"question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
                      "image": ImageFeature(), "meta": Value("string")})
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in feats}, features=feats, split=SPLIT)
    DatasetDict({SPLIT: ds}).save_to_disk(str(tmp_dir))


def is_complete(out_dir: str | Path, n: int | None = None, seed: int | None = None) -> bool:
    exp = {k: v for k, v in _expected(n, seed).items() if v is not None}
    return publish.is_complete(out_dir, exp)


def ensure(out_dir: str | Path, n: int = 64, seed: int = 0) -> Path:
    """The held-out evaluation set for (n, seed) at out_dir, written once (atomically) and reused."""
    if n < 1 or seed < 0:
        raise ValueError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    return publish.publish(out_dir, _expected(n, seed), lambda tmp: _build(tmp, n, seed))


def task_entry(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir).expanduser().resolve()
    if not is_complete(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a complete {TASK_NAME} dataset (generator v{GENERATOR_VERSION}); "
                                f"re-create it with dvlm_exp.evaluation.data.synth_shapes.ensure('{data_dir}', n, seed)")
    return {"task": TASK_NAME, "dataset_path": str(data_dir)}
