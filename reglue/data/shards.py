"""Prepared datasets on disk: the shard format written by ``reglue prepare``, and the published
REPA/REGLUE layout, both read with random access by global sample index.

Shard format (``format: "reglue-shards"``, version 1)
-----------------------------------------------------
::

    ROOT/dataset.json            counts, classes, resolution, the VAE (``vae``: its name, ``vae_sha256``:
                                 its weights' fingerprint), JPEG settings, latent statistics, and
                                 the shard list [{"name": "00000", "num_samples": n}, ...]
    ROOT/report.json             sources read, samples written, skipped files with the reason
    ROOT/prepare.json            the recipe (settings + fingerprint of the input listing); resume check
    ROOT/shards/00000/
        images.bin               the samples' JPEG files, concatenated
        offsets.npy              int64 (n + 1,): sample k is images.bin[offsets[k]:offsets[k + 1]]
        labels.npy               int64 (n,)
        moments.npy              float32 (n, 8, h, w): SD-VAE latent mean ++ std (absent with --vae none)
        sources.txt              one line per sample: source path relative to the input, "\\tflip" for flips
        checksums.npy            uint32 (n, 2): CRC-32 of each sample's JPEG bytes and of its moments row
        shard.json               written last: the shard is complete iff this file exists; ``crc32``: the
                                 CRC-32 of offsets.npy, labels.npy, checksums.npy and sources.txt

Damage is refused, not read: the index files are verified against ``shard.json`` when a dataset
is opened (they are small: 24 bytes a sample), and each sample's bytes against ``checksums.npy``
as they are read (a CRC of ~30 KB per sample, next to decoding it), so nothing reads the whole of
``images.bin`` or ``moments.npy`` up front. Shards prepared before checksums are read unverified.

Global sample index i lives in the shard whose cumulative range holds it (shards in name order).
Random access by index is what lets both loaders (the torch DataLoader and DALI's
``external_source``) deliver exactly ``GlobalBatchOrder.rank_batch(step, rank, world)``: the
position in the data is the step counter, so resuming at any step, at any world size, is exact.
Arrays are memory-mapped, opened lazily in the process that reads them (DataLoader or DALI
workers), so a dataset object pickles small.

Why JPEG: DALI decodes JPEG on the GPU (nvJPEG, the A100/H100 hardware decoder), not PNG, and a
JPEG is ~3x smaller than the uncompressed PNG of the published pipeline. Images are stored at
quality 95 with 4:4:4 chroma (no chroma subsampling: no upsampling filter for decoders to
disagree on; libjpeg-turbo through PIL, torchvision and DALI-CPU decode them bit-identically;
nvJPEG within a few levels). The VAE moments are computed from the decoded JPEG, not from the
crop before compression, so the latents and the pixels DINOv2 sees are the same picture.

Published layout (REPA ``preprocessing/dataset_tools.py``, used by REGLUE)
----------------------------------------------------------------------------
::

    ROOT/images/00000/img00000000.png            256x256 RGB PNG (ADM centre crop)
    ROOT/vae-sd/00000/img-mean-std-00000000.npy  float32 (8, 32, 32) moments
    ROOT/vae-sd/dataset.json                     {"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}

Sample i is the i-th image and the i-th feature file, each list sorted by relative path, as in
the published ``CustomDataset``. The layout records no VAE: its moments are taken to be the run's
``encoders.vae``'s (the published SD-VAE ft-EMA), which training says once in its log.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from reglue.integrity import DamagedFileError, crc_mismatch, verify_crc32

FORMAT = "reglue-shards"
FORMAT_VERSION = 1
SHARDS_DIR = "shards"
SHARD_DONE = "shard.json"
SAMPLE_CHECKSUMS = "checksums.npy"
INDEX_FILES = ("offsets.npy", "labels.npy", SAMPLE_CHECKSUMS, "sources.txt")
"""The files of a shard whose CRC-32 ``shard.json`` records (verified at open)."""
MOMENT_CHANNELS = 8


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or inconsistent; the message names the file."""


