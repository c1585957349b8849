"""``reglue evaluate``: FID, sFID, Inception Score, precision and recall of a sample batch against
a reference batch, exactly as OpenAI's ADM evaluator defines them, plus FD_DINOv2; and
``reglue evaluate --make-ref``: a reference batch for any prepared dataset.

Commands::

    reglue evaluate --ref VIRTUAL_imagenet256_labeled.npz --samples samples.npz --out results.json
    reglue evaluate --ref REF.npz --samples S.npz --metrics fid,sfid,is,pr,fd_dinov2
    reglue evaluate --make-ref --data PREPARED_DIR --out REF.npz [--num 10000]

What agrees with the TensorFlow evaluator and why: ``metrics.py`` (the scores) and
``inception.py`` (the network, its weights and the three feature taps). Inputs are validated and
the output path is checked before any feature is computed; every error is one line per problem.

Library API (what the in-training evaluation calls; every rank generates its share)::

    evaluator = Evaluator.from_files("REF.npz", metrics=("fid", "sfid", "is", "pr"), device=device)
    features = evaluator.new_feature_set()
    for images in my_share:                      # uint8 (B, H, W, 3) or (B, 3, H, W), any device
        evaluator.add_images(features, images)   # Inception (and DINOv2) on `device`, streamed
    features = features.gather(dst=0)            # collective: statistics all-reduced, rows to rank 0
    if rank == 0:
        scores = evaluator.score(features)       # {"fid": ..., "sfid": ..., "inception_score": ...,
                                                 #  "precision": ..., "recall": ...}

- :class:`Evaluator`: one reference batch, the feature extractors and the metric list; computes
  the reference images' features once (precision/recall; FD_DINOv2 without stored statistics).
- :func:`score_features`: (reference, sample features, reference features) -> metric dict.
- :class:`~reglue.evaluation.inception.InceptionFeatureExtractor`,
  :class:`~reglue.evaluation.metrics.FeatureSet`, :class:`DINOv2Features`: the pieces.

FD_DINOv2 uses the project's DINOv2 builder (``encoders.build_dinov2``, timm) with DINOv2
ViT-L/14 (``vit_large_patch14_dinov2``, no registers, as dgm-eval's ``dinov2_vitl14``): the [CLS]
token after the final norm (1024-d), from images normalised with the ImageNet mean/std and resized
to 224x224 (bicubic; dgm-eval resizes with PIL's antialiased bicubic, so values differ slightly).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from reglue.config import EVAL_METRICS
from reglue.evaluation.inception import InceptionFeatureExtractor, build_inception, to_nchw_uint8
from reglue.evaluation.metrics import (ADM_NEIGHBOURS, ADM_SPLIT_SIZE, FeatureSet, format_score, frechet_distance,
                                       inception_score, precision_recall)
from reglue.evaluation.reference import (DEFAULT_REFERENCE_IMAGES, NpzImages, Reference, load_reference,
                                         make_reference)
from reglue.outputs import add_overwrite_flag, ensure_output_file, removed_on_failure, write_json_atomic
from reglue.runtime import WORKERS_HELP, default_workers, seeded_init

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "DINOV2_L14",
    "DEFAULT_DINOV2_WEIGHTS",
    "DINOv2Features",
    "Evaluator",
    "score_features",
    "parse_metrics",
    "add_parser",
    "main",
]

log = logging.getLogger("reglue.evaluate")

METRICS = EVAL_METRICS
DEFAULT_METRICS = ("fid", "sfid", "is", "pr")
"""The ADM evaluator's five numbers (precision and recall are one metric, ``pr``)."""
DINOV2_L14 = "vit_large_patch14_dinov2"
DEFAULT_DINOV2_WEIGHTS = "vit_large_patch14_dinov2.lvd142m"
"""timm's DINOv2 ViT-L/14 weights (through huggingface_hub, like the training DINOv2)."""
RANDOM = "random"
RESULT_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
                "recall": "Recall", "fd_dinov2": "FD_DINOv2"}


