"""Shared fixtures: a generated ImageFolder with awkward files, and it prepared into shards.

The folder has 3 classes and 10 files that PIL should read (JPEG of several sizes, a PNG, an
RGBA PNG, a grayscale JPEG, a CMYK JPEG, a WebP wider than 2x the target, a tiny image that must
be upscaled) plus 2 it cannot (random bytes, a truncated JPEG) and a text file that is not an
image. Everything is 64 px with the tiny random VAE: no downloads.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reglue.data.synthetic import SyntheticShapes

IMAGE_SIZE = 64
VAE = "tiny-random"

# (class, file name, (width, height), PIL mode, format)
FILES = [
    ("cat", "a.jpg", (80, 100), "RGB", "JPEG"),
    ("cat", "b.png", (130, 64), "RGB", "PNG"),
    ("cat", "c_gray.jpg", (70, 90), "L", "JPEG"),
    ("cat", "d_small.jpg", (40, 30), "RGB", "JPEG"),
    ("dog", "e_cmyk.jpg", (96, 72), "CMYK", "JPEG"),
    ("dog", "f.webp", (200, 150), "RGB", "WEBP"),
    ("dog", "g_rgba.png", (64, 64), "RGBA", "PNG"),
    ("fish", "h.jpeg", (300, 64), "RGB", "JPEG"),
    ("fish", "i.JPEG", (64, 64), "RGB", "JPEG"),
    ("fish", "nested/j.jpg", (150, 140), "RGB", "JPEG"),
]
CORRUPT = [("dog", "corrupt.jpg"), ("fish", "truncated.jpg")]
CLASSES = {"cat": 0, "dog": 1, "fish": 2}


def _picture(k: int, size) -> Image.Image:
    base = SyntheticShapes(size=16, num_classes=8, image_size=128, seed=3)[k][0]
    return Image.fromarray(base.permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC)


def make_image_folder(root) -> None:
    for k, (cls, name, size, mode, fmt) in enumerate(FILES):
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = _picture(k, size)
        img = img.convert(mode) if mode != "RGBA" else img.convert("RGBA")
        if mode == "RGBA":
            alpha = np.full((size[1], size[0]), 200, np.uint8)
            img.putalpha(Image.fromarray(alpha))
        img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    (root / "dog" / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    _picture(11, (120, 90)).save(buffer, format="JPEG", quality=90)
    (root / "fish" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "fish" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(root)
    return root


@pytest.fixture(scope="session")
def prepared(image_folder, tmp_path_factory):
    """The folder prepared once (3 sources per shard, tiny VAE); tests must not modify it."""
    from reglue.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(image_folder, out, PrepareOptions(image_size=IMAGE_SIZE, vae=VAE, shard_size=3), num_workers=0, batch_size=4,
            progress=False)
    return out
