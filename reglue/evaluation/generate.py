"""``reglue generate``: many samples from a checkpoint into one ADM-format ``.npz``, on one process
or under torchrun, resumable and independent of the world size.

What a sample is. Samples are cut into blocks of ``batch_size`` (the samples one model call
takes). Block k draws, from ``seeded_generator(seed, k)`` on the sampling device and in this
order, its initial latent noise, its initial [CLS] noise, its labels (``random``), and then every
SDE noise draw of the sampler. ``balanced`` labels are not drawn: sample i has class
``i % num_classes``, so every class appears ``num / num_classes`` times (once more for the first
``num % num_classes`` classes). The last block is sampled at full size and cut, so every block
has the same shapes and sample i depends on (weights, sampler settings, seed, batch size, i)
only: not on the number of processes, on interruptions, or on ``num``. Blocks are dealt to ranks
round-robin. On the CPU, 1 and 2 processes give bit-identical arrays; on GPUs the same up to
floating-point reordering (the random streams are the device's, so a CPU run and a GPU run draw
different samples).

Where they go. Each finished block is written to ``OUT.parts/block-KKKKKK.npz`` atomically
(a temporary file renamed when complete); running the same command again skips finished blocks,
so a killed run loses at most the block each rank was sampling. ``OUT.parts/manifest.json``
records what the blocks are (weights hash, sampler settings, seed, batch size, labels, device
type); a run with other settings refuses to mix its blocks in. When all blocks exist, rank 0
streams them into ``OUT`` (``arr_0``: uint8 (N, H, W, 3), ``arr_1``: int64 (N,) labels, the ADM
convention), one block in memory at a time, writes the manifest next to it as ``OUT.json`` and
removes ``OUT.parts``. ``--png DIR`` also writes ``DIR/NNNNNN.png`` (a background thread, so it
overlaps the sampling).

Speed. bf16 autocast on CUDA (the sampler state stays in float64), the fused Triton kernels and
the best attention backend, ``torch.compile`` of every SiT block (one graph per batch shape,
shared by all blocks), the unconditional half only inside the guidance interval (the sampler's
rule), the VAE decode batched, no host synchronisation inside the sampling loop.

Python API (what an in-training evaluation calls): :class:`ImageSampler` (``from_state``: a
run config and EMA weights -> a sampler on a device), :class:`BlockPlan` (which samples, their
seeds and labels), :func:`iter_blocks` and :func:`generate_share` (one rank's share of N
samples as uint8 arrays in memory), :func:`sample_grid` (the image grid of the trainer and
``reglue sample``). :func:`add_sample_arguments` / :func:`sample_overrides` turn every field of
``reglue.config.SampleConfig`` into a command-line flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import textwrap
import time
import typing
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reglue.config import Config, SampleConfig, apply_overrides, parse_set_items
from reglue.diffusion.samplers import sample
from reglue.evaluation.reference import NpzWriter
from reglue.integrity import DamagedFileError, load_safetensors
from reglue.models.state import weights_fingerprint
from reglue.outputs import (OutputError, add_overwrite_flag, atomic_path, check_same_settings, ensure_output_dir,
                            ensure_output_file, human_bytes, removed_on_failure, write_json_atomic)
from reglue.runtime import progress_bar, seeded_generator

log = logging.getLogger("reglue.generate")

LABEL_MODES = ("balanced", "random")
MANIFEST_VERSION = 1

# --------------------------------------------------------------------------------------------
# Sampler flags: one per field of SampleConfig
# --------------------------------------------------------------------------------------------


def _field_docs(cls) -> Dict[str, str]:
    """The docstring written under each field of a dataclass (for --help), from its source."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):  # source not shipped: flags without help text
        return {}
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """A ``--<field-with-dashes>`` flag for every field of :class:`SampleConfig` (so a new field
    gets its flag without code here); unset flags keep the config's value. Fixed-length tuples
    take that many values (``--guidance-interval LOW HIGH``), booleans ``--x/--no-x``, the rest
    one value parsed by the field's type (``none`` for an optional field)."""
    group = parser.add_argument_group("sampler (default: the config's `sample` section)")
    docs = _field_docs(SampleConfig)
    hints = typing.get_type_hints(SampleConfig)
    for f in dataclasses.fields(SampleConfig):
        kind = hints[f.name]
        args = typing.get_args(kind)
        help_text = (docs.get(f.name, "") + f" (default: sample.{f.name} of the config)").strip().replace("%", "%%")
        flag, dest = "--" + f.name.replace("_", "-"), "sample_" + f.name
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is tuple and args and Ellipsis not in args:
            group.add_argument(flag, dest=dest, nargs=len(args), type=args[0], default=None,
                               metavar=tuple(a.__name__.upper() for a in args), help=help_text)
        else:
            group.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=help_text)


