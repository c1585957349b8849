"""ADM-format ``.npz`` batches: reading and validating reference and sample batches in streamed
batches, writing them without holding them, and making a reference batch for any dataset.

Format (openai/guided-diffusion's reference batches, e.g. ``VIRTUAL_imagenet256_labeled.npz``,
and the sample batches its evaluator reads; ``numpy.savez`` layout):

- ``arr_0``: uint8 (N, H, W, 3) images (NHWC, RGB, 0..255). Reference batches hold 10,000
  images, used for precision/recall; sample batches are the images scored.
- ``mu`` (2048,), ``sigma`` (2048, 2048): mean and covariance of the ``pool_3`` features (FID);
  ``mu_s`` (2023,), ``sigma_s`` (2023, 2023): of the ``mixed_6/conv[..., :7]`` features (sFID).
  In the ADM reference batches they describe the whole training set, not only the 10,000 images.
- ours add, when made with a DINOv2: ``mu_dinov2`` (D,), ``sigma_dinov2`` (D, D) (FD_DINOv2),
  and ``stats_count`` () int64: the number of images behind the statistics.

:class:`NpzImages` reads ``arr_0`` by batches: memory-mapped when the member is stored
uncompressed (``numpy.savez``; 50,000 256² images are 9.8 GB), streamed through ``zipfile``
when it is deflated (``savez_compressed``). Either way the member's zip CRC-32 is verified
(computed over the batches as they are read; :class:`~reglue.integrity.DamagedFileError` after the
last batch when it differs: consume every batch before reporting anything). :class:`NpzWriter` writes the same layout array by
array, big arrays in batches, and renames the file into place only once complete, so an
interrupted run leaves no half-written reference where a good one was expected.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from reglue.evaluation.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor
from reglue.evaluation.metrics import FeatureSet, GaussianStats
from reglue.integrity import DamagedFileError, RunningCrc32, crc32_file

__all__ = [
    "NpzError",
    "NpzImages",
    "NpzWriter",
    "Reference",
    "load_reference",
    "make_reference",
    "DEFAULT_REFERENCE_IMAGES",
]

DEFAULT_REFERENCE_IMAGES = 10_000
STATS_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
DINOV2_KEYS = ("mu_dinov2", "sigma_dinov2")


class NpzError(ValueError):
    """An .npz that is not a valid ADM batch; one line per problem, each naming the file."""

    def __init__(self, path, problems: List[str]):
        super().__init__("\n".join(f"{path}: {problem}" for problem in problems))


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise NpzError(path, [f"not a readable .npz ({err}): truncated, or not written by numpy.savez?"]) from err


_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... file name length, extra field length (30 bytes)


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset in the file of an uncompressed member's contents (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
    return info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]


class NpzImages:
    """uint8 (N, H, W, 3) images stored as ``key`` in an .npz, validated when opened and read in
    batches (see the module docstring)."""

    def __init__(self, path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        with _open_zip(self.path) as zf:
            member = f"{key}.npy"
            if member not in zf.namelist():
                found = ", ".join(sorted(n.removesuffix(".npy") for n in zf.namelist())) or "nothing"
                raise NpzError(self.path, [f"no '{key}' array (it has {found}); an ADM batch stores its images as arr_0"])
            self._info = zf.getinfo(member)
            with zf.open(self._info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                    shape, fortran, dtype = read_header[version](f)
                except (ValueError, KeyError, EOFError) as err:
                    raise NpzError(self.path, [f"'{key}' is not a readable .npy array ({err!r})"]) from err
                except (zipfile.BadZipFile, zlib.error) as err:  # a small member is read to its end, CRC check included
                    raise DamagedFileError(self.path, f"'{key}' is damaged ({err})") from err
                self._header_bytes = f.tell()
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        problems = []
        if self.dtype != np.uint8:
            problems.append(f"'{key}' has dtype {self.dtype}, expected uint8 images in 0..255")
        if len(self.shape) != 4 or self.shape[-1] != 3:
            hint = " (channels first: store (N, H, W, 3))" if len(self.shape) == 4 and self.shape[1] == 3 else ""
            problems.append(f"'{key}' has shape {self.shape}, expected (N, H, W, 3){hint}")
        elif min(self.shape[:3]) < 1:
            problems.append(f"'{key}' has shape {self.shape}: no images")
        if fortran:
            problems.append(f"'{key}' is stored in Fortran order; save a C-contiguous array")
        expected = self._header_bytes + math.prod(self.shape) * self.dtype.itemsize
        if not problems and self._info.file_size != expected:
            problems.append(f"'{key}' holds {self._info.file_size:,} bytes but its header promises {expected:,}: truncated or corrupt")
        if problems:
            raise NpzError(self.path, problems)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> Tuple[int, int]:
        return self.shape[1], self.shape[2]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) arrays, in order, the last one possibly smaller."""
        row_bytes = math.prod(self.shape[1:])
        if self._info.compress_type == zipfile.ZIP_STORED:
            start_of_member = _member_data_offset(self.path, self._info)
            offset = start_of_member + self._header_bytes
            if offset + len(self) * row_bytes > self.path.stat().st_size:
                raise NpzError(self.path, [f"'{self.key}' runs past the end of the file: truncated"])
            # the memory map bypasses zipfile's CRC check: the member's CRC-32 is computed here, over
            # the .npy header and then each batch as it is read, and compared after the last one
            check = RunningCrc32(self.path, self._info.CRC, f"'{self.key}'",
                                 crc32_file(self.path, start_of_member, self._header_bytes))
            images = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=self.shape)
            for start in range(0, len(self), batch_size):
                batch = np.array(images[start : start + batch_size])
                check.update(batch)
                yield batch
            check.verify()
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(self._info) as f:
            def read(size: int, start: int) -> bytes:
                try:
                    return f.read(size)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:  # zipfile's CRC check among them
                    raise DamagedFileError(self.path, f"'{self.key}' is damaged: unreadable from image {start} ({err})") from err

            f.read(self._header_bytes)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = read(count * row_bytes, start)
                if len(data) != count * row_bytes:
                    raise NpzError(self.path, [f"'{self.key}' ends at image {start + len(data) // row_bytes}: truncated"])
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:]).copy()
            read(1, len(self))  # reading to the member's end is what makes zipfile compare its CRC-32


