"""FID, sFID, Inception Score, precision and recall exactly as OpenAI's ADM evaluator defines
them, plus FD_DINOv2; and :class:`FeatureSet`, the streamed features of one image set.

What the evaluator (``evaluations/evaluator.py``) computes, and what we do:

- **FID / sFID**: ``FIDStatistics.frechet_distance``, the Fréchet distance between Gaussians
  ``‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2)`` of ``pool_3`` (2048-d) and of
  ``mixed_6/conv[..., :7]`` (2023-d) features; the sample statistics are ``np.mean`` and
  ``np.cov(rowvar=False)`` (float64, unbiased, N − 1); the reference batch's precomputed ``mu``,
  ``sigma``, ``mu_s``, ``sigma_s`` are used as they are. The evaluator takes
  ``scipy.linalg.sqrtm(Σ1 Σ2)`` (retrying with 1e-6 on the diagonals when it is not finite),
  silently drops an imaginary part whose diagonal is within 1e-3 of 0 and raises otherwise. We use
  the identity tr √(Σ1 Σ2) = Σ √λ(A Σ2 A), A = Σ1^½ (the eigenvalues of Σ1 Σ2 and of the symmetric
  A Σ2 A agree), with symmetric eigendecompositions in float64: exact in exact arithmetic, real,
  and stable when the covariances are rank-deficient (fewer samples than dimensions), where
  ``sqrtm`` of the singular non-symmetric product is not. Eigenvalues within rounding noise of 0
  (|λ| ≤ n·ε·λ_max) count as 0; a negative eigenvalue beyond that would make the square root
  complex: its imaginary part is dropped with a RuntimeWarning that says how large it was.
  Statistics are streamed (:class:`~reglue.models.encoders.RunningMoments` with the full
  covariance, Chan's merge in float64): the spatial and DINOv2 features are never all in memory.
- **Inception Score**: ``compute_inception_score``: softmax of the 1008 logits without bias, in
  splits of 5,000 consecutive samples (the last split may be partial, as there), each split
  ``exp(mean_i KL(p_i ‖ mean p))``, then the mean over splits (50,000 samples: 10 splits). We
  compute it in float64 from log-softmax (the evaluator: float32 softmax, then numpy logs, which
  give NaN for a probability that underflows to 0). Fewer samples than one split is an error.
- **Precision / recall**: ``ManifoldEstimator`` (Kynkäänniemi et al.) with k = 3: the radius of
  each feature vector is its 4th-smallest squared distance to the vectors of its own set (the
  first is itself), in row blocks of 10,000 against column blocks of 10,000; precision is the
  fraction of samples within the radius of some reference vector, recall the fraction of reference
  vectors within the radius of some sample (``<=``, so ties count as inside). The evaluator's
  ``DistanceBlock`` computes the squared distances in a TensorFlow graph that casts both feature
  blocks to **fp16**: ``‖u‖² − 2 u·v + ‖v‖²`` with every op rounded to fp16, clamped at 0, and
  recomputed in fp32 for a whole 10,000 x 10,000 block when any of its entries is not finite. With
  ``pool_3`` features the squared distances are a few hundred, where fp16 has a spacing of 0.25 to
  0.5: many distances tie with a radius, and fp32 distances move those comparisons. This is the
  likely cause of the precision/recall gap of ports that compute fp32 distances (0.8255 vs 0.8265,
  0.5285 vs 0.5309 on ADM-G+U), so :func:`adm_pairwise_distances` reproduces the fp16 graph op by
  op: it rounds the features, each square, each norm, the matmul result, 2·(u·v), and each sum to
  fp16 (computed in fp32, where products of fp16 values are exact), accumulating the norms and
  the matmul in fp32 as cuBLAS and TensorFlow's GPU reductions do for fp16; it keeps the block
  structure for the fp32 fallback. The same arithmetic on every device, deterministic; an
  accumulation order other than TensorFlow's can move a sum across an fp16 rounding boundary (one
  fp16 step in about 1 of 10,000 distances against exact summation, measured on random features
  at Inception's scale, ‖u‖² ≈ 600, D = 2048), which is the remaining difference. The matmuls run
  in IEEE fp32 even when the caller enabled TF32 (products of fp16 values are exact only there).
- **FD_DINOv2** (beyond the evaluator; Stein et al. 2023, dgm-eval): the same Fréchet distance of
  DINOv2 ViT-L/14 [CLS] features (1024-d); see ``evaluate.py`` for the network.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from reglue.evaluation.inception import InceptionFeatures, ieee_fp32
from reglue.models.encoders import RunningMoments

__all__ = [
    "ADM_SPLIT_SIZE",
    "ADM_NEIGHBOURS",
    "ADM_BLOCK",
    "GaussianStats",
    "frechet_distance",
    "inception_score",
    "adm_pairwise_distances",
    "manifold_radii",
    "precision_recall",
    "FeatureSet",
    "all_reduce_moments",
    "format_score",
]

ADM_SPLIT_SIZE = 5000
"""Samples per Inception Score split (``compute_inception_score(split_size=5000)``)."""
ADM_NEIGHBOURS = 3
"""k of the k-NN radii (``ManifoldEstimator(nhood_sizes=(3,))``)."""
ADM_BLOCK = 10_000
"""Row and column block of the pairwise distances (``row_batch_size = col_batch_size = 10000``)."""


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


@dataclass
class GaussianStats:
    """mu: (D,) and sigma: (D, D), float64; the mean and unbiased covariance of a feature set.

    factor: optional (D, r) float64 with sigma = factor @ factorᵀ, kept for sets of r + 1 <= D
    samples (the centred features / √(N − 1)): the Fréchet distance then needs only an r x r
    eigenproblem, exact for these rank-deficient covariances and fast for small test sets.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    factor: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.mu = torch.as_tensor(self.mu, dtype=torch.float64)
        self.sigma = torch.as_tensor(self.sigma, dtype=torch.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.numel(), self.mu.numel()):
            raise ValueError(f"expected mu (D,) and sigma (D, D), got {tuple(self.mu.shape)} and {tuple(self.sigma.shape)}")
        if self.factor is not None and (self.factor.ndim != 2 or self.factor.shape[0] != self.mu.numel()):
            raise ValueError(f"factor must be (D, r) with D = {self.mu.numel()}, got {tuple(self.factor.shape)}")

    @property
    def dim(self) -> int:
        return self.mu.numel()

    @classmethod
    def from_moments(cls, moments: RunningMoments, what: str = "features",
                     rows: Optional[torch.Tensor] = None) -> "GaussianStats":
        """``np.mean`` and ``np.cov(rowvar=False)`` (ddof 1) of the streamed features; ``rows``:
        the features themselves (N, D), when N <= D, for :attr:`factor`."""
        if moments.count < 2:
            raise ValueError(f"the covariance of {what} needs at least 2 samples, got {moments.count}")
        factor = None
        if rows is not None:
            factor = ((rows.double().to(moments.mean.device) - moments.mean).T / math.sqrt(moments.count - 1)).cpu()
        return cls(moments.mean.cpu(), (moments.m2 / (moments.count - 1)).cpu(), factor)

    @classmethod
    def of(cls, features: torch.Tensor) -> "GaussianStats":
        """features: (N, D)."""
        rows = features if features.shape[0] <= features.shape[1] else None
        return cls.from_moments(RunningMoments(covariance=True).update(features), rows=rows)