def decode_image(data) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 (3, H, W), RGB, decoded by PIL (libjpeg-turbo)."""
    from PIL import Image

    with Image.open(io.BytesIO(memoryview(data))) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset over encoded images: ``dataset[i] -> (image uint8 (3, H, W), label,
    moments float32 (8, h, w))``, or ``(image, label)`` without stored moments.

    Subclasses provide ``encoded(i)`` (the file bytes, for DALI), ``moments(i)`` and ``labels``.
    """

    labels: np.ndarray
    image_size: int
    num_classes: int
    has_moments: bool
    root: Path
    vae: Optional[str] = None
    """The VAE the stored moments were computed with, as named at preparation; None: not recorded."""
    vae_sha256: Optional[str] = None
    """Fingerprint of that VAE's weights (``reglue.models.state.weights_fingerprint``); None: not recorded."""

    def __len__(self) -> int:
        return len(self.labels)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples in {self.root}")
        return index

    def label(self, index: int) -> int:
        return int(self.labels[self._check_index(index)])

    def encoded(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def moments(self, index: int) -> Optional[np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int):
        index = self._check_index(index)
        image = decode_image(self.encoded(index))
        if tuple(image.shape) != (3, self.image_size, self.image_size):
            raise DatasetError(f"{self.describe(index)}: decoded to {tuple(image.shape)}, expected (3, {self.image_size}, {self.image_size})")
        label = int(self.labels[index])
        if not self.has_moments:
            return image, label
        return image, label, torch.from_numpy(np.array(self.moments(index), dtype=np.float32))

    def describe(self, index: int) -> str:
        """Where sample ``index`` is stored (for error messages)."""
        return f"{self.root} sample {index}"


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a :class:`DatasetError` naming the file."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _field(path: Path, obj: dict, key: str, kind: type, where: str = ""):
    """``obj[key]`` checked to be a ``kind`` (int: a whole number; bool is not), else one clear error."""
    value = obj.get(key)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        got = "missing" if key not in obj else _json_type(value)
        raise DatasetError(f"{path}: {where}{key!r} must be {_json_type(kind())}, got {got}")
    return value


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc})") from None


