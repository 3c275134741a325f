"""Synthetic, offline video clips: coloured shapes moving on a plain background.

`make_clip(path, seed, n_frames, size)` writes a small H.264 mp4 with PyAV and returns its
reference description, e.g. "A red circle moves from left to right while a blue square stays
still." Everything random (shapes, colours, motions, start offsets, background) is drawn from
`random.Random(seed)` in `clip_spec`; `render_frames` turns a spec into uint8 frames with no
randomness, so the same seed gives the same description and the same frames. The encoder runs
single-threaded with fixed settings (the mp4 bytes are reproducible on one machine; decoded
pixels are close to, not equal to, the rendered ones: H.264 is lossy).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 230),
    "yellow": (240, 210, 20), "purple": (150, 50, 200), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# motion -> (start (x, y), end (x, y)) in units of the free range [0, 1]
MOTIONS = {
    "moves from left to right": ((0.0, None), (1.0, None)),
    "moves from right to left": ((1.0, None), (0.0, None)),
    "moves from top to bottom": ((None, 0.0), (None, 1.0)),
    "moves from bottom to top": ((None, 1.0), (None, 0.0)),
    "stays still": ((None, None), (None, None)),
}
BACKGROUNDS = ((245, 245, 245), (225, 235, 245), (240, 235, 220))


def clip_spec(seed: int, n_objects: int | None = None) -> dict:
    """All random choices of clip `seed`: 1-2 objects with distinct colours and shapes, the first
    always moving, the second (if any) moving along the other axis or staying still."""
    rng = random.Random(f"synth_video/{int(seed)}")
    n = n_objects if n_objects is not None else rng.choice((1, 2))
    colours = rng.sample(sorted(COLOURS), n)
    shapes = rng.sample(SHAPES, n)
    moving = [m for m in MOTIONS if m != "stays still"]
    motions = [rng.choice(moving)]
    if n == 2:
        horizontal = "left" in motions[0]
        other = [m for m in MOTIONS if m == "stays still" or (("left" in m) != horizontal)]
        motions.append(rng.choice(other))
    objects = []
    for i in range(n):
        # fixed coordinate along the axis the object does not travel, kept apart between objects
        lane = (0.2 + 0.6 * rng.random()) if n == 1 else (0.25 if i == 0 else 0.75)
        objects.append({"shape": shapes[i], "colour": colours[i], "motion": motions[i], "lane": lane})
    return {"seed": int(seed), "objects": objects, "background": list(rng.choice(BACKGROUNDS))}


def describe(spec: dict) -> str:
    parts = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']} {o['motion']}"
             for o in spec["objects"]]
    text = parts[0] if len(parts) == 1 else f"{parts[0]} while {parts[1]}"
    return text[0].upper() + text[1:] + "."


def _position(obj: dict, t: float, free: float) -> tuple[float, float]:
    (sx, sy), (ex, ey) = MOTIONS[obj["motion"]]
    lane = obj["lane"]
    if obj["motion"] == "stays still":
        return free * 0.5, free * lane  # parked mid-width on its lane
    if sx is not None:  # horizontal motion, lane is the y coordinate
        return free * (sx + (ex - sx) * t), free * lane
    return free * lane, free * (sy + (ey - sy) * t)


def render_frames(spec: dict, n_frames: int = 16, size: int = 96) -> np.ndarray:
    """[n_frames, size, size, 3] uint8: each object moves linearly from its start to its end."""
    obj_size = max(8, size // 5)
    free = size - obj_size
    frames = []
    for k in range(n_frames):
        t = k / max(1, n_frames - 1)
        img = Image.new("RGB", (size, size), tuple(spec["background"]))
        draw = ImageDraw.Draw(img)
        for obj in spec["objects"]:
            x, y = _position(obj, t, free)
            x0, y0 = int(round(x)), int(round(y))
            box = (x0, y0, x0 + obj_size - 1, y0 + obj_size - 1)
            colour = COLOURS[obj["colour"]]
            if obj["shape"] == "circle":
                draw.ellipse(box, fill=colour)
            elif obj["shape"] == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(x0 + obj_size // 2, y0), (box[2], box[3]), (x0, box[3])], fill=colour)
        frames.append(np.asarray(img, dtype=np.uint8))
    return np.stack(frames)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode [F,H,W,3] uint8 frames as H.264 (yuv420p) mp4, atomically; H and W must be even."""
    import av

    path = Path(path)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(tmp), mode="w") as c:
            stream = c.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": "12", "preset": "medium", "threads": "1"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(packet)
            for packet in stream.encode():
                c.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_clip(path: str | Path, seed: int = 0, n_frames: int = 16, size: int = 96, fps: int = 8) -> str:
    """Write clip `seed` to `path` (mp4) and return its reference description."""
    if size % 2:
        raise ValueError(f"size must be even, got {size}")
    spec = clip_spec(seed)
    write_mp4(path, render_frames(spec, n_frames, size), fps=fps)
    return describe(spec)