def _clip_noise(eigenvalues: torch.Tensor, what: str) -> torch.Tensor:
    """Eigenvalues of a matrix that is PSD in exact arithmetic: zero within rounding noise of 0;
    a negative one beyond the noise is dropped with a warning (its square root is imaginary)."""
    noise = eigenvalues.abs().max().clamp_min(torch.finfo(eigenvalues.dtype).tiny) * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    negative = eigenvalues[eigenvalues < -noise]
    if negative.numel():
        warnings.warn(
            f"Fréchet distance: {what} has {negative.numel()} negative eigenvalue(s) down to {negative.min().item():.4g} "
            f"(noise level {noise.item():.2g}); dropped the imaginary part {negative.neg().sqrt().sum().item():.4g} of its "
            "square root: the covariances are not positive semi-definite (corrupt statistics?)", RuntimeWarning, stacklevel=3)
    return torch.where(eigenvalues.abs() <= noise, torch.zeros_like(eigenvalues), eigenvalues).clamp_min(0)


def frechet_distance(a: GaussianStats, b: GaussianStats, device: Optional[torch.device] = None) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb), in float64 (on ``device``; default CPU)."""
    if a.dim != b.dim:
        raise ValueError(f"Fréchet distance between {a.dim}-d and {b.dim}-d statistics")
    device = device or torch.device("cpu")
    if b.factor is not None and (a.factor is None or b.factor.shape[1] < a.factor.shape[1]):
        a, b = b, a
    sigma_a, sigma_b = a.sigma.to(device), b.sigma.to(device)
    sigma_a, sigma_b = (sigma_a + sigma_a.T) / 2, (sigma_b + sigma_b.T) / 2
    if a.factor is not None:  # Σa = F Fᵀ: the nonzero eigenvalues of Σa Σb are those of Fᵀ Σb F (r x r)
        factor = a.factor.to(device)
        product = factor.T @ sigma_b @ factor
    else:
        w, v = torch.linalg.eigh(sigma_a)
        root_a = (v * _clip_noise(w, "the first covariance").sqrt()) @ v.T
        product = root_a @ sigma_b @ root_a
    eigenvalues = _clip_noise(torch.linalg.eigvalsh((product + product.T) / 2), "√Σ1 Σ2 √Σ1")
    diff = a.mu.to(device) - b.mu.to(device)
    distance = diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * eigenvalues.sqrt().sum()
    return float(distance)


def format_score(name: str, value: float) -> str:
    """A score as printed: precision and recall (fractions) to 3 decimals; distances and the
    Inception Score to 4 significant digits (whole numbers from 1000 up), as papers report them.
    The JSON outputs keep the full value."""
    if not math.isfinite(value):
        return str(value)
    if name in ("precision", "recall"):
        return f"{value:.3f}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:#.4g}"


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def inception_score(logits: torch.Tensor, split_size: int = ADM_SPLIT_SIZE) -> float:
    """logits: (N, C) without bias, in sample order. Mean over splits of ``split_size``
    consecutive samples of exp(E_i KL(p_i ‖ p̄)), as the ADM evaluator."""
    n = logits.shape[0]
    if n < split_size:
        raise ValueError(f"the Inception Score needs at least {split_size} samples (the ADM evaluator's splits of "
                         f"{split_size}), got {n}: generate more, leave out 'is' (--metrics), or set --is-split-size")
    scores = []
    for part in logits.double().split(split_size):
        log_p = torch.log_softmax(part, dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(part.shape[0])
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    return float(torch.stack(scores).mean())


# --------------------------------------------------------------------------------------------
# Precision and recall
# --------------------------------------------------------------------------------------------


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (overflow -> inf), kept in fp32."""
    return x.half().float()


