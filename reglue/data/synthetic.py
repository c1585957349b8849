"""Built-in procedurally generated, class-conditional image dataset for the CPU demo and tests,
and a fixed classifier of its classes that scores what a demo run samples.

Class k draws one shape (circle, square, triangle, cross, ring, diamond, bars, dots, cycling)
in a class hue (k / num_classes of the colour wheel, ±0.03) on a darker, desaturated, noisy
background of roughly the opposite hue; position, size, tilt and brightness vary per image.
Squares, triangles and crosses stand upright (a square on its side, a triangle on its base, a
cross as a plus), tilted by up to ±15°: at a uniformly random rotation, the demo's one-minute
model drew them as blobs and scattered cells (2026-12 measurements in ``reglue.presets.tiny``).
Shapes have a radius of 25-38% of the side (16-24 px at 64 px): the demo's latent grid has one
cell per 8x8 pixels, and at this size its autoencoder's reconstructions keep the shape (95% of
them are classified right, against 82% at the 18-32% this set drew before); much larger, a
shape covers half the image and its colour is no longer the background's (the median's).
Every image is a pure function of (seed, index): no files, no downloads, exact resume. Drawn
images are kept in memory (up to ``CACHE_BYTES``), so epochs after the first cost an index, not
a drawing: the demo trains on every image many times.
"""

from __future__ import annotations

import colorsys
import math
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bars", "dots")
HUE_NAMES = ("red", "orange", "lime", "green", "cyan", "blue", "violet", "magenta")
"""Colour names of the hues 0°, 45°, ..., 315° (HSV), for class names."""


UPRIGHT = {"square": math.pi / 4, "triangle": -math.pi / 2, "cross": 0.0}
"""Angle (radians, of the first vertex or arm) at which the rotatable shapes stand upright: a square
on its side, a triangle on its base with its tip up, a cross as a plus. Diamonds and bars are drawn
at one orientation only, circles, rings and dots need none."""

TILT = math.radians(15)
"""Each square, triangle and cross is tilted from upright by a uniform angle in [-TILT, TILT]."""


CACHE_BYTES = 64 * 2**20
"""Datasets up to this size (uint8 pixels) keep every image once drawn: 2048 demo images are 25 MB."""


class SyntheticShapes(torch.utils.data.Dataset):
    """``dataset[i] -> (image uint8 (3, H, W), label int)``."""

    def __init__(self, size: int = 4096, num_classes: int = 8, image_size: int = 64, seed: int = 0):
        if size <= 0 or num_classes <= 0 or image_size < 8:
            raise ValueError(f"bad synthetic dataset settings: size={size}, num_classes={num_classes}, image_size={image_size}")
        self.size = size
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        cacheable = size * 3 * image_size**2 <= CACHE_BYTES
        self._cache = torch.empty((size, 3, image_size, image_size), dtype=torch.uint8) if cacheable else None
        self._drawn = torch.zeros(size, dtype=torch.bool) if cacheable else None

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % self.num_classes

    @property
    def class_names(self) -> List[str]:
        """E.g. "red circle": the nearest named hue and the shape of each class."""
        return [f"{HUE_NAMES[round(len(HUE_NAMES) * k / self.num_classes) % len(HUE_NAMES)]} {SHAPES[k % len(SHAPES)]}"
                for k in range(self.num_classes)]

    def classifiers(self, per_class: int = 64) -> Dict[str, "NearestClassMean"]:
        """``{"hue": HueClassifier, "shape": ShapeClassifier}``, each with class means over the first
        ``per_class`` images of each class."""
        count = min(len(self), per_class * self.num_classes)
        images, labels = zip(*(self[i] for i in range(count)))
        images, labels = torch.stack(images), torch.tensor(labels)
        return {c.KIND: c.fit(images, labels, self.num_classes) for c in (HueClassifier, ShapeClassifier)}

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        if self._cache is None:
            return self._draw_image(index), self.label(index)
        if not self._drawn[index]:
            self._cache[index] = self._draw_image(index)
            self._drawn[index] = True
        return self._cache[index].clone(), self.label(index)

    def _draw_image(self, index: int) -> torch.Tensor:
        """Image ``index``: uint8 (3, H, W), a pure function of (seed, index)."""
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
        radius = rng.uniform(0.25, 0.38) * s
        cx, cy = rng.uniform(radius, s - radius, size=2)
        shape = SHAPES[label % len(SHAPES)]
        angle = UPRIGHT.get(shape, 0.0) + rng.uniform(-TILT, TILT)
        self._draw(draw, shape, cx, cy, radius, angle, fg, s)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()

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


class NearestClassMean:
    """Nearest class mean (Euclidean) over a fixed descriptor of the images, the subclass's
    classmethod ``describe``: uint8 (N, 3, H, W) -> (N, DIM). class_means: (num_classes, DIM)."""

    DIM: int
    KIND: str

    def __init__(self, class_means: torch.Tensor):
        if class_means.ndim != 2 or class_means.shape[1] != self.DIM:
            raise ValueError(f"expected class means (num_classes, {self.DIM}), got {tuple(class_means.shape)}")
        self.class_means = class_means.float()

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "NearestClassMean":
        """Class means of the descriptors of uint8 ``images`` (N, 3, H, W) with ``labels`` (N,)."""
        descriptors = cls.describe(images)
        missing = [k for k in range(num_classes) if not (labels == k).any()]
        if missing:
            raise ValueError(f"no images of classes {missing} to fit the classifier on")
        return cls(torch.stack([descriptors[labels == k].mean(0) for k in range(num_classes)]))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> class indices (N,)."""
        return torch.cdist(self.describe(images.cpu()), self.class_means).argmin(1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of ``images`` assigned to their ``labels`` (N,)."""
        return (self.predict(images) == labels.cpu()).float().mean().item()