def sample_overrides(args: argparse.Namespace) -> Dict[str, object]:
    """``{"sample.<field>": value}`` for the sampler flags given; apply with
    :func:`reglue.config.apply_overrides` (which parses and validates them)."""
    overrides = {}
    for f in dataclasses.fields(SampleConfig):
        value = getattr(args, "sample_" + f.name, None)
        if value is not None:
            overrides[f"sample.{f.name}"] = tuple(value) if isinstance(value, list) else value
    return overrides


# --------------------------------------------------------------------------------------------
# Which samples: blocks, seeds, labels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """``num`` samples in blocks of ``batch_size``; block k is seeded by (seed, k).

    Sample i is row ``i % batch_size`` of block ``i // batch_size``. The last block is drawn at
    full size and cut to ``rows(k)``.
    """

    num: int
    batch_size: int
    seed: int
    num_classes: int
    labels: str = "balanced"

    def __post_init__(self):
        if self.num < 1:
            raise ValueError(f"--num must be positive, got {self.num}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_classes < 1:
            raise ValueError(f"the number of classes must be positive, got {self.num_classes}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"--labels must be one of {LABEL_MODES}, got {self.labels!r}")

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num / self.batch_size)

    def rows(self, block: int) -> int:
        """Samples of ``block`` that are kept (``batch_size`` except in the last block)."""
        return min(self.batch_size, self.num - block * self.batch_size)

    def generator(self, block: int, device: torch.device) -> torch.Generator:
        return seeded_generator(self.seed, block, device=device)

    def block_labels(self, block: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """(batch_size,) int64 labels of ``block`` (drawn from ``generator`` when random)."""
        if self.labels == "random":
            return torch.randint(0, self.num_classes, (self.batch_size,), generator=generator, device=device)
        first = block * self.batch_size
        return torch.arange(first, first + self.batch_size, device=device) % self.num_classes

    def share(self, rank: int, world_size: int, blocks: Optional[Sequence[int]] = None) -> List[int]:
        """The blocks rank ``rank`` samples: every world_size-th of ``blocks`` (default: all)."""
        blocks = range(self.num_blocks) if blocks is None else blocks
        return list(blocks)[rank::world_size]


def label_classes(config: Config) -> int:
    """Classes a run's model was trained on: the synthetic dataset's when it had no data path."""
    return config.data.synthetic_classes if config.data.path is None else config.model.num_classes


# --------------------------------------------------------------------------------------------
# Drawing one block: model + noise + sampler + VAE decode
# --------------------------------------------------------------------------------------------


def prepare_model(config: Config, state: Dict[str, torch.Tensor], device: torch.device, *, kernels: Optional[str] = None,
                  attention: Optional[str] = None, compile: bool = False) -> torch.nn.Module:
    """The SiT of ``config`` with ``state`` loaded (strict), frozen, in eval mode on ``device``.

    ``compile`` compiles every block and the final layer (``module.compile()``: identical blocks
    share one graph per input shape, and state-dict keys stay clean)."""
    from reglue.models import build_model
    from reglue.models.state import check_state_dict

    model = build_model(config, kernels=kernels, attention=attention)
    check_state_dict(model.state_dict(), state, f"the {config.model.arch} {config.method.name} model of the config")
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    if compile:
        for block in model.blocks:
            block.compile(dynamic=False)
        model.final_layer.compile(dynamic=False)
    return model


class ImageSampler:
    """Draws blocks of images from a SiT and a VAE with fixed sampler settings.

    model: the SiT (eval mode, on ``device``); vae: ``reglue.models.encoders.VAE`` on ``device``;
    settings: the ``sample`` section; path: the interpolant (``method.path``); autocast: run the
    model under bf16 autocast (CUDA only; the sampler state stays float64); decode_batch: images
    per VAE decode call.
    """

    def __init__(self, model, vae, settings: SampleConfig, *, path: str, latent_shape: Tuple[int, int, int],
                 device: torch.device, autocast: bool = True, decode_batch: int = 32):
        self.model, self.vae, self.settings, self.path = model, vae, settings, path
        self.latent_shape = tuple(latent_shape)
        self.cls_dim = int(getattr(model, "cls_token_dim", 0) or 0)
        self.device = torch.device(device)
        self.autocast = autocast and self.device.type == "cuda"
        self.decode_batch = decode_batch

    @classmethod
    def from_state(cls, config: Config, state: Dict[str, torch.Tensor], vae, device: torch.device,
                   settings: Optional[SampleConfig] = None, *, kernels: Optional[str] = None,
                   attention: Optional[str] = None, compile: bool = False, autocast: Optional[bool] = None
                   ) -> "ImageSampler":
        """A sampler for a run's config and (EMA) weights; ``settings`` default to ``config.sample``.

        ``autocast`` None: bf16 autocast, except for a ``parallel.reference`` run, which samples as
        the published ``generate.py`` does: fp32 (TF32 matmuls, as the caller sets on CUDA) with
        SDPA attention (unless ``attention`` says otherwise)."""
        if autocast is None:
            autocast = not config.parallel.reference
        if config.parallel.reference:
            attention = attention or "sdpa"
        model = prepare_model(config, state, device, kernels=kernels, attention=attention, compile=compile)
        size = config.data.latent_size
        return cls(model, vae.to(device), settings or config.sample, path=config.method.path,
                   latent_shape=(config.in_channels, size, size), device=device, autocast=autocast)

    @torch.inference_mode()
    def sample_block(self, plan: BlockPlan, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Block ``block`` of ``plan`` at full size: uint8 (batch_size, H, W, 3) images and
        (batch_size,) int64 labels, on the CPU."""
        g = plan.generator(block, self.device)
        n = plan.batch_size
        x = torch.randn((n, *self.latent_shape), generator=g, device=self.device)
        cls = torch.randn((n, self.cls_dim), generator=g, device=self.device) if self.cls_dim else None
        y = plan.block_labels(block, g, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            latents, _ = sample(self.model, x, y, cls, generator=g, path=self.path, **self.settings.sampler_options())
        vae_latents = latents[:, : self.vae.latent_channels].float()
        images = torch.cat([self.vae.decode(chunk) for chunk in vae_latents.split(self.decode_batch)])
        return images.permute(0, 2, 3, 1).contiguous().cpu(), y.cpu()


def iter_blocks(sampler: ImageSampler, plan: BlockPlan, blocks: Iterable[int]) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """``(block, images uint8 (rows, H, W, 3), labels int64 (rows,))`` for each block, cut to the
    samples the plan keeps."""
    for k in blocks:
        images, labels = sampler.sample_block(plan, k)
        rows = plan.rows(k)
        yield k, images[:rows].numpy(), labels[:rows].numpy()


def generate_share(sampler: ImageSampler, plan: BlockPlan, rank: int = 0, world_size: int = 1
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's share of the plan's samples in memory: ``(indices (n,), images uint8
    (n, H, W, 3), labels int64 (n,))``, where ``indices`` are the global sample numbers. The ranks'
    shares together are exactly the samples ``reglue generate`` writes for the same plan."""
    indices, images, labels = [], [], []
    for k, block_images, block_labels in iter_blocks(sampler, plan, plan.share(rank, world_size)):
        start = k * plan.batch_size
        indices.append(np.arange(start, start + len(block_images)))
        images.append(block_images)
        labels.append(block_labels)
    if not images:
        h, w = (size * sampler.vae.downsample_factor for size in sampler.latent_shape[1:])
        return np.zeros(0, np.int64), np.zeros((0, h, w, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(indices), np.concatenate(images), np.concatenate(labels)


def sample_grid(config: Config, state: Dict[str, torch.Tensor], vae, device: torch.device, num: int, seed: int,
                settings: Optional[SampleConfig] = None) -> torch.Tensor:
    """uint8 (num, 3, H, W) images drawn with ``settings`` (default: the run's ``sample``
    section): block 0 of a ``num``-sample plan, balanced labels (sample i has class i mod classes),
    eager kernels (a grid is small; no kernel launch or interpreter cost to amortise).

    The semantic channels and the [CLS] token are sampled jointly and discarded; only the VAE
    channels are decoded."""
    sampler = ImageSampler.from_state(config, state, vae, device, settings, kernels="eager")
    plan = BlockPlan(num=num, batch_size=num, seed=seed, num_classes=label_classes(config))
    images, _ = sampler.sample_block(plan, 0)
    return images.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# The output: block files, PNGs, the final .npz
# --------------------------------------------------------------------------------------------


class SampleStore:
    """``OUT`` (the final .npz), ``OUT.parts/`` (finished blocks and the manifest), ``OUT.json``
    (the manifest of a finished output) and the optional PNG folder."""

    def __init__(self, out: str | os.PathLike, png: Optional[str | os.PathLike] = None):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.sidecar = self.out.with_name(self.out.name + ".json")
        self.png = Path(png) if png else None

    def block_path(self, block: int) -> Path:
        return self.parts / f"block-{block:06d}.npz"

    def manifest_path(self) -> Path:
        return self.parts / "manifest.json"

    # ---- checks before any sampling -----------------------------------------------------------

    def check_paths(self) -> None:
        """The output paths alone (before the weights are loaded): a ``.npz`` file path in a
        writable folder, and a writable PNG folder. One ValueError naming the path otherwise."""
        # an existing OUT is resumed (found complete) or refused by check(), which knows the settings
        ensure_output_file(self.out, "--out", suffixes=(".npz",), overwrite=True)  # the ADM sample-batch format
        if self.png is not None:
            ensure_output_dir(self.png, "--png")

    def check(self, manifest: Dict, plan: BlockPlan, image_shape: Tuple[int, int, int], overwrite: bool = False) -> bool:
        """Validate the output against this generation, before any sampling; True when ``OUT`` is
        already complete for it. Raises ValueError (one line naming the path and the fix) for bad
        paths (:meth:`check_paths`), an ``OUT`` or blocks drawn with other settings (naming each
        setting that differs), PNGs of another generation, or too little free disk. ``overwrite``:
        whatever is there is replaced, none of it is resumed."""
        self.check_paths()
        current = {k: v for k, v in manifest.items() if k != "weights"}  # where the weights came from: informational
        if self.out.exists() and not overwrite:
            finished = self._read_json(self.sidecar)
            if finished is None or not isinstance(finished.get("generation"), dict):
                raise OutputError(f"--out {self.out}: already exists (not written by reglue generate: no {self.sidecar.name}); "
                                  "pass --overwrite to replace it, or choose another --out")
            recorded = {k: v for k, v in finished["generation"].items() if k != "weights"}
            check_same_settings(f"--out {self.out}", {**recorded, "num": finished.get("num")}, {**current, "num": plan.num})
            shutil.rmtree(self.parts, ignore_errors=True)  # blocks left by a kill after the .npz was complete
            return True
        resuming = not overwrite and any(self.parts.glob("block-*.npz"))
        recorded = self._read_json(self.manifest_path()) if resuming else None
        if recorded is not None:  # a manifest without blocks (a start that failed) holds nothing to resume
            check_same_settings(str(self.parts), {k: v for k, v in recorded.items() if k != "weights"}, current)
        if self.png is not None and not resuming and not overwrite and any(self._png_files()):
            raise OutputError(f"--png {self.png}: holds PNGs of another generation; pass --overwrite to replace them, "
                              "or choose another --png")
        image_bytes = int(np.prod(image_shape)) + 8
        blocks = plan.num_blocks if overwrite else len(self.pending(plan))
        need = (blocks * plan.batch_size + plan.num) * image_bytes  # blocks still to write + the .npz
        free = shutil.disk_usage(self.out.parent).free
        if need > free:
            raise ValueError(f"--out {self.out}: needs about {human_bytes(need)} (blocks + final .npz) but "
                             f"{human_bytes(free)} are free on that disk: free space or choose another --out")
        return False

    def discard(self) -> None:
        """--overwrite: drop the blocks and PNGs of an earlier generation (``OUT`` itself is replaced
        when the new one is complete)."""
        shutil.rmtree(self.parts, ignore_errors=True)
        for path in self._png_files():
            path.unlink()

    def _png_files(self) -> Iterator[Path]:
        return self.png.glob("[0-9]" * 6 + ".png") if self.png is not None and self.png.is_dir() else iter(())

    @staticmethod
    def _read_json(path: Path) -> Optional[Dict]:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is damaged (not JSON): delete it (and the blocks next to it) to start over") from None

    def write_manifest(self, manifest: Dict) -> None:
        ensure_output_dir(self.parts, "--out")
        write_json_atomic(self.manifest_path(), manifest)

    # ---- blocks -------------------------------------------------------------------------------

    def pending(self, plan: BlockPlan) -> List[int]:
        """Blocks without a finished file (leftover ``.tmp`` files do not count). A block file
        whose zip directory does not read (truncated on a damaged disk: writes are atomic) is
        drawn again, with a warning."""
        return [k for k in range(plan.num_blocks) if not self._block_complete(k)]

    def _block_complete(self, block: int) -> bool:
        path = self.block_path(block)
        if not path.is_file():
            return False
        try:  # reads the central directory at the end of the file only
            with zipfile.ZipFile(path) as archive:
                if {"images.npy", "labels.npy"} <= set(archive.namelist()):
                    return True
        except (zipfile.BadZipFile, OSError):
            pass
        log.warning("block file %s is damaged: drawing that block again", path)
        return False

    def write_block(self, block: int, images: np.ndarray, labels: np.ndarray) -> None:
        with atomic_path(self.block_path(block)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)

    def read_block(self, block: int, key: str) -> np.ndarray:
        path = self.block_path(block)
        try:
            with np.load(path) as data:
                return data[key]
        except Exception as exc:  # zipfile/numpy raise several types for a damaged file
            raise ValueError(f"block file {path} is damaged ({type(exc).__name__}: {exc}): delete it and run the "
                             "same command again to draw it anew") from None

    # ---- PNGs -----------------------------------------------------------------------------------

    def pngs_missing(self, first_index: int, count: int) -> bool:
        return any(not (self.png / f"{i:06d}.png").is_file() for i in range(first_index, first_index + count))

    def write_pngs(self, first_index: int, images: np.ndarray) -> None:
        """``NNNNNN.png`` for images numbered from ``first_index``; existing files are kept."""
        from PIL import Image

        for i, image in enumerate(images):
            path = self.png / f"{first_index + i:06d}.png"
            if path.is_file():
                continue
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")

    # ---- the final .npz -------------------------------------------------------------------------

    def assemble(self, plan: BlockPlan, image_shape: Tuple[int, int, int], manifest: Dict) -> None:
        """Write ``OUT.json``, stream every block into ``OUT``, then remove ``OUT.parts``. In this
        order a kill at any point leaves either the blocks (the same command assembles again) or
        a complete ``OUT`` with its record (the same command finds it done)."""

        def pieces(key):
            for k in range(plan.num_blocks):
                yield self.read_block(k, key)[: plan.rows(k)]

        record = {"num": plan.num, "arrays": {"arr_0": "uint8 images (N, H, W, 3)", "arr_1": "int64 labels (N,)"},
                  "generation": manifest}
        write_json_atomic(self.sidecar, record)
        with NpzWriter(self.out) as writer:
            for name, key, dtype, shape in (("arr_0", "images", np.uint8, (plan.num, *image_shape)),
                                            ("arr_1", "labels", np.int64, (plan.num,))):
                with writer.streamed(name, shape, dtype) as write:
                    for piece in pieces(key):
                        write(piece)
        shutil.rmtree(self.parts)


# --------------------------------------------------------------------------------------------
# Sources of weights
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Where the weights came from: the config, a plain eager model holding them, a description,
    and the number of classes to sample labels from."""

    config: Config
    model: torch.nn.Module
    description: str
    num_classes: int
    run_dir: Optional[Path] = None
    """The training run the weights come from (where a run-fitted VAE such as the demo's lives)."""


def _config_from(preset: Optional[str], config_file: Optional[str]) -> Config:
    from reglue.presets import get_preset

    if config_file:
        try:
            return Config.from_dict(json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--config {config_file}: cannot read a config ({exc})") from None
    return get_preset(preset)


def _safetensors_config(path: Path) -> Optional[Config]:
    """The run config stored by ``reglue export`` in a .safetensors file's metadata, if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # SafetensorError for truncated or foreign files
        raise ValueError(f"--weights {path}: not a readable .safetensors file ({exc})") from None
    return Config.from_dict(json.loads(metadata["config"])) if "config" in metadata else None


def _read_weight_file(path: Path, model) -> None:
    """Load a published (``{"ema": ...}``) or exported checkpoint into ``model``; every failure is
    one ValueError naming the file."""
    from reglue.models.sit import load_sit_checkpoint

    if path.suffix == ".safetensors":
        reader = lambda: load_safetensors(path, fix="export it again (`reglue export`)")[0]  # noqa: E731
    else:

        def reader():
            with torch.serialization.safe_globals([argparse.Namespace]):  # the published train.py stores its args
                return torch.load(path, map_location="cpu", weights_only=True)

    try:
        ckpt = reader()
    except DamagedFileError:  # already one line naming the file and the fix
        raise
    except Exception as exc:  # truncated zip, unpickling refused, foreign file
        raise ValueError(f"--weights {path}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "is the file complete?") from None
    try:
        load_sit_checkpoint(model, ckpt, key="ema")
    except KeyError as exc:
        raise ValueError(f"--weights {path}: {exc.args[0]}") from None


def load_source(args) -> Source:
    """The weights named by ``--run``/``--checkpoint`` (a run's EMA), or ``--weights`` (an exported
    .safetensors, or a published .pt with ``--preset``/``--config``), on the CPU."""
    from reglue.checkpoint import load_run_weights
    from reglue.models import build_model

    overrides = parse_set_items(args.set)
    if args.weights:
        if args.run or args.checkpoint:
            raise ValueError("give either --weights FILE or --run/--checkpoint DIR, not both")
        path = Path(args.weights)
        if not path.is_file():
            raise ValueError(f"--weights {path}: no such file")
        stored = _safetensors_config(path) if path.suffix == ".safetensors" else None
        named = args.preset or args.config
        if not named and stored is None:
            raise ValueError(f"--weights {path}: the architecture is not stored in it; add --preset NAME "
                             "(e.g. reglue-sit-xl-2) or --config FILE")
        config = apply_overrides(_config_from(args.preset, args.config) if named else stored, overrides)
        what = f"--preset {args.preset}" if args.preset else (f"--config {args.config}" if args.config else "its stored config")
        model = build_model(config, kernels="eager")
        try:
            _read_weight_file(path, model)
        except ValueError as exc:
            if str(exc).startswith("--weights"):
                raise
            detail = str(exc).split(": ", 1)[-1]  # drop load_sit_checkpoint's generic "does not match the model"
            raise ValueError(f"--weights {path} does not match {what} ({config.model.arch}, {config.method.name}, "
                             f"{config.in_channels} input channels): {detail}") from None
        classes = label_classes(config) if stored is not None and not named else config.model.num_classes
        return Source(config, model, str(path), classes)
    if args.preset or args.config:
        raise ValueError("--preset/--config describe a --weights file; a run carries its own config")
    config, model, path = load_run_weights(args.run, args.checkpoint, "ema")
    if overrides:
        config = apply_overrides(config, overrides)
    return Source(config, model, f"{path} (EMA)", label_classes(config), run_dir=path.parent.parent)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    from reglue.kernels._utils import KERNEL_CHOICES

    from reglue.config import ATTENTION

    p = subparsers.add_parser(
        "generate",
        help="many samples from a checkpoint into one ADM-format .npz (torchrun-able, resumable)",
        description="Samples --num images from a run's EMA weights (--run / --checkpoint), an exported .safetensors "
                    "or a published checkpoint (--weights FILE.pt with --preset or --config) into --out "
                    "(arr_0: uint8 N x H x W x 3, arr_1: labels). Sample i depends only on the weights, the sampler "
                    "settings, --seed, --batch-size and i: the same with 1 or many processes and after "
                    "interruptions. Run the same command again to resume. Distributed: torchrun "
                    "--nproc_per_node=8 -m reglue.cli generate ... (--out on a filesystem every rank sees).",
        epilog="example (published REGLUE checkpoint): torchrun --nproc_per_node=8 -m reglue.cli generate "
               "--weights reglue-sit-xl-2.pt --preset reglue-sit-xl-2 --vae /models/sd-vae-ft-ema "
               "--out samples.npz; then: reglue evaluate --ref VIRTUAL_imagenet256_labeled.npz --samples samples.npz",
    )
    source = p.add_argument_group("weights")
    source.add_argument("--run", "--run-dir", dest="run",
                        help="run directory: its latest checkpoint's EMA weights (under torchrun write --run-dir: "
                             "torchrun's own parser takes --run for its --run-path)")
    source.add_argument("--checkpoint", help="a checkpoint directory (step-XXXXXXXX) instead of the latest")
    source.add_argument("--weights", help="an exported .safetensors (`reglue export`) or a published checkpoint "
                                          "(.pt with an 'ema' entry; needs --preset or --config)")
    source.add_argument("--preset", help="the architecture of --weights (e.g. reglue-sit-xl-2)")
    source.add_argument("--config", help="a config.json describing --weights instead of --preset")
    source.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set model.qk_norm=true")
    source.add_argument("--vae", help="the VAE (diffusers hub name or local folder); default: the config's encoders.vae")

    out = p.add_argument_group("samples")
    out.add_argument("--out", required=True, help="output .npz (ADM format); blocks go to OUT.parts/ meanwhile")
    out.add_argument("--num", "--num-samples", dest="num", type=int, default=50_000,
                     help="number of samples (default: 50000); under torchrun write --num-samples (torchrun's own "
                          "parser takes --num for its --numa-binding)")
    out.add_argument("--batch-size", type=int, default=128,
                     help="samples per model call and per block, per device (default: 128); part of what "
                          "the samples are, like --seed")
    out.add_argument("--seed", type=int, default=0, help="seed of every block's noise and labels (default 0)")
    out.add_argument("--labels", choices=LABEL_MODES, default="balanced",
                     help="balanced: sample i has class i mod classes (exactly num/classes each); "
                          "random: uniform draws (the ADM convention)")
    out.add_argument("--num-classes", type=int, help="classes to draw labels from (default: the model's, or the "
                                                     "synthetic dataset's for a run trained on it)")
    out.add_argument("--png", help="also write DIR/NNNNNN.png")
    add_overwrite_flag(out)

    speed = p.add_argument_group("execution")
    speed.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                       help="bf16: the model under bf16 autocast on CUDA (default); fp32: TF32 matmuls, as the "
                            "published generate.py. The CPU always runs fp32")
    speed.add_argument("--kernels", choices=KERNEL_CHOICES, help="default: triton on CUDA, eager on the CPU")
    speed.add_argument("--attention", choices=ATTENTION, help="default: the config's model.attention (auto)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the SiT blocks (default: on CUDA)")
    add_sample_arguments(p)
    p.set_defaults(func=main)


def generation_manifest(source: Source, plan: BlockPlan, settings: SampleConfig, vae: str, device: torch.device,
                        autocast: bool, fingerprint: str) -> Dict:
    """What determines the blocks' content (except ``num``, which only cuts the last block), as
    JSON reads it back. ``weights`` (where they came from) is informational: the hash decides."""
    return json.loads(json.dumps({
        "version": MANIFEST_VERSION, "weights": source.description, "weights_sha256": fingerprint,
        "arch": source.config.model.arch, "method": source.config.method.name, "path": source.config.method.path,
        "image_size": source.config.data.image_size, "vae": vae, "sample": dataclasses.asdict(settings),
        "seed": plan.seed, "batch_size": plan.batch_size, "labels": plan.labels, "num_classes": plan.num_classes,
        "device_type": device.type, "precision": "bf16-autocast" if autocast and device.type == "cuda" else "fp32",
    }))


def _sampling_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def main(args) -> int:
    from reglue.runtime import barrier, init_distributed, shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dist_info = init_distributed()
    try:
        with removed_on_failure():  # a failed start leaves no new folder behind (sampling: kept, resumable)
            started = _start(args, dist_info)
        if started is None:
            return 0
        store, plan, sampler, pending, manifest, image_shape = started
        _draw_blocks(sampler, plan, store, pending, dist_info)
        barrier()
        if store.png is not None:  # PNGs of blocks drawn by an earlier run without --png, or lost in a kill
            for k in plan.share(dist_info.rank, dist_info.world_size):
                if store.pngs_missing(k * plan.batch_size, plan.rows(k)):
                    store.write_pngs(k * plan.batch_size, store.read_block(k, "images")[: plan.rows(k)])
        barrier()
        if dist_info.is_main:
            store.assemble(plan, image_shape, manifest)
            print(f"wrote {store.out}: arr_0 uint8 {(plan.num, *image_shape)}, arr_1 labels; settings in {store.sidecar}")
    finally:
        shutdown()
    return 0


def _start(args, dist_info):
    """Everything before the first sample: outputs, weights, plan, VAE, manifest, sampler. None when
    ``--out`` is already complete; else (store, plan, sampler, pending blocks, manifest, image shape)."""
    from reglue.models.encoders import build_vae
    from reglue.runtime import all_reduce_mean, broadcast_object

    store = SampleStore(args.out, args.png)
    store.check_paths()  # before the (slow) weight loading
    source = load_source(args)
    config = apply_overrides(source.config, sample_overrides(args))
    settings = config.sample
    device = _sampling_device()
    plan = BlockPlan(num=args.num, batch_size=args.batch_size, seed=args.seed,
                     num_classes=args.num_classes or source.num_classes, labels=args.labels)
    if plan.num_classes > config.model.num_classes:
        raise ValueError(f"--num-classes {plan.num_classes}: the model knows {config.model.num_classes} classes")
    vae_name = args.vae or config.encoders.vae
    manifest = generation_manifest(source, plan, settings, vae_name, device, args.precision == "bf16",
                                   weights_fingerprint(source.model.state_dict()))
    image_shape = (config.data.image_size, config.data.image_size, 3)
    if store.check(manifest, plan, image_shape, overwrite=args.overwrite):
        if dist_info.is_main:
            print(f"{store.out} is already complete ({plan.num} samples with these settings); nothing to do"
                  + (" (--png is only written while sampling: --overwrite to redraw)" if store.png else ""))
        return None
    try:
        vae = build_vae(vae_name, seed=config.train.seed, run_dir=source.run_dir)
    except FileNotFoundError as exc:  # a run-fitted autoencoder: the message names the file and the fix
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"cannot load the VAE {vae_name!r} ({str(exc).splitlines()[0]}): pass --vae with a local "
                         "diffusers folder (e.g. a downloaded stabilityai/sd-vae-ft-ema)") from None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (VAE, --precision fp32) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if dist_info.is_main:
        if args.overwrite:
            store.discard()
        store.write_manifest(manifest)
    pending = broadcast_object(store.pending(plan) if dist_info.is_main else None)
    seen = all_reduce_mean(torch.tensor([float(store.manifest_path().is_file())], device=device))
    if seen.item() < 1:  # every rank raises, none waits at a barrier
        raise ValueError(f"{store.parts} (written by rank 0) is not visible on every rank: put --out on a "
                         "filesystem all nodes share")
    on_cuda = device.type == "cuda"
    sampler = ImageSampler.from_state(
        config, source.model.state_dict(), vae, device, settings,
        kernels=args.kernels or ("triton" if on_cuda else "eager"), attention=args.attention,
        compile=on_cuda if args.compile is None else args.compile, autocast=args.precision == "bf16")
    if dist_info.is_main:
        print(f"generate: {plan.num} samples in {plan.num_blocks} blocks of {plan.batch_size} "
              f"({len(pending)} to draw, {dist_info.world_size} process(es)) from {manifest['weights']}; "
              f"{settings.sampler} {settings.steps} steps, cfg {settings.cfg_scale} on t in "
              f"{list(settings.guidance_interval)}, {plan.labels} labels over {plan.num_classes} classes -> {store.out}")
    return store, plan, sampler, pending, manifest, image_shape


def _draw_blocks(sampler: ImageSampler, plan: BlockPlan, store: SampleStore, pending: List[int], dist_info) -> None:
    """Sample this rank's share of ``pending``, writing each block as it finishes; PNGs are
    encoded in a background thread (at most one block behind)."""
    mine = plan.share(dist_info.rank, dist_info.world_size, pending)
    rounds = [pending[i : i + dist_info.world_size] for i in range(0, len(pending), dist_info.world_size)]
    png_writer = ThreadPoolExecutor(max_workers=1) if store.png is not None else None
    png_job: Optional[Future] = None
    start = time.perf_counter()
    try:
        with progress_bar(dist_info.is_main, total=sum(plan.rows(k) for k in pending), unit="img", desc="generate") as bar:
            for round_blocks, (k, images, labels) in zip(rounds, iter_blocks(sampler, plan, mine)):
                store.write_block(k, images, labels)
                if png_writer is not None:
                    if png_job is not None:
                        png_job.result()
                    png_job = png_writer.submit(store.write_pngs, k * plan.batch_size, images)
                bar.update(sum(plan.rows(j) for j in round_blocks))  # every rank finishes a block per round
            if png_job is not None:
                png_job.result()
    finally:
        if png_writer is not None:
            png_writer.shutdown(wait=True)
    if dist_info.is_main and pending:
        seconds = time.perf_counter() - start
        drawn = sum(plan.rows(k) for k in pending)
        print(f"generate: drew {drawn} samples in {seconds:.1f} s ({drawn / seconds:.2f} img/s over "
              f"{dist_info.world_size} process(es))")
