"""Synthetic, offline document-VQA data for the ``synth_docvqa`` lmms-eval task.

Each sample is a small RGB "document" rendered with PIL: a white page with a title,
a sender line, distractor text and rules, several key/value fields
("INVOICE NO: 4821", "DATE: 12/03/2021", ...) and sometimes a short code in a
coloured box.  One rendered field is the target of the question; its value is the
answer, readable from the image.

The dataset is written with ``DatasetDict({"validation": ds}).save_to_disk(out_dir)``
using DocVQA field names (``questionId, question, answers, image, docId``), so that
lmms-eval's DocVQA helpers and the ``anls`` metric apply unchanged.  An extra string
column ``render_meta`` holds the JSON layout (field boxes) used for checks.

Generation is split in two pure steps, so tests can re-render a page:

* :func:`make_spec` draws everything random (texts, colours, positions) from a
  ``random.Random`` seeded by ``(seed, index)``;
* :func:`render` turns a spec into a PIL image and the bounding box of every field
  value, with no randomness.

Same ``seed`` and ``n`` give a byte-identical dataset folder (on one machine: the
glyph rasterisation comes from the local FreeType).  Writing is atomic: the folder is
built next to ``out_dir`` and renamed into place, with ``dvlm_meta.json`` (generator
version, n, seed, file sizes) written last inside it, so that :func:`is_complete` can
tell a finished, matching dataset from anything else.

Evaluation: pass ``{"task": "synth_docvqa", "dataset_path": str(out_dir)}`` (see
:func:`task_entry`) to ``simple_evaluate`` with
``TaskManager(include_path=<dvlm_exp/tasks>, include_defaults=False)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dvlm_exp.evaluation.data import publish

__all__ = [
    "GENERATOR_VERSION",
    "TASK_NAME",
    "SPLIT",
    "META_FILE",
    "PAGE_SIZES",
    "make_spec",
    "render",
    "make_sample",
    "generate",
    "ensure",
    "is_complete",
    "read_meta",
    "check_dataset",
    "task_entry",
]

GENERATOR_VERSION = "1"
TASK_NAME = "synth_docvqa"
SPLIT = "validation"
META_FILE = publish.META_FILE
GENERATOR_ID = "dvlm_exp.data.synth_docvqa"  # an identity (seeds, data metadata): the module's path when it was made, kept

# (width, height) in pixels; chosen per sample by the RNG.
PAGE_SIZES: tuple[tuple[int, int], ...] = ((384, 384), (512, 384), (384, 512))

MARGIN = 20
# Font sizes (pixels) and the vertical advance of each block type.
TITLE_SIZE, TITLE_ADVANCE = 26, 38
SENDER_SIZE, SENDER_ADVANCE = 14, 24
FIELD_SIZE, FIELD_ADVANCE = 20, 30
TEXT_SIZE, TEXT_LINE_ADVANCE, TEXT_GAP = 13, 17, 8
BOX_SIZE, BOX_ADVANCE, BOX_PAD = 22, 54, 10
RULE_ADVANCE = 12

WHITE = (255, 255, 255)
INK = (20, 20, 20)
GREY = (120, 120, 120)
LIGHT_GREY = (200, 200, 200)
BOX_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 55, 55),
    "blue": (55, 95, 215),
    "green": (40, 150, 70),
    "orange": (240, 150, 40),
    "yellow": (245, 215, 60),
}
DARK_TEXT_BOXES = {"orange", "yellow"}  # black text on these, white on the others

TITLES = ("INVOICE", "RECEIPT", "PURCHASE ORDER", "STATEMENT", "DELIVERY NOTE", "QUOTATION")
COMPANY_A = ("Acme", "Northwind", "Bluebird", "Granite", "Silverline", "Oakridge", "Harbor", "Maple")
COMPANY_B = ("Supplies", "Logistics", "Traders", "Industries", "Services", "Holdings", "Works")
COMPANY_C = ("Ltd", "Inc", "Co", "GmbH", "LLC")
STREETS = ("Main St", "High Street", "Park Ave", "Mill Road", "Station Rd", "Elm Lane")
WORDS = (
    "please remit payment within the agreed period to the account shown on this page "
    "goods remain the property of the seller until paid in full all prices include "
    "standard handling charges unless otherwise stated queries should be sent to our "
    "accounts department quoting the reference above thank you for your business "
    "delivery times are estimates only returns must be authorised in writing"
).split()
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


def _val_invoice(rng: random.Random) -> str:
    return str(rng.randint(1000, 99999))


def _val_date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(2015, 2024)}"


def _val_total(rng: random.Random) -> str:
    return f"${rng.randint(5, 9999)}.{rng.randint(0, 99):02d}"


def _val_account(rng: random.Random) -> str:
    return f"AC-{rng.randint(10000, 99999)}"


def _val_order(rng: random.Random) -> str:
    return str(rng.randint(100000, 999999))


def _val_phone(rng: random.Random) -> str:
    return f"555-{rng.randint(0, 9999):04d}"


def _val_ref(rng: random.Random) -> str:
    return "".join(rng.choice(CODE_ALPHABET) for _ in range(3)) + "-" + str(rng.randint(10, 99))


# key -> (label drawn on the page, question, value generator)
FIELDS: dict[str, tuple[str, str, Any]] = {
    "invoice": ("INVOICE NO:", "What is the invoice number?", _val_invoice),
    "date": ("DATE:", "What is the date on the document?", _val_date),
    "total": ("TOTAL:", "What is the total amount?", _val_total),
    "account": ("ACCOUNT:", "What is the account number?", _val_account),
    "order": ("ORDER ID:", "What is the order ID?", _val_order),
    "phone": ("PHONE:", "What is the phone number?", _val_phone),
    "ref": ("REF:", "What is the reference code?", _val_ref),
}


def _answers_for(key: str, value: str) -> list[str]:
    answers = [value]
    if key == "total":
        answers.append(value.lstrip("$"))
    return answers


# --------------------------------------------------------------------------------------
# fonts


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px when FreeType is available, else the bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or Pillow without FreeType
        return ImageFont.load_default()


def _text_width(text: str, size: int) -> float:
    return _font(size).getlength(text)


def _wrap(words: list[str], size: int, max_width: float) -> list[str]:
    lines: list[str] = []
    cur: list[str] = []
    for w in words:
        trial = " ".join(cur + [w])
        if cur and _text_width(trial, size) > max_width:
            lines.append(" ".join(cur))
            cur = [w]
        else:
            cur.append(w)
    if cur:
        lines.append(" ".join(cur))
    return lines


# --------------------------------------------------------------------------------------
# spec (all randomness) and rendering (none)


def _sample_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{GENERATOR_ID}:v{GENERATOR_VERSION}:{seed}:{index}")


def make_spec(seed: int, index: int) -> dict:
    """The full, JSON-serialisable description of sample ``index`` for ``seed``."""
    rng = _sample_rng(seed, index)
    width, height = rng.choice(PAGE_SIZES)
    inner = width - 2 * MARGIN

    title = rng.choice(TITLES)
    sender = (
        f"{rng.choice(COMPANY_A)} {rng.choice(COMPANY_B)} {rng.choice(COMPANY_C)}, "
        f"{rng.randint(1, 250)} {rng.choice(STREETS)}"
    )

    n_fields = rng.randint(3, 4)
    keys = rng.sample(sorted(FIELDS), n_fields)
    blocks: list[dict] = []
    for key in keys:
        label, _question, gen = FIELDS[key]
        value = gen(rng)
        label_w = _text_width(label + " ", FIELD_SIZE)
        value_w = _text_width(value, FIELD_SIZE)
        max_x = max(MARGIN, int(width - MARGIN - label_w - value_w))
        x = rng.choice([MARGIN, MARGIN, rng.randint(MARGIN, max(MARGIN, min(max_x, width // 2)))])
        colour = rng.choice([INK, INK, (20, 40, 120)])
        blocks.append({"type": "field", "key": key, "label": label, "value": value, "x": x, "rgb": list(colour)})

    if rng.random() < 0.6:
        colour_name = rng.choice(sorted(BOX_COLOURS))
        code = "".join(rng.choice(CODE_ALPHABET) for _ in range(rng.randint(4, 6)))
        box_w = _text_width(code, BOX_SIZE) + 2 * BOX_PAD
        x = rng.randint(MARGIN, max(MARGIN, int(width - MARGIN - box_w)))
        blocks.append({"type": "box", "key": "code", "colour": colour_name, "value": code, "x": x})

    # distractor paragraphs and rules, while they fit
    budget = height - 2 * MARGIN - TITLE_ADVANCE - SENDER_ADVANCE - RULE_ADVANCE
    budget -= sum(FIELD_ADVANCE if b["type"] == "field" else BOX_ADVANCE for b in blocks)
    for _ in range(rng.randint(2, 5)):
        if rng.random() < 0.3:
            if budget >= RULE_ADVANCE:
                blocks.append({"type": "rule"})
                budget -= RULE_ADVANCE
            continue
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 22))]
        words[0] = words[0].capitalize()
        lines = _wrap(words, TEXT_SIZE, inner)
        need = len(lines) * TEXT_LINE_ADVANCE + TEXT_GAP
        if need <= budget:
            blocks.append({"type": "text", "lines": lines})
            budget -= need
    order = list(range(len(blocks)))
    rng.shuffle(order)
    blocks = [blocks[i] for i in order]

    targets = [i for i, b in enumerate(blocks) if b["type"] in ("field", "box")]
    target = rng.choice(targets)
    tb = blocks[target]
    if tb["type"] == "box":
        question = f"What code is written in the {tb['colour']} box?"
        answers = [tb["value"]]
    else:
        question = FIELDS[tb["key"]][1]
        answers = _answers_for(tb["key"], tb["value"])

    return {
        "size": [width, height],
        "title": title,
        "sender": sender,
        "blocks": blocks,
        "target": target,
        "question": question,
        "answers": answers,
    }


def render(spec: dict) -> tuple[Image.Image, list[list[int] | None]]:
    """Draw ``spec``; return the RGB image and, per block, the value's box [x0, y0, x1, y1]."""
    width, height = spec["size"]
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    y = MARGIN

    draw.text((MARGIN, y), spec["title"], fill=INK, font=_font(TITLE_SIZE))
    y += TITLE_ADVANCE
    draw.text((MARGIN, y), spec["sender"], fill=GREY, font=_font(SENDER_SIZE))
    y += SENDER_ADVANCE
    draw.line([(MARGIN, y + 3), (width - MARGIN, y + 3)], fill=LIGHT_GREY, width=2)
    y += RULE_ADVANCE

    boxes: list[list[int] | None] = []
    for block in spec["blocks"]:
        kind = block["type"]
        if kind == "field":
            font = _font(FIELD_SIZE)
            colour = tuple(block["rgb"])
            x = block["x"]
            draw.text((x, y), block["label"], fill=INK, font=font)
            vx = x + int(round(font.getlength(block["label"] + " ")))
            if block["value"]:
                draw.text((vx, y), block["value"], fill=colour, font=font)
                boxes.append(list(draw.textbbox((vx, y), block["value"], font=font)))
            else:
                boxes.append(None)
            y += FIELD_ADVANCE
        elif kind == "box":
            font = _font(BOX_SIZE)
            x = block["x"]
            tw = int(round(font.getlength(block["value"])))
            rect = [x, y, x + tw + 2 * BOX_PAD, y + BOX_ADVANCE - 12]
            draw.rectangle(rect, fill=BOX_COLOURS[block["colour"]], outline=INK)
            fg = INK if block["colour"] in DARK_TEXT_BOXES else WHITE
            tx, ty = x + BOX_PAD, y + (BOX_ADVANCE - 12 - BOX_SIZE) // 2 - 2
            if block["value"]:
                draw.text((tx, ty), block["value"], fill=fg, font=font)
                boxes.append(list(draw.textbbox((tx, ty), block["value"], font=font)))
            else:
                boxes.append(None)
            y += BOX_ADVANCE
        elif kind == "text":
            font = _font(TEXT_SIZE)
            for line in block["lines"]:
                draw.text((MARGIN, y), line, fill=GREY, font=font)
                y += TEXT_LINE_ADVANCE
            y += TEXT_GAP
            boxes.append(None)
        elif kind == "rule":
            draw.line([(MARGIN, y + 5), (width - MARGIN, y + 5)], fill=LIGHT_GREY, width=1)
            y += RULE_ADVANCE
            boxes.append(None)
        else:  # pragma: no cover - specs come from make_spec
            raise ValueError(f"unknown block type {kind!r}")
    return img, boxes


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # no timestamps / metadata: deterministic
    return buf.getvalue()