def parse_metrics(text: Union[str, Sequence[str]]) -> tuple:
    """"fid,sfid,..." or a sequence -> validated tuple in the canonical order."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise ValueError(f"--metrics: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


class DINOv2Features:
    """uint8 images (N, H, W, 3) or (N, 3, H, W), square, any size -> (N, D) float32 DINOv2 [CLS]
    (after the final norm) at a 224x224 input, on ``device`` (see the module docstring).

    weights: a timm pretrained name (default DINOv2-L/14), a local file, or ``"random"`` (tests).
    timm_overrides: architecture overrides (tests: a small random ViT of the same family).
    """

    def __init__(self, weights: str = DEFAULT_DINOV2_WEIGHTS, device: Union[str, torch.device] = "cpu",
                 model_name: str = DINOV2_L14, seed: int = 0, **timm_overrides):
        from reglue.models.encoders import build_dinov2

        self.is_random = weights == RANDOM
        depth = timm_overrides.get("depth", 24)
        with seeded_init(seed):
            # image_size=256 builds the 224 input; other sizes get views of the same model below
            self.base = build_dinov2(model_name, None if self.is_random else weights, image_size=256, layers=(depth - 1,),
                                     **timm_overrides).to(device)
        self.weights, self.device = weights, torch.device(device)
        self._encoders = {256: self.base}

    @property
    def dim(self) -> int:
        return self.base.embed_dim

    def describe(self) -> str:
        if self.is_random:
            return "RANDOM DINOv2 weights (tests/CI only): FD_DINOv2 is meaningless"
        return f"DINOv2 {self.weights}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from reglue.models.encoders import DINOv2Encoder

        images = to_nchw_uint8(images)
        size = images.shape[-1]
        if images.shape[-2] != size:
            raise ValueError(f"FD_DINOv2 expects square images, got {tuple(images.shape[-2:])}")
        if size not in self._encoders:
            self._encoders[size] = DINOv2Encoder(self.base.model, image_size=size, layers=self.base.layers).to(self.device)
        return self._encoders[size](images.to(self.device, non_blocking=True)).cls.float()


def _prefetched(batches: Iterator[np.ndarray], pin: bool, depth: int = 3) -> Iterator[torch.Tensor]:
    """Read (and pin) the next batches in a thread while the device works on this one."""
    box: queue.Queue = queue.Queue(depth)
    done = object()

    def read():
        try:
            for batch in batches:
                tensor = torch.from_numpy(batch)
                box.put(tensor.pin_memory() if pin else tensor)
        except BaseException as err:  # handed to the consumer, raised there
            box.put(err)
        box.put(done)

    threading.Thread(target=read, daemon=True).start()
    while (item := box.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _warn_rank_deficient(count: int, dim: int, what: str) -> None:
    if count <= dim:
        warnings.warn(f"{what} from {count} samples of {dim}-d features: the covariance is singular and the distance "
                      "biased high (the ADM protocol scores 50,000 samples)", RuntimeWarning, stacklevel=3)


def score_features(reference: Reference, samples: FeatureSet, reference_features: Optional[FeatureSet],
                   metrics: Sequence[str] = DEFAULT_METRICS, *, is_split_size: int = ADM_SPLIT_SIZE,
                   device: Optional[torch.device] = None) -> Dict[str, float]:
    """The metric dict of gathered sample features against a reference batch.

    reference_features: features of the reference images (keep_pool for ``pr``; DINOv2 for
    ``fd_dinov2`` when the reference has no DINOv2 statistics); None when no metric needs them.
    Keys: fid, sfid, inception_score, precision, recall, fd_dinov2 (those asked for).
    """
    results: Dict[str, float] = {}
    if "fid" in metrics:
        _warn_rank_deficient(samples.count, reference.fid.dim, "FID")
        results["fid"] = frechet_distance(samples.fid_stats(), reference.fid, device)
    if "sfid" in metrics:
        _warn_rank_deficient(samples.count, reference.sfid.dim, "sFID")
        results["sfid"] = frechet_distance(samples.sfid_stats(), reference.sfid, device)
    if "is" in metrics:
        results["inception_score"] = inception_score(samples.logits.to(device or "cpu"), is_split_size)
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(reference_features.pool, samples.pool, device=device)
    if "fd_dinov2" in metrics:
        stats = reference.dinov2 if reference.dinov2 is not None else reference_features.dinov2_stats()
        _warn_rank_deficient(samples.count, stats.dim, "FD_DINOv2")
        results["fd_dinov2"] = frechet_distance(samples.dinov2_stats(), stats, device)
    return results


class Evaluator:
    """Scores sets of uint8 images against one reference batch (see the module docstring).

    inception: the Inception extractor (its device is where features are computed); dinov2: for
    ``fd_dinov2``; batch_size: images per forward when this class iterates a file itself.
    """

    def __init__(self, reference: Reference, metrics: Sequence[str] = DEFAULT_METRICS, *,
                 inception: InceptionFeatureExtractor, dinov2: Optional[DINOv2Features] = None,
                 batch_size: int = 200, is_split_size: int = ADM_SPLIT_SIZE):
        self.metrics = parse_metrics(metrics)
        if "fd_dinov2" in self.metrics and dinov2 is None:
            raise ValueError("fd_dinov2 needs a DINOv2 feature extractor")
        self.reference, self.inception, self.dinov2 = reference, inception, dinov2
        self.batch_size, self.is_split_size = batch_size, is_split_size
        self.reference_images_needed = "pr" in self.metrics or ("fd_dinov2" in self.metrics and reference.dinov2 is None)
        if self.reference_images_needed:
            if reference.images is None:
                raise ValueError(f"{reference.path}: no reference images (arr_0), which "
                                 f"{'precision/recall' if 'pr' in self.metrics else 'FD_DINOv2 without DINOv2 statistics'} need")
            if "pr" in self.metrics and len(reference.images) <= ADM_NEIGHBOURS:
                raise ValueError(f"{reference.path}: {len(reference.images)} reference images; precision/recall need more "
                                 f"than k={ADM_NEIGHBOURS}")
        self._reference_features: Optional[FeatureSet] = None

    @classmethod
    def from_files(cls, reference: Union[str, os.PathLike], metrics: Sequence[str] = DEFAULT_METRICS, *,
                   inception_weights: Union[str, os.PathLike, None] = None, dinov2_weights: str = DEFAULT_DINOV2_WEIGHTS,
                   device: Union[str, torch.device, None] = None, batch_size: int = 200,
                   is_split_size: int = ADM_SPLIT_SIZE) -> "Evaluator":
        metrics = parse_metrics(metrics)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ref = load_reference(reference, need_images="pr" in metrics)
        dinov2 = DINOv2Features(dinov2_weights, device) if "fd_dinov2" in metrics else None
        return cls(ref, metrics, inception=build_inception(inception_weights, device), dinov2=dinov2,
                   batch_size=batch_size, is_split_size=is_split_size)

    @property
    def device(self) -> torch.device:
        return self.inception.device

    @property
    def is_random(self) -> bool:
        return self.inception.is_random or (self.dinov2 is not None and self.dinov2.is_random)

    def new_feature_set(self, for_reference: bool = False) -> FeatureSet:
        """An empty FeatureSet keeping what this evaluator's metrics need of samples (or of the
        reference images)."""
        dinov2 = "fd_dinov2" in self.metrics and (not for_reference or self.reference.dinov2 is None)
        return FeatureSet(keep_pool="pr" in self.metrics, keep_logits="is" in self.metrics and not for_reference,
                          dinov2=dinov2)

    def add_images(self, features: FeatureSet, images: torch.Tensor) -> None:
        """Features of one uint8 batch (N, H, W, 3) or (N, 3, H, W) into ``features``."""
        features.add(self.inception(images), self.dinov2(images) if features.has_dinov2 else None)

    def features_of(self, images: NpzImages, for_reference: bool = False, desc: Optional[str] = None) -> FeatureSet:
        """Features of every image of an .npz batch, read ahead in a thread."""
        features = self.new_feature_set(for_reference)
        bar = None
        if desc:
            from tqdm import tqdm

            bar = tqdm(total=len(images), unit="img", desc=desc, dynamic_ncols=True)
        try:  # the file's CRC-32 is verified after its last batch: a damaged file raises here, before any score
            for batch in _prefetched(images.batches(self.batch_size), pin=self.device.type == "cuda"):
                self.add_images(features, batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()  # an error then starts on a line of its own
        return features

    def reference_features(self, desc: Optional[str] = None) -> Optional[FeatureSet]:
        """Features of the reference images (computed once), or None when no metric needs them."""
        if self.reference_images_needed and self._reference_features is None:
            self._reference_features = self.features_of(self.reference.images, for_reference=True, desc=desc)
        return self._reference_features

    def score(self, samples: FeatureSet) -> Dict[str, float]:
        """The metric dict of ``samples`` (gathered) against the reference (see :func:`score_features`)."""
        return score_features(self.reference, samples, self.reference_features(), self.metrics,
                              is_split_size=self.is_split_size, device=self.device)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _reglue_warnings(caught) -> list:
    """Our warnings, one line each (those of other libraries are left to their own output)."""
    return [str(w.message) for w in caught if "reglue" in Path(w.filename).parts]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision and recall of a sample .npz as the ADM evaluator defines them (+ FD_DINOv2); "
             "--make-ref: a reference batch for any dataset",
        description="Scores --samples (ADM .npz: arr_0 uint8 N x H x W x 3) against --ref (an ADM reference batch with "
                    "precomputed mu/sigma/mu_s/sigma_s and its arr_0 images), with torch-fidelity's TF-exact InceptionV3 "
                    "(fp32, TF32 off) and the evaluator's definitions, including its fp16 precision/recall distances. "
                    "With --make-ref, writes a reference batch for a prepared dataset instead.",
        epilog="examples: reglue evaluate --ref VIRTUAL_imagenet256_labeled.npz --samples samples.npz --out results.json;  "
               "reglue evaluate --make-ref --data data/imagenet256 --out ref.npz --num 10000",
    )
    p.add_argument("--ref", help="reference batch .npz (evaluation)")
    p.add_argument("--samples", help="sample batch .npz, arr_0 uint8 (N, H, W, 3) (evaluation)")
    p.add_argument("--out", help="evaluation: results .json (optional); --make-ref: the reference .npz to write")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated subset of {','.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}; pr = precision "
                        "and recall)")
    p.add_argument("--inception-weights", metavar="FILE|random",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch-fidelity's cache, "
                        "$TORCH_HOME/hub/checkpoints); 'random': a seeded random network for tests/CI (meaningless scores)")
    p.add_argument("--dinov2-weights", metavar="NAME|FILE|random",
                   help=f"DINOv2-L/14 for fd_dinov2: a timm name (default {DEFAULT_DINOV2_WEIGHTS}) or a local file; with "
                        "--make-ref, also store DINOv2 statistics (mu_dinov2, sigma_dinov2)")
    p.add_argument("--batch-size", type=int, default=200, help="images per forward (default 200)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--is-split-size", type=int, default=ADM_SPLIT_SIZE,
                   help=f"samples per Inception Score split (the evaluator's {ADM_SPLIT_SIZE}; change it for small tests only)")
    p.add_argument("--make-ref", action="store_true", help="write a reference batch (--data, --out) instead of evaluating")
    p.add_argument("--data", help="--make-ref: a prepared dataset directory (`reglue prepare`), the published layout, or "
                                  "'synthetic' (the demo set of --preset/--config)")
    p.add_argument("--num", type=int, default=DEFAULT_REFERENCE_IMAGES,
                   help=f"--make-ref: images stored in arr_0 (default {DEFAULT_REFERENCE_IMAGES}); statistics cover the "
                        "whole dataset")
    p.add_argument("--preset", default="tiny", help="--make-ref --data synthetic: the preset whose demo set (default tiny)")
    p.add_argument("--config", help="--make-ref --data synthetic: a run's config.json instead of --preset")
    p.add_argument("--seed", type=int, default=0, help="--make-ref: seed of the arr_0 subset")
    add_overwrite_flag(p)
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="--make-ref: DataLoader workers decoding images " + WORKERS_HELP.format(default_workers()))
    p.set_defaults(func=main)


def _check_arguments(args) -> None:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    if args.make_ref:
        stray = [flag for flag, value in (("--ref", args.ref), ("--samples", args.samples)) if value]
        if stray or not args.data or not args.out:
            raise ValueError("--make-ref takes --data DIR and --out REF.npz" + (f", not {', '.join(stray)}" if stray else ""))
        if args.num < 1:
            raise ValueError("--num must be positive")
    elif not args.ref or not args.samples:
        raise ValueError("give --ref REF.npz and --samples SAMPLES.npz (or --make-ref --data DIR --out REF.npz)")
    if args.is_split_size < 1:
        raise ValueError("--is-split-size must be positive")


def _open_dataset(args):
    if args.data == "synthetic":
        from reglue.data import open_dataset
        from reglue.data.stats import run_config

        return open_dataset(run_config(args.preset, args.config, {}))
    from reglue.data.shards import open_data_dir

    return open_data_dir(args.data)


def _make_ref(args, device: torch.device) -> int:
    out = ensure_output_file(args.out, "--out", suffixes=(".npz",), overwrite=args.overwrite)
    dataset = _open_dataset(args)
    inception = build_inception(args.inception_weights, device)
    dinov2 = DINOv2Features(args.dinov2_weights, device) if args.dinov2_weights else None
    for network in (inception, dinov2):
        if network is not None and network.is_random:
            print(f"WARNING: {network.describe()}")
    summary = make_reference(dataset, out, inception, num=args.num, dinov2=dinov2, batch_size=args.batch_size,
                             seed=args.seed, num_workers=args.workers, progress=True)
    random_note = " (RANDOM networks: for tests only)" if inception.is_random or (dinov2 and dinov2.is_random) else ""
    print(f"wrote {out}: {summary['images']} images of {summary['image_size']}x{summary['image_size']} in arr_0; "
          f"statistics (mu, sigma, mu_s, sigma_s{', DINOv2' if dinov2 else ''}) over all {summary['stats_images']} "
          f"images{random_note}")
    return 0


def _evaluate(args, device: torch.device) -> Dict:
    """Validate everything, then compute; returns the results dict (also printed and saved)."""
    metrics = parse_metrics(args.metrics)
    if args.out:  # a .json: a slip for --samples (a .npz) is refused, not replaced
        ensure_output_file(args.out, "--out", suffixes=(".json",), overwrite=args.overwrite)
    reference = load_reference(args.ref, need_images="pr" in metrics)
    samples = NpzImages(args.samples)
    if "is" in metrics and len(samples) < args.is_split_size:
        raise ValueError(f"{args.samples}: {len(samples)} samples; the Inception Score needs at least {args.is_split_size} "
                         f"(the ADM evaluator's splits of {ADM_SPLIT_SIZE}): generate more or leave out 'is' (--metrics)")
    if "pr" in metrics and len(samples) <= ADM_NEIGHBOURS:
        raise ValueError(f"{args.samples}: {len(samples)} samples; precision/recall need more than k={ADM_NEIGHBOURS}")
    if reference.images is not None and reference.images.image_size != samples.image_size:
        warnings.warn(f"reference images are {reference.images.image_size}, samples {samples.image_size}: both are resized "
                      "to 299x299 for Inception, but scores across resolutions are not comparable", RuntimeWarning)
    dinov2 = DINOv2Features(args.dinov2_weights or DEFAULT_DINOV2_WEIGHTS, device) if "fd_dinov2" in metrics else None
    evaluator = Evaluator(reference, metrics, inception=build_inception(args.inception_weights, device), dinov2=dinov2,
                          batch_size=args.batch_size, is_split_size=args.is_split_size)
    networks = [evaluator.inception.describe()] + ([dinov2.describe()] if dinov2 else [])
    if evaluator.is_random:
        print("WARNING: " + "; ".join(n for n in networks if "RANDOM" in n))
    timings = {}
    start = time.perf_counter()
    sample_features = evaluator.features_of(samples, desc="samples")
    timings["sample_features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    evaluator.reference_features(desc="reference")
    timings["reference_features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluator.score(sample_features)
    timings["metrics_s"] = time.perf_counter() - start
    results: Dict = {}
    if evaluator.is_random:
        results["WARNING"] = "random network weights (tests/CI only): these scores are meaningless"
    results.update(scores)
    results.update(num_samples=len(samples), samples=str(args.samples), reference=str(args.ref),
                   num_reference_images=len(reference.images) if reference.images is not None else None,
                   reference_stats_images=reference.stats_count, networks=networks, device=str(device),
                   metrics=list(metrics), is_split_size=args.is_split_size if "is" in metrics else None, timings=timings)
    if "fd_dinov2" in metrics:
        results["fd_dinov2_reference"] = ("the reference's DINOv2 statistics" if reference.dinov2 is not None else
                                          f"the {len(reference.images)} reference images (no DINOv2 statistics stored)")
    return results


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.make_ref:
        with removed_on_failure():  # the reference is written at the end: any failure leaves no new folder
            return _make_ref(args, device)
    with warnings.catch_warnings(record=True) as caught, removed_on_failure():
        warnings.simplefilter("always")
        results = _evaluate(args, device)
    results["warnings"] = _reglue_warnings(caught)
    for line in results["warnings"]:
        print(f"warning: {line}")
    if "WARNING" in results:
        print(f"WARNING: {results['WARNING']}")
    for key, name in RESULT_NAMES.items():
        if key in results:
            print(f"{name}: {format_score(key, results[key])}")
    if args.out:
        write_json_atomic(Path(args.out), results)
        print(f"wrote {args.out}")
    return 0