class NpzWriter:
    """Writes an uncompressed .npz (``numpy.savez`` layout) array by array; use as a context
    manager. The file is written as ``<path>.partial`` and renamed to ``path`` on success (removed
    on error), so ``path`` only ever holds a complete file."""

    def __init__(self, path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._zip = zipfile.ZipFile(self.partial, "w", zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    @contextmanager
    def streamed(self, name: str, shape: Tuple[int, ...], dtype) -> Iterator[Callable[[np.ndarray], None]]:
        """``with writer.streamed("arr_0", (N, H, W, 3), np.uint8) as write: write(batch) ...``;
        the batches must add up to ``shape`` exactly."""
        dtype, written = np.dtype(dtype), 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)

            def write(batch: np.ndarray) -> None:
                nonlocal written
                batch = np.ascontiguousarray(batch, dtype=dtype)
                if batch.shape[1:] != tuple(shape[1:]) or written + len(batch) > shape[0]:
                    raise ValueError(f"{name}: batch {batch.shape} does not fit the declared shape {tuple(shape)} "
                                     f"after {written} rows")
                f.write(memoryview(batch).cast("B"))
                written += len(batch)

            yield write
            if written != shape[0]:
                raise ValueError(f"{name}: {written} rows written, {shape[0]} declared")

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._zip.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reference batches
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """A validated reference batch. images: its ``arr_0`` (None when not needed); fid/sfid: the
    precomputed ``mu``/``sigma`` and ``mu_s``/``sigma_s``; dinov2: ``mu_dinov2``/``sigma_dinov2``
    when present; stats_count: images behind the statistics when recorded (ours)."""

    path: Path
    images: Optional[NpzImages]
    fid: GaussianStats
    sfid: GaussianStats
    dinov2: Optional[GaussianStats] = None
    stats_count: Optional[int] = None


def _stats_problems(arrays: dict, key: str, shape: Optional[Tuple[int, ...]]) -> List[str]:
    array = arrays.get(key)
    if array is None:
        return []
    problems = []
    if array.dtype.kind != "f":
        problems.append(f"'{key}' has dtype {array.dtype}, expected floating point")
    elif shape is not None and array.shape != shape:
        problems.append(f"'{key}' has shape {array.shape}, expected {shape}")
    elif not np.isfinite(array).all():
        problems.append(f"'{key}' holds NaN or infinite values")
    return problems


def load_reference(path, need_images: bool = True) -> Reference:
    """Open and validate a reference batch; NpzError listing every problem (one per line).
    Its images (``arr_0``) are opened when present and required with ``need_images``."""
    path = Path(path)
    with _open_zip(path) as zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}
    missing = [k for k in STATS_SHAPES if k not in names]
    if missing:
        raise NpzError(path, [f"no precomputed statistics {', '.join(missing)} (a reference batch carries mu, sigma, mu_s, "
                              "sigma_s): use an ADM reference batch, or make one with `reglue evaluate --make-ref`"])
    keys = [*STATS_SHAPES, *(k for k in (*DINOV2_KEYS, "stats_count") if k in names)]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in keys}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise NpzError(path, [f"statistics not readable: damaged or truncated ({err})"]) from err
    problems = [p for key, shape in STATS_SHAPES.items() for p in _stats_problems(arrays, key, shape)]
    dinov2 = None
    if any(k in arrays for k in DINOV2_KEYS):
        dim = arrays["mu_dinov2"].shape[0] if "mu_dinov2" in arrays and arrays["mu_dinov2"].ndim == 1 else None
        if not all(k in arrays for k in DINOV2_KEYS) or dim is None:
            problems.append("DINOv2 statistics need both mu_dinov2 (D,) and sigma_dinov2 (D, D)")
        else:
            problems += _stats_problems(arrays, "mu_dinov2", (dim,)) + _stats_problems(arrays, "sigma_dinov2", (dim, dim))
    images = None
    if need_images or "arr_0" in names:
        try:
            images = NpzImages(path)
        except NpzError as err:
            problems += [line.removeprefix(f"{path}: ") for line in str(err).splitlines()]
    if problems:
        raise NpzError(path, problems)
    if "mu_dinov2" in arrays:
        dinov2 = GaussianStats(arrays["mu_dinov2"], arrays["sigma_dinov2"])
    return Reference(path=path, images=images, fid=GaussianStats(arrays["mu"], arrays["sigma"]),
                     sfid=GaussianStats(arrays["mu_s"], arrays["sigma_s"]), dinov2=dinov2,
                     stats_count=int(arrays["stats_count"]) if "stats_count" in arrays else None)


