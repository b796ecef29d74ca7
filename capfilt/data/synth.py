"""A synthetic image-text world: coloured shapes at positions, with captions that describe them.

Tiny models learn it on a CPU in seconds, so learning itself (and CapFilt's effect on it) becomes testable.
A fraction of samples can get another sample's caption, marked `json["synth"]["noisy"]`, as planted noise.
Everything is a function of (seed, index): the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from capfilt.data.files import publish, temporary
from capfilt.settings import SynthConfig

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# (column, row) cells of a 3x3 grid and how a caption names them.
POSITIONS = {(0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
             (0, 1): "on the left", (1, 1): "in the middle", (2, 1): "on the right",
             (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right"}
BACKGROUNDS = {"grey": (128, 128, 128), "beige": (225, 210, 180)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int]

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind} {POSITIONS[self.cell]}"


def scene(config: SynthConfig, index: int) -> tuple[str, list[Shape]]:
    """The background and shapes of sample `index`: distinct cells, so no shape hides another."""
    rng = random.Random(f"{config.seed}/{index}")
    cells = rng.sample(sorted(POSITIONS), rng.randint(1, config.max_shapes))
    background = rng.choice(sorted(BACKGROUNDS))
    return background, [Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), cell) for cell in cells]


def caption(shapes: list[Shape]) -> str:
    return " and ".join(s.phrase() for s in shapes)


def draw(background: str, shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for shape in shapes:
        x0, y0 = shape.cell[0] * cell + cell * 0.15, shape.cell[1] * cell + cell * 0.15
        x1, y1 = x0 + cell * 0.7, y0 + cell * 0.7
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return image


def noisy_donors(config: SynthConfig) -> dict[int, int]:
    """Which samples get another sample's caption: a cyclic shift among a seeded `noise` fraction, so each
    noisy sample's caption comes from a different image (and differs from its own, which is checked)."""
    rng = random.Random(f"{config.seed}/noise")
    noisy = sorted(rng.sample(range(config.n), round(config.noise * config.n)))
    return {i: noisy[(j + 1) % len(noisy)] for j, i in enumerate(noisy)} if len(noisy) > 1 else {}


def write_synth(out: Path, config: SynthConfig) -> list[Path]:
    """Write `synth-NNNNN.tar` shards (img2dataset layout) under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    donors = noisy_donors(config)
    paths = []
    for shard, start in enumerate(range(0, config.n, config.per_shard)):
        path = out / f"synth-{shard:05d}.tar"
        tmp = temporary(path)
        with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as tar:
            for index in range(start, min(config.n, start + config.per_shard)):
                tar.write(_sample(config, index, shard, donors))
        publish(tmp, path)
        paths.append(path)
    return paths


def _sample(config: SynthConfig, index: int, shard: int, donors: dict[int, int]) -> dict:
    background, shapes = scene(config, index)
    true_caption = caption(shapes)
    text = caption(scene(config, donors[index])[1]) if index in donors else true_caption
    buffer = io.BytesIO()
    draw(background, shapes, config.size).save(buffer, format="PNG")
    key = f"{shard:05d}{index % 10000:04d}"
    meta = {"key": key, "caption": text, "status": "success", "width": config.size, "height": config.size,
            "synth": {"index": index, "noisy": index in donors and text != true_caption,
                      "true_caption": true_caption, "background": background,
                      "shapes": [{"kind": s.kind, "colour": s.colour, "cell": list(s.cell)} for s in shapes]}}
    return {"__key__": key, "png": buffer.getvalue(), "txt": text.encode(), "json": json.dumps(meta).encode()}
