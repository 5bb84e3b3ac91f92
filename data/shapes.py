"""Synthetic coloured-shapes data: the embedded default and the test data.

Every sample is a pure function of (seed, index), so any rank can produce any sample without coordination
and resume is exact by construction. Records use the project's record format (../shared/DESIGN.md) with
media as in-memory PIL images, so the encoder cannot tell them from records read out of shards.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
TASKS = ("caption", "vqa")


@dataclass
class ShapesConfig:
    """`data=shapes`. `tasks` picks the record kinds (caption: role-less document; vqa: chat)."""

    name: str = "shapes"
    seed: int = 1234
    tasks: list = field(default_factory=lambda: list(TASKS))
    min_size: int = 64
    max_size: int = 128
    max_shapes: int = 3


def _draw(rng: random.Random, cfg: ShapesConfig) -> tuple[Image.Image, list[tuple[str, str, list[int]]]]:
    w, h = rng.randint(cfg.min_size, cfg.max_size), rng.randint(cfg.min_size, cfg.max_size)
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(rng.randint(1, cfg.max_shapes)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        s = rng.randint(min(w, h) // 5, min(w, h) // 2)
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        box = [x, y, x + s, y + s]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
        objects.append((colour, shape, box))
    return img, objects


def _phrase(objects) -> str:
    return " and ".join(f"a {c} {s}" for c, s, _ in objects)


def sample(cfg: ShapesConfig, index: int) -> tuple[dict, dict]:
    """(record, media) for sample `index`; media maps the record's file names to PIL images."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    img, objects = _draw(rng, cfg)
    media = {"0.png": img}
    task = cfg.tasks[index % len(cfg.tasks)]
    if task == "caption":
        text = f"A picture of {_phrase(objects)}. There {'is' if len(objects) == 1 else 'are'} {len(objects)} " \
               f"shape{'s' if len(objects) > 1 else ''}."
        record = {"content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": text}]}
    elif task == "vqa":
        # ask for a colour only of a shape kind that occurs once, so every question has one right answer
        kinds = [s for _, s, _ in objects]
        unique = [(c, s) for c, s, _ in objects if kinds.count(s) == 1]
        if not unique or rng.random() < 0.5:
            q, a = "How many shapes are there?", str(len(objects))
        else:
            colour, shape = rng.choice(unique)
            q, a = f"What colour is the {shape}?", colour
        record = {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ]}
    else:
        raise ValueError(f"data.tasks contains {task!r}; the shapes source knows {list(TASKS)}")
    record["source"] = f"shapes_{task}"
    return record, media
