"""Built-in procedurally generated, class-conditional image dataset for the CPU demo and tests.

Class k draws one shape (circle, square, triangle, cross, ring, diamond, bars, dots, cycling)
in a class hue on a darker, noisy background; position, size, rotation and brightness vary per
image. Every image is a pure function of (seed, index): no files, no downloads, exact resume.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bars", "dots")


class SyntheticShapes(torch.utils.data.Dataset):
    """``dataset[i] -> (image uint8 (3, H, W), label int)``."""

    def __init__(self, size: int = 4096, num_classes: int = 8, image_size: int = 64, seed: int = 0):
        if size <= 0 or num_classes <= 0 or image_size < 8:
            raise ValueError(f"bad synthetic dataset settings: size={size}, num_classes={num_classes}, image_size={image_size}")
        self.size = size
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % self.num_classes

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        label = self.label(index)
        rng = np.random.default_rng((self.seed, index))
        s = self.image_size
        hue = (label / self.num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        fg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        bg_hue = (hue + 0.5 + rng.uniform(-0.1, 0.1)) % 1.0
        bg = np.array(colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.35))) * 255
        base = np.clip(bg + rng.normal(0, 12, (s, s, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        radius = rng.uniform(0.18, 0.32) * s
        cx, cy = rng.uniform(radius, s - radius, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        self._draw(draw, SHAPES[label % len(SHAPES)], cx, cy, radius, angle, fg, s)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(), label

    @staticmethod
    def _polygon(cx, cy, r, angle, k):
        return [(cx + r * math.cos(angle + 2 * math.pi * i / k), cy + r * math.sin(angle + 2 * math.pi * i / k)) for i in range(k)]

    def _draw(self, draw, shape, cx, cy, r, angle, fg, s):
        width = max(1, int(r / 3))
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif shape == "square":
            draw.polygon(self._polygon(cx, cy, r, angle, 4), fill=fg)
        elif shape == "triangle":
            draw.polygon(self._polygon(cx, cy, r, angle, 3), fill=fg)
        elif shape == "cross":
            for a in (angle, angle + math.pi / 2):
                dx, dy = r * math.cos(a), r * math.sin(a)
                draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=width)
        elif shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
        elif shape == "diamond":
            draw.polygon(self._polygon(cx, cy, r, 0.0, 4), fill=fg)
            draw.polygon(self._polygon(cx, cy, r / 2, 0.0, 4), fill=tuple(c // 3 for c in fg))
        elif shape == "bars":
            for i in range(3):
                y0 = cy - r + i * 2 * r / 3
                draw.rectangle([cx - r, y0, cx + r, y0 + r / 3], fill=fg)
        else:  # dots
            for dx in (-r / 2, r / 2):
                for dy in (-r / 2, r / 2):
                    draw.ellipse([cx + dx - r / 4, cy + dy - r / 4, cx + dx + r / 4, cy + dy + r / 4], fill=fg)