class HueClassifier(NearestClassMean):
    """Nearest class mean over chroma-weighted hue histograms of the pixels.

    The synthetic classes differ mainly in hue, so a histogram of hue weighted by chroma²
    (squared, so the saturated, bright shape outweighs the dull, noisy background it covers only
    a part of) separates them even when the shape itself is blurred away. Hue and chroma are the
    angle and length of the opponent-colour vector (R - (G + B) / 2, (G - B) √3 / 2); each pixel
    splits its weight linearly between the two nearest of ``BINS`` circular bins, so a class hue
    on a bin edge is not split by chance. Measured on seed-0 64 px images (``tests/data/
    test_synthetic.py``): 99.6% of real images right, 96% after 8x block-averaging, 12.5%
    (chance) of uniform noise. Nearest class mean in raw pixel space reaches only ~60%.
    """

    BINS = 32
    DIM = BINS
    KIND = "hue"

    @classmethod
    def describe(cls, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, BINS) hue histograms weighted by chroma², summing to 1
        (all zeros for a grey image)."""
        x = images.float() / 255
        r, g, b = x.unbind(1)
        a, c = r - (g + b) / 2, (g - b) * (3**0.5 / 2)
        position = (torch.atan2(c, a) / (2 * math.pi) % 1.0 * cls.BINS).flatten(1)
        weight = (a.square() + c.square()).flatten(1)
        low = position.floor()
        frac = position - low
        low = low.long() % cls.BINS
        hist = torch.zeros(len(images), cls.BINS)
        hist.scatter_add_(1, low, weight * (1 - frac)).scatter_add_(1, (low + 1) % cls.BINS, weight * frac)
        return hist / hist.sum(1, keepdim=True).clamp_min(1e-12)


class ShapeClassifier(NearestClassMean):
    """Nearest class mean over a descriptor of the foreground's shape that ignores colour,
    position, size and rotation.

    - foreground: each pixel's distance in RGB to the image's median colour (the background
      covers most of every image), divided by the 99th percentile of those distances, mapped
      linearly from [0.3, 0.7] to [0, 1]: the same soft mask whatever the hue or brightness of
      shape and background (sensor noise, ~0.1 of the shape's contrast, falls below 0.3);
    - the mask sampled bilinearly on ``RINGS`` rings around its centroid, out to twice its RMS
      radius (``ANGLES`` points each): position and size removed;
    - per ring, the magnitudes of the angular Fourier harmonics 0..``HARMONICS`` (a triangle
      has a 3-fold one, a cross and the dots 4-fold, the bars 2-fold, circle and ring none; the
      ring and the dots are hollow in the inner rings): rotation removed.

    Measured on seed-0 64 px images (``tests/data/test_synthetic.py``): 99% of real images
    right, the same on grey copies (colour plays no part), ~90% after 4x block-averaging, ~12%
    (chance) on uniform noise. DIM = RINGS x (HARMONICS + 1).
    """

    RINGS, ANGLES, HARMONICS = 8, 32, 8
    DIM = RINGS * (HARMONICS + 1)
    KIND = "shape"

    @classmethod
    def describe(cls, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, DIM) harmonic magnitudes of the foreground mask per ring."""
        x = images.float() / 255
        n, _, h, w = x.shape
        # (N, H, W); the sum of squares, not .norm(dim=1): on the CPU that reduction over the channel
        # dimension took 400 ms for 512 images (the classifiers' fit), this takes 12-18 ms
        distance = (x - x.flatten(2).median(2).values[:, :, None, None]).square().sum(1).sqrt()
        scale = torch.quantile(distance.flatten(1), 0.99, dim=1).clamp_min(1e-6)[:, None, None]
        mask = ((distance / scale - 0.3) / 0.4).clamp(0, 1)
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        mass = mask.sum((1, 2)).clamp_min(1e-6)
        cx, cy = (mask * xs).sum((1, 2)) / mass, (mask * ys).sum((1, 2)) / mass
        radius = (((xs - cx[:, None, None]).square() + (ys - cy[:, None, None]).square()) * mask).sum((1, 2))
        radius = (radius / mass).sqrt().clamp_min(1.0)
        rings = (torch.arange(cls.RINGS) + 0.5) / cls.RINGS * 2.0
        angles = torch.arange(cls.ANGLES) * (2 * math.pi / cls.ANGLES)
        reach = radius[:, None, None] * rings[None, :, None]  # (N, RINGS, 1)
        px, py = cx[:, None, None] + reach * angles.cos(), cy[:, None, None] + reach * angles.sin()
        grid = torch.stack([px / w * 2 - 1, py / h * 2 - 1], dim=-1)  # grid_sample's [-1, 1] pixel-edge coordinates
        polar = F.grid_sample(mask[:, None], grid, align_corners=False)[:, 0]  # (N, RINGS, ANGLES)
        return (torch.fft.rfft(polar, dim=2).abs()[:, :, : cls.HARMONICS + 1] / cls.ANGLES).flatten(1)