def adm_pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (R, C) float32 of u: (R, D) against v: (C, D), as the ADM
    evaluator's ``DistanceBlock`` computes one block (see the module docstring): the fp16 graph
    ``max(‖u‖² − 2 u·v + ‖v‖², 0)``, or the same formula in fp32 when any entry is not finite."""
    u, v = u.float(), v.float()
    u16, v16 = _fp16(u), _fp16(v)
    norm_u = _fp16(_fp16(u16 * u16).sum(dim=1))
    norm_v = _fp16(_fp16(v16 * v16).sum(dim=1))
    with ieee_fp32():  # products of fp16 values are exact in fp32, not in TF32 (a trainer may have it on)
        dot = u16 @ v16.T
    twice_dot = _fp16(2 * _fp16(dot))
    distances = _fp16(_fp16(norm_u[:, None] - twice_dot) + norm_v[None, :]).clamp_min_(0)
    if torch.isfinite(distances).all():
        return distances
    with ieee_fp32():
        dot = u @ v.T
    return ((u * u).sum(dim=1)[:, None] - 2 * dot + (v * v).sum(dim=1)[None, :]).clamp_min_(0)


def _check_pr_features(features: torch.Tensor, k: int, what: str) -> None:
    if features.ndim != 2 or features.shape[0] <= k:
        raise ValueError(f"precision/recall need more than k={k} {what}feature vectors (N, D), got {tuple(features.shape)}")


@torch.no_grad()
def manifold_radii(features: torch.Tensor, k: int = ADM_NEIGHBOURS, block: int = ADM_BLOCK) -> torch.Tensor:
    """features: (N, D) -> (N,) float32: the (k+1)-th smallest ADM distance of each vector to the
    set (itself included, as ``ManifoldEstimator.manifold_radii``). Memory: one block x block
    distance tile at a time (a running k+1 smallest), where the evaluator holds block x N."""
    _check_pr_features(features, k, "")
    n = features.shape[0]
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0 : r0 + block]
        nearest = None
        for c0 in range(0, n, block):
            tile = adm_pairwise_distances(rows, features[c0 : c0 + block])
            candidates = tile if nearest is None else torch.cat([nearest, tile], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block] = nearest[:, k]
    return radii


@torch.no_grad()
def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = ADM_NEIGHBOURS, block: int = ADM_BLOCK,
                     device: Optional[torch.device] = None) -> Tuple[float, float]:
    """reference: (N1, D), samples: (N2, D) ``pool_3`` features -> (precision, recall) as
    ``Evaluator.compute_prec_recall``; computed on ``device`` (default: where the features are)."""
    _check_pr_features(reference, k, "reference ")
    _check_pr_features(samples, k, "sample ")
    device = device or reference.device
    reference, samples = reference.to(device, torch.float32), samples.to(device, torch.float32)
    radii_ref, radii_samples = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
    reference_inside = torch.zeros(reference.shape[0], dtype=torch.bool, device=device)
    samples_inside = torch.zeros(samples.shape[0], dtype=torch.bool, device=device)
    for r0 in range(0, reference.shape[0], block):
        for c0 in range(0, samples.shape[0], block):
            tile = adm_pairwise_distances(reference[r0 : r0 + block], samples[c0 : c0 + block])
            reference_inside[r0 : r0 + block] |= (tile <= radii_samples[None, c0 : c0 + block]).any(dim=1)
            samples_inside[c0 : c0 + block] |= (tile <= radii_ref[r0 : r0 + block, None]).any(dim=0)
    return float(samples_inside.double().mean()), float(reference_inside.double().mean())


# --------------------------------------------------------------------------------------------
# Streamed features of one image set
# --------------------------------------------------------------------------------------------


def all_reduce_moments(moments: RunningMoments) -> RunningMoments:
    """The merged moments of every rank, on every rank (collective; a no-op in one process).

    Chan's merge of k parts: with the global mean μ, M2 = Σ_r [M2_r + n_r (m_r − μ)(m_r − μ)ᵀ],
    a sum of PSD terms, so the all-reduce in float64 loses nothing to cancellation.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return moments
    if moments.mean is None:
        raise ValueError("all_reduce_moments: every rank must have seen at least one feature vector")
    count = torch.tensor([float(moments.count)], dtype=torch.float64, device=moments.mean.device)
    dist.all_reduce(count)
    total = moments.mean * moments.count
    dist.all_reduce(total)
    mean = total / count
    delta = moments.mean - mean
    spread = torch.outer(delta, delta) if moments.m2.ndim == 2 else delta.square()
    m2 = moments.m2 + moments.count * spread
    dist.all_reduce(m2)
    return RunningMoments(int(count.item()), mean, m2, moments.covariance)