def make_sample(seed: int, index: int) -> dict:
    """One dataset row (image as PNG bytes) for ``(seed, index)``."""
    spec = make_spec(seed, index)
    img, boxes = render(spec)
    meta = {
        "seed": seed,
        "index": index,
        "spec": spec,
        "answer_bbox": boxes[spec["target"]],
        "value_bboxes": boxes,
    }
    return {
        "questionId": str(index),
        "question": spec["question"],
        "answers": list(spec["answers"]),
        "image": {"bytes": _png_bytes(img), "path": None},
        "docId": index,
        "render_meta": json.dumps(meta, sort_keys=True),
    }


# --------------------------------------------------------------------------------------
# writing, checking, reusing


def _features():
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    return Features(
        {
            "questionId": Value("string"),
            "question": Value("string"),
            "answers": Sequence(Value("string")),
            "image": HFImage(),
            "docId": Value("int64"),
            "render_meta": Value("string"),
        }
    )


def _expected_meta(n: int, seed: int) -> dict:
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "n": n, "seed": seed, "split": SPLIT, "task": TASK_NAME}


read_meta = publish.read_meta  # the parsed dvlm_meta.json of a folder, or None


def is_complete(out_dir: str | Path, n: int | None = None, seed: int | None = None) -> bool:
    """True when ``out_dir`` holds a finished dataset of this generator version
    (and, when given, with this ``n`` / ``seed``)."""
    expected = {k: v for k, v in _expected_meta(n, seed).items() if v is not None}
    return publish.is_complete(out_dir, expected)