@torch.no_grad()
def make_reference(dataset, out, inception: InceptionFeatureExtractor, *, num: int = DEFAULT_REFERENCE_IMAGES,
                   dinov2: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, batch_size: int = 100,
                   seed: int = 0, num_workers: int = 0, progress: bool = False) -> dict:
    """Write a reference batch for ``dataset`` (items ``(image uint8 (3, H, W), label, ...)``, e.g.
    ``open_data_dir(...)`` or the synthetic demo set) to ``out``.

    ``arr_0``: a seeded random subset of ``num`` images (all if the dataset is smaller), in index
    order. Statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and, with ``dinov2`` (uint8 images
    (B, 3, H, W) -> (B, D) features), ``mu_dinov2``, ``sigma_dinov2``): over the whole dataset,
    streamed in one pass that also writes the subset. Returns a summary dict.
    """
    from reglue.data.sampler import sample_indices
    from reglue.data.stats import image_batches

    total = len(dataset)
    subset = sample_indices(total, num, seed)
    size = int(dataset.image_size)
    features = FeatureSet(dinov2=dinov2 is not None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="reference", dynamic_ncols=True)
    with NpzWriter(out) as writer:
        with writer.streamed("arr_0", (len(subset), size, size, 3), np.uint8) as write_images:
            start, next_pick = 0, 0
            for images in image_batches(dataset, range(total), batch_size, num_workers):
                features.add(inception(images), dinov2(images) if dinov2 is not None else None)
                end, first_pick = start + len(images), next_pick
                while next_pick < len(subset) and subset[next_pick] < end:
                    next_pick += 1
                picked = torch.tensor(subset[first_pick:next_pick]) - start
                if len(picked):
                    write_images(images[picked].permute(0, 2, 3, 1).numpy())
                start = end
                if bar is not None:
                    bar.update(len(images))
        if bar is not None:
            bar.close()
        stats = {"mu": features.fid_stats(), "mu_s": features.sfid_stats()}
        if dinov2 is not None:
            stats["mu_dinov2"] = features.dinov2_stats()
        for mu_key, gaussian in stats.items():
            writer.add(mu_key, gaussian.mu.numpy())
            writer.add(mu_key.replace("mu", "sigma"), gaussian.sigma.numpy())
        writer.add("stats_count", np.array(features.count, dtype=np.int64))
    return {"out": str(out), "images": len(subset), "stats_images": features.count, "image_size": size,
            "dinov2": dinov2 is not None}