class ShardDataset(EncodedDataset):
    """Random-access reader of a ``reglue prepare`` output directory (see the module docstring).

    verify: check every shard against ``dataset.json`` at open (files present, array shapes,
        byte counts, label range); a mismatch raises :class:`DatasetError` naming the file.
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        meta = _load_json(self.root / "dataset.json")
        if meta.get("format") != FORMAT:
            raise DatasetError(f"{self.root / 'dataset.json'}: not a reglue shard dataset (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{self.root / 'dataset.json'}: format version {meta.get('version')}, this reader reads {FORMAT_VERSION}")
        self.meta = meta
        path = self.root / "dataset.json"
        self.image_size = _field(path, meta, "image_size", int)
        self.latent_size = _field(path, meta, "latent_size", int)
        self.num_classes = _field(path, meta, "num_classes", int)
        self.has_moments = meta.get("vae") is not None
        if self.has_moments:
            self.vae = _field(path, meta, "vae", str)
            self.vae_sha256 = _field(path, meta, "vae_sha256", str) if meta.get("vae_sha256") is not None else None
        shards = _field(path, meta, "shards", list)
        for k, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise DatasetError(f"{path}: shards[{k}] must be an object, got {_json_type(shard)}")
            _field(path, shard, "name", str, f"shards[{k}].")
            _field(path, shard, "num_samples", int, f"shards[{k}].")
        self.shard_names = [s["name"] for s in shards]
        counts = np.array([s["num_samples"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if int(self.starts[-1]) != _field(path, meta, "num_samples", int):
            raise DatasetError(f"{self.root / 'dataset.json'}: shard counts sum to {int(self.starts[-1])}, num_samples says {meta['num_samples']}")
        if int(self.starts[-1]) == 0:
            skipped = meta.get("num_skipped") or 0
            why = f": all {skipped} source files were unreadable (listed in {self.root / 'report.json'})" if skipped else ""
            raise DatasetError(f"{self.root}: the prepared dataset holds no samples{why}")
        if verify:
            for k in range(len(counts)):
                self._verify_index_files(k)
        self._offsets = [_load_npy(self._file(k, "offsets.npy")) for k in range(len(counts))]
        self._checksums = [_load_npy(self._file(k, SAMPLE_CHECKSUMS)) if self._file(k, SAMPLE_CHECKSUMS).is_file() else None
                           for k in range(len(counts))]
        labels = [_load_npy(self._file(k, "labels.npy")) for k in range(len(counts))]
        if verify:
            self._verify(counts, labels)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self._handles: Dict[int, tuple] = {}
        self._pid = None

    def _file(self, shard: int, name: str) -> Path:
        return self.root / SHARDS_DIR / self.shard_names[shard] / name

    def _verify_index_files(self, shard: int) -> None:
        """The index files against the CRC-32 in ``shard.json`` (none recorded: prepared before checksums)."""
        done = self._file(shard, SHARD_DONE)
        if not done.is_file():
            raise DatasetError(f"{done}: missing (shard not finished; re-run `reglue prepare`)")
        recorded = _load_json(done).get("crc32")
        if recorded is None:
            return
        for name in INDEX_FILES:
            path = self._file(shard, name)
            try:
                expected = int(recorded[name], 16)
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{done}: its crc32 record lacks or garbles {name}") from None
            if not path.is_file():
                raise DatasetError(f"{path}: missing")
            try:
                verify_crc32(path, expected, "the file")
            except DamagedFileError as exc:
                raise DatasetError(f"{exc}: prepare the dataset again") from None

    def _check_sample(self, index: int, shard: int, local: int, column: int, data) -> None:
        """Sample bytes against their CRC-32 in ``checksums.npy`` (column 0: JPEG, 1: moments)."""
        checksums = self._checksums[shard]
        if checksums is None:
            return
        expected, actual = int(checksums[local, column]), zlib.crc32(data)
        if actual != expected:
            file, what = ("images.bin", "the JPEG") if column == 0 else ("moments.npy", "the moments row")
            raise DatasetError(f"{self._file(shard, file)} sample {local} (global {index}): "
                               f"{crc_mismatch(what, actual, expected)}; prepare the dataset again")

    def _verify(self, counts: np.ndarray, labels: List[np.ndarray]) -> None:
        for k, n in enumerate(counts):
            n = int(n)
            offsets = self._offsets[k]
            if offsets.shape != (n + 1,) or (n and (offsets[0] != 0 or np.any(np.diff(offsets) <= 0))):
                raise DatasetError(f"{self._file(k, 'offsets.npy')}: expected {n + 1} increasing offsets from 0, got shape {offsets.shape}")
            size = self._file(k, "images.bin").stat().st_size if self._file(k, "images.bin").is_file() else None
            if size is None:
                raise DatasetError(f"{self._file(k, 'images.bin')}: missing")
            if size != int(offsets[-1]):
                raise DatasetError(f"{self._file(k, 'images.bin')}: {size} bytes, offsets.npy says {int(offsets[-1])}")
            if labels[k].shape != (n,):
                raise DatasetError(f"{self._file(k, 'labels.npy')}: shape {labels[k].shape}, dataset.json says {n} samples")
            if n and (labels[k].min() < 0 or labels[k].max() >= self.num_classes):
                raise DatasetError(f"{self._file(k, 'labels.npy')}: labels outside [0, {self.num_classes})")
            if self.has_moments:
                moments = _load_npy(self._file(k, "moments.npy"), mmap=True)
                want = (n, MOMENT_CHANNELS, self.latent_size, self.latent_size)
                if moments.shape != want or moments.dtype != np.float32:
                    raise DatasetError(f"{self._file(k, 'moments.npy')}: {moments.dtype} {moments.shape}, expected float32 {want}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None  # memory maps are reopened in the reading process
        return state

    def _open(self, shard: int) -> tuple:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            images = np.memmap(self._file(shard, "images.bin"), dtype=np.uint8, mode="r") if self._offsets[shard][-1] else np.zeros(0, np.uint8)
            moments = _load_npy(self._file(shard, "moments.npy"), mmap=True) if self.has_moments else None
            self._handles[shard] = (images, moments)
        return self._handles[shard]

    def locate(self, index: int) -> Tuple[int, int]:
        """Global index -> (shard number, index within the shard)."""
        index = self._check_index(index)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def encoded(self, index: int) -> np.ndarray:
        shard, local = self.locate(index)
        offsets = self._offsets[shard]
        data = self._open(shard)[0][offsets[local] : offsets[local + 1]]
        self._check_sample(index, shard, local, 0, data)
        return data

    def moments(self, index: int) -> Optional[np.ndarray]:
        if not self.has_moments:
            return None
        shard, local = self.locate(index)
        row = self._open(shard)[1][local]
        self._check_sample(index, shard, local, 1, row)
        return row

    def describe(self, index: int) -> str:
        shard, local = self.locate(index)
        return f"{self._file(shard, 'images.bin')} sample {local} (global {index})"


# ------------------------------------------------------------------------------------------------
# Published layout
# ------------------------------------------------------------------------------------------------


def _relative_files(folder: Path, suffixes: Tuple[str, ...]) -> List[str]:
    found = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(suffixes):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(found)


class PublishedDataset(EncodedDataset):
    """The published REPA/REGLUE layout (``images/``, ``vae-sd/``, ``vae-sd/dataset.json``), read in
    place: sample i = the i-th image and the i-th moments file in sorted order, label from
    ``vae-sd/dataset.json`` keyed by the moments file name."""

    IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.features_dir = self.root / "vae-sd"
        for folder in (self.images_dir, self.features_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: missing (the published layout has images/ and vae-sd/)")
        image_files = _relative_files(self.images_dir, self.IMAGE_SUFFIXES)
        feature_files = _relative_files(self.features_dir, (".npy",))
        if len(image_files) != len(feature_files):
            raise DatasetError(f"{self.images_dir} has {len(image_files)} images but {self.features_dir} has "
                               f"{len(feature_files)} moments files")
        if not image_files:
            raise DatasetError(f"{self.images_dir}: no images")
        labels_file = self.features_dir / "dataset.json"
        entries = _field(labels_file, _load_json(labels_file), "labels", list)
        pair = lambda e: isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)  # noqa: E731
        bad = next((e for e in entries if not pair(e)), None)
        if bad is not None:
            raise DatasetError(f"{labels_file}: each label must be [\"FILE.npy\", CLASS_INDEX], got {json.dumps(bad)[:80]}")
        by_name = {name.replace("\\", "/"): label for name, label in entries}
        missing = [f for f in feature_files if f not in by_name]
        if missing:
            raise DatasetError(f"{labels_file}: no label for {len(missing)} moments files, e.g. {missing[0]}")
        self.labels = np.array([int(by_name[f]) for f in feature_files], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        first = _load_npy(self.features_dir / feature_files[0], mmap=True)
        if first.ndim != 3 or first.shape[0] != MOMENT_CHANNELS or first.shape[1] != first.shape[2]:
            raise DatasetError(f"{self.features_dir / feature_files[0]}: shape {first.shape}, expected (8, h, h)")
        # byte-string arrays: 1.28 M names stay small in memory and when pickled to DALI workers
        self.image_files = np.array([f.encode() for f in image_files], dtype=bytes)
        self.feature_files = np.array([f.encode() for f in feature_files], dtype=bytes)
        self.latent_size = int(first.shape[1])
        self.image_size = 8 * self.latent_size
        self.has_moments = True
        self.meta = {"format": "published", "num_samples": len(self.labels), "num_classes": self.num_classes,
                     "image_size": self.image_size, "latent_size": self.latent_size}

    def encoded(self, index: int) -> np.ndarray:
        return np.fromfile(self.images_dir / self.image_files[self._check_index(index)].decode(), dtype=np.uint8)

    def moments(self, index: int) -> np.ndarray:
        path = self.features_dir / self.feature_files[self._check_index(index)].decode()
        moments = _load_npy(path)
        if moments.shape != (MOMENT_CHANNELS, self.latent_size, self.latent_size):
            raise DatasetError(f"{path}: shape {moments.shape}, expected {(MOMENT_CHANNELS, self.latent_size, self.latent_size)}")
        return moments

    def describe(self, index: int) -> str:
        return str(self.images_dir / self.image_files[index].decode())


def peek_image_size(path: str | os.PathLike) -> Optional[int]:
    """The image side of a dataset directory, read cheaply (its dataset.json, or the first moments
    file of the published layout); None when it cannot be told (``open_data_dir`` explains why)."""
    root = Path(path)
    try:
        if (root / "dataset.json").is_file():
            size = _load_json(root / "dataset.json").get("image_size")
            return size if isinstance(size, int) and not isinstance(size, bool) else None
        for dirpath, dirs, files in os.walk(root / "vae-sd"):
            dirs.sort()
            first = next((f for f in sorted(files) if f.endswith(".npy")), None)
            if first is not None:
                return 8 * int(_load_npy(Path(dirpath) / first, mmap=True).shape[-1])
    except DatasetError:
        return None
    return None


def open_data_dir(path: str | os.PathLike) -> EncodedDataset:
    """A ``reglue prepare`` directory or the published layout, detected from its files."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if (root / "dataset.json").is_file():
        return ShardDataset(root)
    if (root / "vae-sd" / "dataset.json").is_file():
        return PublishedDataset(root)
    if (root / SHARDS_DIR).is_dir() or (root / "prepare.json").is_file():
        raise DatasetError(f"{root / 'dataset.json'}: missing; preparation did not finish (re-run `reglue prepare` to complete it)")
    raise DatasetError(f"{root}: neither a prepared dataset (dataset.json) nor the published layout "
                       "(images/ + vae-sd/dataset.json); create one with `reglue prepare`")