def _fingerprint(n: int, seed: int) -> str:
    return hashlib.sha256(f"{GENERATOR_ID}:{GENERATOR_VERSION}:{n}:{seed}".encode()).hexdigest()[:16]


def _build(tmp_dir: Path, n: int, seed: int) -> None:
    from datasets import Dataset, DatasetDict

    rows = [make_sample(seed, i) for i in range(n)]
    columns = {k: [r[k] for r in rows] for k in _features()}
    ds = Dataset.from_dict(columns, features=_features(), split=SPLIT)
    # The fingerprint lands in state.json; pin it so that the same (n, seed) gives a
    # byte-identical folder whatever way a datasets release derives it.
    ds = Dataset(ds.data, info=ds.info, split=ds.split, fingerprint=_fingerprint(n, seed))
    DatasetDict({SPLIT: ds}).save_to_disk(str(tmp_dir))


def generate(out_dir: str | Path, n: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the ``synth_docvqa`` dataset (``n`` samples, ``seed``) to ``out_dir``.

    Returns the absolute ``out_dir``.  When ``out_dir`` already holds a complete dataset
    with the same ``n``/``seed``/generator version and ``overwrite`` is False, nothing
    is written.  A complete dataset with *other* parameters is only replaced with
    ``overwrite=True`` (``FileExistsError`` otherwise; :func:`ensure` replaces it).
    A non-empty folder that is not a dataset is never deleted (``FileExistsError``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out_dir = Path(out_dir).expanduser().resolve()

    if not overwrite:
        if is_complete(out_dir, n, seed):
            return out_dir
        if is_complete(out_dir):
            meta = read_meta(out_dir) or {}
            raise FileExistsError(
                f"{out_dir} holds a synth_docvqa dataset with n={meta.get('n')}, seed={meta.get('seed')} "
                f"(asked n={n}, seed={seed}); pass overwrite=True or use ensure() to replace it"
            )
    return publish.publish(out_dir, _expected_meta(n, seed), lambda tmp: _build(tmp, n, seed), force=overwrite,
                           what=TASK_NAME)


def ensure(out_dir: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Reuse ``out_dir`` when it holds a complete dataset for ``(n, seed)``; otherwise
    (missing, incomplete or different parameters) regenerate it.  Returns the path."""
    if is_complete(out_dir, n, seed):
        return Path(out_dir).expanduser().resolve()
    return generate(out_dir, n=n, seed=seed, overwrite=True)


def check_dataset(data_dir: str | Path) -> dict:
    """Fail early with a clear message when ``data_dir`` is not a complete dataset.

    lmms-eval wraps dataset loading in a tenacity retry (5 attempts, 2 s apart) and then
    raises ``tenacity.RetryError`` with the real cause hidden, so call this before
    ``simple_evaluate``.  Returns the dataset's ``dvlm_meta.json`` content.
    """
    data_dir = Path(data_dir).expanduser()
    hint = f"create it with: python scripts/make_synth_data.py --out {data_dir}"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"synth_docvqa dataset not found at {data_dir}; {hint}")
    if not is_complete(data_dir):
        raise FileNotFoundError(
            f"{data_dir} is not a complete synth_docvqa dataset (generator v{GENERATOR_VERSION}); "
            f"re-create it with: python scripts/make_synth_data.py --out {data_dir} --overwrite"
        )
    return read_meta(data_dir) or {}


def task_entry(data_dir: str | Path) -> dict:
    """The lmms-eval task entry for a checked dataset folder:
    ``{"task": "synth_docvqa", "dataset_path": "<absolute dir>"}``."""
    check_dataset(data_dir)
    return {"task": TASK_NAME, "dataset_path": str(Path(data_dir).expanduser().resolve())}