class _Stream:
    """Streamed float64 mean/covariance of one feature kind; the rows themselves only while there
    are no more of them than dimensions (for :attr:`GaussianStats.factor`)."""

    def __init__(self, what: str):
        self.what = what
        self.moments = RunningMoments(covariance=True)
        self.few_rows: Optional[List[torch.Tensor]] = []

    def add(self, features: torch.Tensor) -> None:
        self.moments.update(features)
        if self.few_rows is not None:
            self.few_rows.append(features)
            if self.moments.count > features.shape[1]:
                self.few_rows = None

    def stats(self) -> GaussianStats:
        rows = torch.cat(self.few_rows) if self.few_rows else None
        return GaussianStats.from_moments(self.moments, self.what, rows)

    def all_reduced(self) -> "_Stream":
        merged = _Stream(self.what)
        merged.moments, merged.few_rows = all_reduce_moments(self.moments), None
        return merged


class FeatureSet:
    """The features of one image set, as the metrics need them.

    Streamed into float64 mean/covariance on the features' device: ``pool_3`` (FID),
    ``mixed_6/conv`` (sFID) and, with ``dinov2=True``, DINOv2 [CLS] (FD_DINOv2). Kept as rows on
    the CPU (float32) only where a metric needs every vector: ``pool_3`` with ``keep_pool``
    (precision/recall), the logits with ``keep_logits`` (Inception Score), in the order added.
    """

    def __init__(self, keep_pool: bool = False, keep_logits: bool = False, dinov2: bool = False):
        self.keep_pool, self.keep_logits = keep_pool, keep_logits
        self._pool = _Stream("pool_3 features")
        self._spatial = _Stream("mixed_6/conv features")
        self._dinov2 = _Stream("DINOv2 features") if dinov2 else None
        self._pool_rows: List[torch.Tensor] = []
        self._logits_rows: List[torch.Tensor] = []

    @property
    def count(self) -> int:
        return self._pool.moments.count

    @property
    def has_dinov2(self) -> bool:
        return self._dinov2 is not None

    @torch.no_grad()
    def add(self, features: InceptionFeatures, dinov2: Optional[torch.Tensor] = None) -> None:
        """One batch: Inception features of B images and, with ``dinov2=True``, their (B, D) [CLS]."""
        self._pool.add(features.pool)
        self._spatial.add(features.spatial)
        if self._dinov2 is not None:
            if dinov2 is None or dinov2.shape[0] != features.pool.shape[0]:
                raise ValueError("this FeatureSet streams DINOv2 features: pass dinov2 (B, D) with every batch")
            self._dinov2.add(dinov2)
        if self.keep_pool:
            self._pool_rows.append(features.pool.float().cpu())
        if self.keep_logits:
            self._logits_rows.append(features.logits.float().cpu())

    def _rows(self, rows: List[torch.Tensor], kept: bool, what: str, dim: int) -> torch.Tensor:
        if not kept:
            raise ValueError(f"this FeatureSet does not keep the {what} rows (keep_{what}=True)")
        return torch.cat(rows) if rows else torch.empty(0, dim)

    @property
    def pool(self) -> torch.Tensor:
        """(N, 2048) float32 on the CPU."""
        return self._rows(self._pool_rows, self.keep_pool, "pool", 2048)

    @property
    def logits(self) -> torch.Tensor:
        """(N, 1008) float32 on the CPU."""
        return self._rows(self._logits_rows, self.keep_logits, "logits", 1008)

    def fid_stats(self) -> GaussianStats:
        return self._pool.stats()

    def sfid_stats(self) -> GaussianStats:
        return self._spatial.stats()

    def dinov2_stats(self) -> GaussianStats:
        if self._dinov2 is None:
            raise ValueError("this FeatureSet has no DINOv2 features (dinov2=True)")
        return self._dinov2.stats()

    def gather(self, dst: int = 0) -> "FeatureSet":
        """Every rank's features merged (collective: call on every rank). The statistics are
        all-reduced (every rank gets them); the kept rows are concatenated in rank order on
        ``dst`` only (other ranks return no rows). A no-op in one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        merged = FeatureSet(self.keep_pool, self.keep_logits, self.has_dinov2)
        merged._pool, merged._spatial = self._pool.all_reduced(), self._spatial.all_reduced()
        if self._dinov2 is not None:
            merged._dinov2 = self._dinov2.all_reduced()
        if self.keep_pool or self.keep_logits:
            local = (self._rows(self._pool_rows, True, "pool", 2048), self._rows(self._logits_rows, True, "logits", 1008))
            parts = [None] * dist.get_world_size() if dist.get_rank() == dst else None
            dist.gather_object(local, parts, dst=dst)
            if parts is not None:
                merged._pool_rows = [pool for pool, _ in parts if self.keep_pool]
                merged._logits_rows = [logits for _, logits in parts if self.keep_logits]
        return merged
