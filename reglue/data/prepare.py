"""``reglue prepare``: an ImageFolder tree or a labelled file list -> JPEG shards + SD-VAE moments.

Per source image: open with PIL (any format PIL reads: JPEG, PNG, WebP, grayscale, CMYK,
palette, ...), convert to RGB (PIL's conversion; alpha dropped, EXIF orientation ignored, as in
the published pipeline), ADM centre crop to ``image_size`` (the guided-diffusion / REPA crop:
halve with a box filter while the short side is >= 2x the target, bicubic resize of the short
side to the target, centre crop), optionally also its horizontal flip; each picture is
JPEG-encoded (quality 95, 4:4:4, baseline: decodable by the GPU hardware decoder) and decoded
back, and the VAE moments are computed from those decoded pixels (see ``reglue.data.shards``
for the format and why JPEG).

Work split: the sorted input listing is cut into shards of ``shard_size`` sources; shard k is
prepared by rank ``k % world_size`` (torchrun's RANK/WORLD_SIZE, or ``--rank/--world-size``).
Within a rank, DataLoader workers decode, crop and JPEG-encode; the main process runs the VAE
on its GPU (or the CPU) in batches. A shard is written to a temporary folder and renamed when
complete, so an interrupted run resumes by re-running the same command: finished shards are
skipped. Files PIL cannot read are skipped, counted and listed in ``report.json``. When every
shard is done, rank 0 writes ``dataset.json`` (counts, classes, latent statistics).

Which VAE. Each shard records the fingerprint of the VAE weights that computed its moments
(``reglue.models.state.weights_fingerprint``, in ``shard.json``); ``dataset.json`` keeps the VAE's
name and that fingerprint (``vae``, ``vae_sha256``), refusing to finish a dataset whose shards
were encoded by different VAEs (a resume with other weights under the same name). Training checks
the fingerprint against its ``encoders.vae`` (``reglue.data.check_dataset_vae``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reglue.data.shards import (FORMAT, FORMAT_VERSION, INDEX_FILES, MOMENT_CHANNELS, SAMPLE_CHECKSUMS, SHARD_DONE,
                                SHARDS_DIR, DatasetError)
from reglue.integrity import crc32_file
from reglue.models.state import weights_fingerprint
from reglue.outputs import (add_overwrite_flag, check_same_settings, ensure_resumable_dir, removed_on_failure,
                            write_json_atomic)
from reglue.runtime import WORKERS_HELP, default_workers, progress_bar

log = logging.getLogger("reglue.prepare")

JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif")


@dataclass(frozen=True)
class PrepareOptions:
    """What determines the output; stored in ``prepare.json`` so a resumed run must match it."""

    image_size: int = 256
    """Side of the stored square images (256 or 512 for ImageNet; any multiple of 16)."""
    flip: bool = False
    """Also store the horizontal flip of every image (with its own moments)."""
    vae: Optional[str] = "stabilityai/sd-vae-ft-ema"
    """diffusers hub name, local folder, ``tiny-random`` (tests), or None: store no moments."""
    vae_seed: int = 0
    """Seed of the ``tiny-random`` VAE (must equal the training run's ``train.seed``)."""
    jpeg_quality: int = JPEG_QUALITY
    shard_size: int = 1000
    """Source images per shard."""

    def __post_init__(self):
        if self.image_size <= 0 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")


# ------------------------------------------------------------------------------------------------
# Input listing
# ------------------------------------------------------------------------------------------------


def list_image_folder(root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """ImageFolder tree -> ([(path relative to root, label)], {class name: label}).

    Classes are the sorted sub-folder names; images are found recursively in each and sorted.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--source {root}: no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--source {root}: no class sub-folders (expected ROOT/<class>/<image>)")
    sources = []
    for label, name in enumerate(classes):
        for dirpath, dirs, files in os.walk(root / name):
            dirs.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    sources.append((os.path.relpath(os.path.join(dirpath, file), root).replace(os.sep, "/"), label))
    sources.sort()
    return sources, {name: i for i, name in enumerate(classes)}


def read_file_list(list_file: str | os.PathLike) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """A text file of ``PATH LABEL`` lines -> ([(path, label)], {class name: label}).

    The label is the last tab- or space-separated field, so paths may contain spaces; blank lines
    and ``#`` comments are ignored. Paths are relative to ``--source`` (or absolute). LABEL is an
    integer class index, or a class name (names are then sorted and numbered)."""
    rows = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path, sep, label = line.rpartition("\t") if "\t" in line else line.strip().rpartition(" ")
            if not sep or not path.strip():
                raise ValueError(f"{list_file}:{lineno}: expected 'PATH LABEL', got {line!r}")
            rows.append((path.strip(), label.strip()))
    if not rows:
        raise ValueError(f"{list_file}: no entries")
    if all(label.lstrip("-").isdigit() for _, label in rows):
        sources = [(path, int(label)) for path, label in rows]
        if min(label for _, label in sources) < 0:
            raise ValueError(f"{list_file}: negative label")
        classes = {str(i): i for i in range(max(label for _, label in sources) + 1)}
    else:
        classes = {name: i for i, name in enumerate(sorted({label for _, label in rows}))}
        sources = [(path, classes[label]) for path, label in rows]
    return sources, classes


# ------------------------------------------------------------------------------------------------
# Per-image work (DataLoader workers)
# ------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM centre crop (guided-diffusion ``image_datasets.py``, as used by REPA/REGLUE): RGB PIL
    image -> uint8 (image_size, image_size, 3)."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def jpeg_roundtrip(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> Tuple[bytes, np.ndarray]:
    """uint8 (H, W, 3) -> (baseline 4:4:4 JPEG bytes, the pixels those bytes decode to)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        decoded = np.asarray(img.convert("RGB")).copy()
    return data, decoded


class _SourceImages(torch.utils.data.Dataset):
    """Source k -> {"path", "label", "pictures": [(jpeg bytes, decoded HWC uint8, flipped)], "error"}."""

    def __init__(self, root: Path, sources: Sequence[Tuple[str, int]], options: PrepareOptions):
        self.root, self.sources, self.options = root, sources, options

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, k: int) -> dict:
        from PIL import Image

        path, label = self.sources[k]
        record = {"path": path, "label": label, "pictures": [], "error": None}
        try:
            with Image.open(self.root / path) as img:
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
            crop = center_crop_arr(img, self.options.image_size)
            variants = [(crop, False)] + ([(np.ascontiguousarray(crop[:, ::-1]), True)] if self.options.flip else [])
            for pixels, flipped in variants:
                data, decoded = jpeg_roundtrip(pixels, self.options.jpeg_quality)
                record["pictures"].append((data, decoded, flipped))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and reported, never fatal
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["pictures"] = []
        return record


def _identity(batch):
    return batch


# ------------------------------------------------------------------------------------------------
# Shard writing
# ------------------------------------------------------------------------------------------------


class _MomentStats:
    """Per-channel statistics of the latent z = mean + std * eps: Var z = Var(mean) + E[std^2]."""

    def __init__(self):
        from reglue.models.encoders import RunningMoments

        self.mean = RunningMoments()
        self.std_sq_sum = None

    def update(self, moments: torch.Tensor) -> None:
        mean, std = moments.double().chunk(2, dim=1)
        self.mean.update(mean)
        sq = std.square().sum(dim=(0, 2, 3))
        self.std_sq_sum = sq if self.std_sq_sum is None else self.std_sq_sum + sq

    def to_json(self) -> Optional[dict]:
        if self.mean.count == 0:
            return None
        return {"count": self.mean.count, "mean": self.mean.mean.tolist(), "m2": self.mean.m2.tolist(),
                "std_sq_sum": self.std_sq_sum.tolist()}


def _latent_stats(parts: List[Optional[dict]]) -> Optional[dict]:
    from reglue.models.encoders import RunningMoments

    total, std_sq = RunningMoments(), None
    for part in parts:
        if part is None:
            continue
        total.merge(RunningMoments(part["count"], torch.tensor(part["mean"], dtype=torch.float64),
                                   torch.tensor(part["m2"], dtype=torch.float64)))
        sq = torch.tensor(part["std_sq_sum"], dtype=torch.float64)
        std_sq = sq if std_sq is None else std_sq + sq
    if total.count == 0:
        return None
    var = total.m2 / total.count + std_sq / total.count
    return {"mean": total.mean.tolist(), "std": var.sqrt().tolist(),
            "note": "per channel of z = mean + std * eps (unscaled SD-VAE latents; the model uses z * 0.18215)"}


class ShardWriter:
    """Writes one shard into a temporary folder; :meth:`close` renames it into place."""

    def __init__(self, out: Path, name: str, latent_size: Optional[int]):
        self.final = out / SHARDS_DIR / name
        self.tmp = out / SHARDS_DIR / f".tmp-{name}-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.images = open(self.tmp / "images.bin", "wb")
        self.offsets, self.labels, self.sources, self.moments, self.image_crcs = [0], [], [], [], []
        self.latent_size = latent_size
        self.stats = _MomentStats()

    def add(self, data: bytes, label: int, source: str, moments: Optional[torch.Tensor]) -> None:
        self.images.write(data)
        self.image_crcs.append(zlib.crc32(data))
        self.offsets.append(self.offsets[-1] + len(data))
        self.labels.append(label)
        self.sources.append(source)
        if moments is not None:
            self.moments.append(moments)

    def close(self, info: dict) -> dict:
        """Write the shard's arrays and ``shard.json`` (``info`` plus counts, moment statistics and
        the CRC-32 of its index files), then rename the shard into place."""
        self.images.close()
        np.save(self.tmp / "offsets.npy", np.array(self.offsets, dtype=np.int64))
        np.save(self.tmp / "labels.npy", np.array(self.labels, dtype=np.int64))
        checksums = np.zeros((len(self.labels), 2), dtype=np.uint32)
        checksums[:, 0] = self.image_crcs
        if self.latent_size is not None:
            shape = (0, MOMENT_CHANNELS, self.latent_size, self.latent_size)
            moments = torch.stack(self.moments) if self.moments else torch.zeros(shape)
            self.stats.update(moments)
            moments = moments.numpy().astype(np.float32)
            checksums[:, 1] = [zlib.crc32(row) for row in moments]
            np.save(self.tmp / "moments.npy", moments)
        np.save(self.tmp / SAMPLE_CHECKSUMS, checksums)
        (self.tmp / "sources.txt").write_text("".join(s + "\n" for s in self.sources))
        info = dict(info, num_samples=len(self.labels), latent_moments=self.stats.to_json(),
                    crc32={name: f"{crc32_file(self.tmp / name):08x}" for name in INDEX_FILES})
        (self.tmp / SHARD_DONE).write_text(json.dumps(info, indent=1))
        if self.final.exists():  # an unfinished leftover (no shard.json): replace it
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return info


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _shard_name(k: int) -> str:
    return f"{k:05d}"


def _fingerprint(sources: Sequence[Tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for path, label in sources:
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()


def _check_recipe(out: Path, recipe: dict) -> None:
    """First run: store the recipe; a re-run must use the same input and settings."""
    path = out / "prepare.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc}); use a new --out directory") from None
        if not isinstance(old, dict):
            raise DatasetError(f"{path}: expected a JSON object; use a new --out directory")
        check_same_settings(f"--out {out}", old, recipe)
    else:
        write_json_atomic(path, recipe)


def _env_rank() -> Tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _encode_batch(vae, pending: list, device: torch.device) -> List[Optional[torch.Tensor]]:
    if vae is None:
        return [None] * len(pending)
    pixels = torch.stack([torch.from_numpy(p[1]).permute(2, 0, 1) for p in pending]).to(device)
    return list(vae.encode_moments(pixels).float().cpu())


def _prepare_shards(out: Path, todo: List[int], shards: Dict[int, list], root: Path, options: PrepareOptions, vae, device,
                    num_workers: int, batch_size: int, bar) -> None:
    """Write the shards ``todo`` in order; one DataLoader streams all their sources, so the
    workers stay busy across shard boundaries. Each shard records ``vae``'s fingerprint."""
    vae_sha256 = weights_fingerprint(vae.state_dict()) if vae is not None else None
    latent_size = options.image_size // 8 if vae is not None else None
    flat = [source for k in todo for source in shards[k]]
    loader = torch.utils.data.DataLoader(_SourceImages(root, flat, options), batch_size=None, num_workers=num_workers,
                                         collate_fn=_identity, prefetch_factor=8 if num_workers else None)
    records = iter(loader)
    for k in todo:
        writer, skipped, pending = ShardWriter(out, _shard_name(k), latent_size), [], []

        def flush():
            if not pending:  # the last batch was full, or every file of the shard was unreadable
                return
            for (data, _pixels, label, name), moments in zip(pending, _encode_batch(vae, pending, device)):
                writer.add(data, label, name, moments)
            pending.clear()

        for _ in shards[k]:
            record = next(records)
            if record["error"] is not None:
                skipped.append({"path": record["path"], "error": record["error"]})
                log.warning("skipping %s: %s", record["path"], record["error"])
            for data, decoded, flipped in record["pictures"]:
                pending.append((data, decoded, record["label"], record["path"] + ("\tflip" if flipped else "")))
            if len(pending) >= batch_size:
                flush()
            bar.update(1)
        flush()
        writer.close({"shard": k, "num_sources": len(shards[k]), "first_source": shards[k][0][0] if shards[k] else None,
                      "skipped": skipped, "vae_sha256": vae_sha256})


def _read_shard_info(path: Path) -> Optional[dict]:
    """A finished shard's ``shard.json``; None when the shard is unfinished, or its record is
    unreadable (then the shard is prepared again)."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is unreadable (%s): the shard is prepared again", path, exc)
        return None
    if not isinstance(info, dict) or not all(k in info for k in ("num_samples", "num_sources", "skipped", "latent_moments")):
        log.warning("%s is not a shard record: the shard is prepared again", path)
        return None
    return info


def _done_shards(out: Path, num_shards: int) -> List[Optional[dict]]:
    return [_read_shard_info(out / SHARDS_DIR / _shard_name(k) / SHARD_DONE) for k in range(num_shards)]


def _dataset_vae_fingerprint(out: Path, infos: List[dict]) -> Optional[str]:
    """The fingerprint of the VAE every shard was encoded with; None without moments, or when a
    shard predates fingerprints (the dataset is then known by the VAE's name only). Shards of
    different VAEs are an error naming them."""
    by_digest: Dict[Optional[str], List[str]] = {}
    for k, info in enumerate(infos):
        by_digest.setdefault(info.get("vae_sha256"), []).append(_shard_name(k))
    known = [d for d in by_digest if d]
    if len(known) > 1:
        groups = "; ".join(f"shards {', '.join(by_digest[d][:5])}{' ...' if len(by_digest[d]) > 5 else ''} by sha256 {d[:12]}"
                           for d in known)
        raise DatasetError(f"{out / SHARDS_DIR}: shards were encoded by {len(known)} different VAEs ({groups}): delete "
                           "the shards of the wrong VAE and run the same command again, or prepare into a new --out")
    return known[0] if known and None not in by_digest else None


def finalize(out: str | os.PathLike, num_shards: int, classes: Dict[str, int], options: PrepareOptions) -> dict:
    """Write dataset.json and report.json once every shard is complete."""
    out = Path(out)
    infos = _done_shards(out, num_shards)
    missing = [_shard_name(k) for k, info in enumerate(infos) if info is None]
    if missing:
        raise DatasetError(f"{out / SHARDS_DIR}: shards not finished: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    vae_sha256 = _dataset_vae_fingerprint(out, infos)
    skipped = [item for info in infos for item in info["skipped"]]
    num_samples = sum(info["num_samples"] for info in infos)
    num_sources = sum(info["num_sources"] for info in infos)
    report = {"num_sources": num_sources, "num_read": num_sources - len(skipped), "num_samples": num_samples,
              "num_skipped": len(skipped), "skipped": skipped}
    write_json_atomic(out / "report.json", report)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_samples": num_samples,
        "num_sources": num_sources,
        "num_skipped": len(skipped),
        "image_size": options.image_size,
        "latent_size": options.image_size // 8,
        "num_classes": len(classes),
        "classes": classes,
        "vae": options.vae,
        "vae_sha256": vae_sha256,
        "jpeg": {"quality": options.jpeg_quality, "subsampling": "4:4:4", "decoded_with": "libjpeg-turbo (PIL)"},
        "flip": options.flip,
        "crop": "ADM centre crop",
        "latent_stats": _latent_stats([info["latent_moments"] for info in infos]),
        "shards": [{"name": _shard_name(k), "num_samples": info["num_samples"]} for k, info in enumerate(infos)],
    }
    write_json_atomic(out / "dataset.json", meta)
    return meta


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: PrepareOptions = PrepareOptions(),
    *,
    file_list: Optional[str | os.PathLike] = None,
    num_workers: int = 4,
    batch_size: int = 64,
    overwrite: bool = False,
    device: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    wait_seconds: Optional[float] = None,
    progress: bool = True,
) -> Optional[dict]:
    """Prepare ``source`` into ``out``; returns dataset.json's content on rank 0 (None elsewhere).

    file_list: a ``PATH LABEL`` list (paths relative to ``source``) instead of an ImageFolder tree.
    rank, world_size: this process's share (default: torchrun's RANK / WORLD_SIZE, else 0 / 1).
    wait_seconds: how long rank 0 waits for the other ranks' shards before giving up (None: forever).
    overwrite: move an existing ``out`` aside and start afresh (one process only).
    """
    env_rank, env_world, local_rank = _env_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    if overwrite and world_size > 1:
        raise ValueError("--overwrite with several processes: move --out aside first (each rank would move it)")
    root, out = Path(source), Path(out)
    with removed_on_failure():  # a failed start (the source, settings, the VAE) leaves no new folder behind
        ensure_resumable_dir(out, "--out", overwrite, (out / "prepare.json").is_file(), "a dataset of reglue prepare")
        sources, classes = read_file_list(file_list) if file_list else list_image_folder(root)
        if not sources:
            raise DatasetError(f"{f'--file-list {file_list}' if file_list else f'--source {root}'}: no images to prepare")
        recipe = {"options": asdict(options), "num_sources": len(sources), "inputs_sha256": _fingerprint(sources),
                  "classes": classes}
        num_shards = max(1, -(-len(sources) // options.shard_size))
        shards = {k: sources[k * options.shard_size : (k + 1) * options.shard_size] for k in range(num_shards)}
        _check_recipe(out, recipe)
        done = _done_shards(out, num_shards)
        mine = [k for k in range(num_shards) if k % world_size == rank and done[k] is None]
        finished = sum(info is not None for info in done)
        if rank == 0:
            log.info("prepare: %d sources in %d classes -> %d shards in %s (%d already finished); this rank: %d shards",
                     len(sources), len(classes), num_shards, out, finished, len(mine))
        vae = None
        if mine:
            if device is None:
                device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            device = torch.device(device)
            if options.vae is not None:
                from reglue.models.encoders import build_vae

                vae = build_vae(options.vae, seed=options.vae_seed).to(device)

    if mine:
        with progress_bar(progress and rank == 0, total=sum(len(shards[k]) for k in mine), unit="img",
                          desc=f"prepare (rank 0 of {world_size})") as bar:
            _prepare_shards(out, mine, shards, root, options, vae, device, num_workers, batch_size, bar)

    if rank != 0:
        return None
    start = time.monotonic()
    while True:
        pending = [k for k, info in enumerate(_done_shards(out, num_shards)) if info is None]
        if not pending:
            break
        if wait_seconds is not None and time.monotonic() - start > wait_seconds:
            raise TimeoutError(f"{len(pending)} shards still unfinished after {wait_seconds:.0f} s, e.g. {_shard_name(pending[0])}; "
                               "re-run the same command to complete them")
        time.sleep(5.0)
    meta = finalize(out, num_shards, classes, options)
    log.info("prepare: %d samples from %d sources written to %s; %d files skipped (see %s)",
             meta["num_samples"], meta["num_sources"], out, meta["num_skipped"], out / "report.json")
    return meta


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="ImageFolder tree or file list -> JPEG shards + SD-VAE moments (resumable; torchrun for multi-GPU)",
        description="Prepare a dataset for training. Re-running the same command resumes (finished shards are skipped). "
        "Multi-GPU: torchrun --nproc_per_node=8 -m reglue.cli prepare ...",
    )
    p.add_argument("--source", help="ImageFolder root (ROOT/<class>/<image>), or the folder --file-list's paths are relative "
                   "to (default: the list's folder)")
    p.add_argument("--file-list", help="text file of 'PATH LABEL' lines (LABEL: class index or name) instead of class folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resolution", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="diffusers hub name, local folder, 'tiny-random' (tests), or 'none' (images only)")
    p.add_argument("--vae-seed", type=int, default=0, help="seed of the tiny-random VAE")
    p.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY,
                   help=f"quality of the stored JPEGs (4:4:4; default {JPEG_QUALITY})")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="decode/crop/encode processes per rank " + WORKERS_HELP.format(default_workers()))
    p.add_argument("--batch-size", type=int, default=64, help="VAE batch")
    p.add_argument("--device", help="VAE device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--rank", type=int, help="this process's rank when not launched by torchrun")
    p.add_argument("--world-size", type=int, help="number of processes when not launched by torchrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_flag(p)
    p.set_defaults(func=main)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.source is None and args.file_list is None:
        raise ValueError("give --source (an ImageFolder root) or --file-list")
    source = args.source if args.source is not None else str(Path(args.file_list).resolve().parent)
    options = PrepareOptions(image_size=args.resolution, flip=args.flip,
                             vae=None if args.vae.lower() == "none" else args.vae, vae_seed=args.vae_seed,
                             jpeg_quality=args.jpeg_quality, shard_size=args.shard_size)
    meta = prepare(source, args.out, options, file_list=args.file_list, num_workers=args.workers,
                   batch_size=args.batch_size, overwrite=args.overwrite, device=args.device, rank=args.rank, world_size=args.world_size,
                   progress=not args.no_progress)
    if meta is not None and meta["num_samples"] == 0:
        print(f"reglue prepare: error: none of the {meta['num_sources']} source files could be read (listed in "
              f"{Path(args.out) / 'report.json'}): {args.out} holds no samples", file=sys.stderr)
        return 2
    if meta is not None:
        print(f"prepared {meta['num_samples']} samples ({meta['num_classes']} classes, {meta['image_size']}px) in {args.out}; "
              f"{meta['num_skipped']} unreadable files skipped (listed in {Path(args.out) / 'report.json'})")
    return 0
