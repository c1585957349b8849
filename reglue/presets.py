"""Named runs: each method's published ImageNet 256² recipe on SiT-B/2 and SiT-XL/2, and ``tiny``.

``sit-{b,xl}-2``, ``repa-sit-{b,xl}-2``, ``redi-sit-{b,xl}-2``, ``reg-sit-{b,xl}-2``,
``reglue-sit-{b,xl}-2``: each is a function below whose docstring names its sources (the
published repositories, read at the commits given) and where it differs from them, and why.
``tiny`` is the CPU demo: REGLUE on a tiny SiT, synthetic images.

What every published recipe shares, and so every method preset: AdamW, lr 1e-4, betas (0.9,
0.999), eps 1e-8, no weight decay, constant lr; global batch 256; EMA 0.9999; label dropout 0.1;
the linear path, uniform t, velocity prediction; SD-VAE ft-EMA latents scaled by 0.18215; a
250-step Euler-Maruyama SDE for evaluation. SiT-B/2 runs are compared at 400K iterations without
guidance (:data:`B_STEPS`); the XL presets run to the length of each paper's headline result.

Deliberate differences from every published execution (``--reference`` undoes the first):

- Precision and parallelism: FSDP2 with bf16 parameters and fp32 master weights, optimizer and
  gradient reduction, and the frozen encoders in bf16 under autocast. REPA, REG and REGLUE train
  with fp16 autocast and a loss scaler under DDP (accelerate ``--mixed-precision fp16``), their
  DINOv2 (and REGLUE's compressor) under the same fp16 autocast; SiT and ReDi train in fp32 with
  TF32 matmuls under DDP. bf16 has fp32's exponent range, so no loss scaling and no skipped
  overflow steps, and FSDP2 shards the model over any number of GPUs. Each preset records its
  recipe's precision in ``parallel.reference_precision`` (fp16 or fp32), which ``--reference``
  trains in (``reglue.train.reference``: DDP, eager, the published loss-scaler and EMA behaviour,
  fp32 sampling).
- Randomness: t, noise, label dropout and latent sampling are drawn for the whole global batch
  from a generator seeded by (seed, step), and the data order is a function of (seed, step), so a
  run is reproducible at any world size and across restarts; the published loops seed each rank
  (seed + rank) and shuffle with a DataLoader.
- Data: ``reglue prepare`` stores ADM centre crops and their SD-VAE moments once, and each step
  samples a latent from the stored moments: the published REPA/REG/REGLUE/ReDi pipeline (the
  edm2-style ``images/`` + ``vae-sd/`` layout, also loadable directly). SiT alone encodes
  randomly flipped crops on the fly (see :func:`sit`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict

from reglue.config import (
    Config,
    ConfigError,
    DataConfig,
    EncoderConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SampleConfig,
    TrainConfig,
    unknown_name,
)
from reglue.models.encoders import DINOV2_HUB_WEIGHTS, DINOV2_NOREG_HUB_WEIGHTS

IMAGENET_TRAIN_IMAGES = 1_281_167
PUBLISHED_BATCH = 256
STEPS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // PUBLISHED_BATCH
"""5004: the published loaders drop the last incomplete batch of an epoch."""

B_STEPS = 400_000
"""SiT-B/2 comparison length: the papers' B/2 tables (REPA Table 2, and REG, ReDi, REGLUE after it) are at
400K iterations, without guidance; the repositories publish no B/2 evaluation script."""

# The two DINOv2-B/14 of the published methods, as (timm architecture, weights).
DINOV2_B14 = ("vit_base_patch14_dinov2", DINOV2_NOREG_HUB_WEIGHTS)  # torch.hub dinov2_vitb14
DINOV2_B14_REG4 = ("vit_base_patch14_reg4_dinov2", DINOV2_HUB_WEIGHTS)  # torch.hub dinov2_vitb14_reg


def _activation_checkpointing(size: str) -> str:
    """Activation checkpointing of the paper presets: ``off`` for both sizes, because at the
    published batch (256 over 8 GPUs = 32 per GPU) SiT-XL/2 REGLUE needs about 17 GB of an 80 GB
    device, and recomputing blocks would only cost time (full AC: +1 forward, about +33% FLOPs).

    Estimate per GPU, N = 32 images, T = 257 tokens (256 patches + [CLS]), D = hidden size:

    - Parameters (trainable, from the meta-device model): SiT-XL/2 REGLUE 684.9 M (28 blocks of
      23.9 M: qkv 3D², proj D², MLP 8D², adaLN 6D²; 15.5 M outside the blocks); SiT-B/2 138.9 M.
    - Per parameter, FSDP2-sharded over 8 GPUs: fp32 weight 4 B + fp32 gradient 4 B + AdamW m, v
      8 B + fp32 EMA 4 B = 20 B -> XL 684.9 M x 20 B / 8 = 1.71 GB (B/2: 0.35 GB). In flight: the
      bf16 weights of the current and prefetched block, 2 x 23.9 M x 2 B = 0.1 GB, and one
      block's fp32 gradient before its reduce-scatter, 0.1 GB.
    - Activations kept for backward, per block: about 20 (N, T, D) bf16 tensors (the saved
      tensors of one block counted with ``torch.autograd.graph.saved_tensors_hooks``: 20.05 x NTD
      for the eager block, B/2 and XL/2 alike, 18.04 with the fused kernels): the block input and
      LN-modulated input, q, k, v and the attention output (3 + 1), the attention projection
      input, the gated-residual operands (2), the MLP input, fc1 output and GELU output (1 + 4 + 4),
      the MLP output. XL/2: NTD x 2 B = 32 x 257 x 1152 x 2 B = 18.9 MB, x 20 = 379 MB per block,
      x 28 blocks = 10.6 GB. B/2 (D = 768, 12 blocks): 12.6 MB x 20 x 12 = 3.0 GB.
    - Frozen encoders (replicated, no gradients): DINOv2-B 85.7 M fp32 = 0.34 GB, SD-VAE 83.7 M
      bf16 = 0.17 GB, compressor 0.03 GB; their no-grad forward and the backward's transient
      gradients (the largest, fc1's, 4 NTD = 76 MB) add well under 1 GB.

    XL/2 total ~ 1.7 + 0.2 + 10.6 + 0.6 + 1 = 14 GB, ~17 GB with 20% allocator slack: 63 GB free
    on an 80 GB H100 (B/2 ~ 5 GB). Activations grow by 0.33 GB per image, so ``off`` holds to
    about 128 images per GPU; beyond that (or on fewer GPUs without ``--micro-batch-size``) use
    ``--activation-checkpointing selective`` (keeps matmul and attention outputs, about half the
    activations, recomputes only elementwise ops) before ``full`` (keeps 1 NTD per block).
    """
    return {"B": "off", "XL": "off"}[size]


def _dinov2(model, feature_layers, **kwargs) -> EncoderConfig:
    arch, weights = model
    return EncoderConfig(dinov2=arch, dinov2_weights=weights, feature_layers=feature_layers, **kwargs)


def _recipe(size: str, method: MethodConfig, *, encoders: EncoderConfig, grad_clip: float, xl_steps: int,
            sample: SampleConfig, reference_precision: str) -> Config:
    """A method preset at SiT-``size``/2; ``sample`` is the XL evaluation sampler (B runs evaluate
    it unguided, as the papers report B/2; ``--set sample.cfg_scale=S`` guides it);
    ``reference_precision`` is what ``--reference`` trains in (the recipe's own precision)."""
    xl = size == "XL"
    slug = "sit" if method.name == "sit" else f"{method.name}-sit"
    if not xl:
        sample = dataclasses.replace(sample, cfg_scale=1.0, cls_cfg_scale=None)
    return Config(
        # encoder_depth: REPA/REG/REGLUE README "4 for SiT-B/2, 8 for SiT-XL/2" (unused without alignment).
        model=ModelConfig(arch=f"SiT-{size}/2", encoder_depth=8 if xl else 4),
        method=method,
        encoders=encoders,
        data=DataConfig(image_size=256),
        optim=OptimConfig(grad_clip=grad_clip),
        parallel=ParallelConfig(activation_checkpointing=_activation_checkpointing(size),
                                reference_precision=reference_precision),
        train=TrainConfig(name=f"{slug}-{size.lower()}-2", max_steps=xl_steps if xl else B_STEPS),
        sample=sample,
    )


def sit(size: str) -> Config:
    """SiT (willisma/SiT @ 947f95b): latents only.

    Recipe: no gradient clipping (``train.py`` L251-253: backward, step); 1400 epochs (``train.py``
    L324) = 7,005,600 steps, the length of the FID-2.06 model (``README.md`` L55). Evaluation: SDE,
    250 steps, diffusion sigma_t, last step "Mean" 0.04 (``train_utils.py`` L25-31, our "sde"
    sampler exactly), cfg 1.5 (SiT paper, arXiv 2401.08740, the FID-2.06 row; the scripts default to
    1.0), at every t, on the **first 3 latent channels only** (``models.py`` L261
    ``model_out[:, :3]``): ``guide_channels=3``.

    Precision: fp32 with TF32 matmuls (``train.py`` L9-10; no autocast, no scaler), DDP with
    default arguments (L168): ``reference_precision="fp32"``.

    Differences: precision and parallelism (module docstring). SiT encodes randomly flipped ADM
    crops with the VAE every step (``train.py`` L186, L247); we train from prepared unflipped crops (one VAE pass at
    preparation, the pipeline every other method here uses, so comparisons share the data;
    ``reglue prepare --flip`` stores flipped copies as extra images, not the same thing). Its model
    predicts 8 channels (``learn_sigma=True``, ``models.py`` L157) of which the loss uses 4: the
    other 4 get no gradient, so training is the same with our 4-channel output.
    """
    return _recipe(
        size, MethodConfig(name="sit"), encoders=EncoderConfig(), grad_clip=0.0,
        xl_steps=1400 * STEPS_PER_EPOCH,
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=1.5, guide_channels=3), reference_precision="fp32",
    )


def repa(size: str) -> Config:
    """REPA (sihyun-yu/REPA @ 67f7145): latents + alignment of block ``encoder_depth`` to DINOv2.

    Recipe: DINOv2-B/14 **without registers** (``--enc-type dinov2-vit-b``, ``utils.py`` L93
    ``dinov2_vit{b}14``), its final-layer normed patch tokens as the target (``train.py`` L303
    ``x_norm_patchtokens``, no [CLS]); λalign 0.5 (``README.md`` L51); clipping 1.0 (``train.py``
    L423); 4M iterations for the headline model (``README.md`` L138). Evaluation (``README.md``
    L129-135): SDE 250 steps, cfg 1.8 on all channels for t in [0, 0.7].

    Precision: accelerate fp16 mixed precision with TF32 (``README.md`` L43-44 ``--allow-tf32
    --mixed-precision="fp16"``; ``train.py`` L127-131), DINOv2 under the same autocast (L298):
    ``reference_precision="fp16"``.

    Differences: precision and parallelism (module docstring; fp16 autocast + DDP published).
    """
    return _recipe(
        size, MethodConfig(name="repa", lambda_align=0.5),
        encoders=_dinov2(DINOV2_B14, (11,)), grad_clip=1.0, xl_steps=4_000_000,
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.7)), reference_precision="fp16",
    )


def redi(size: str) -> Config:
    """ReDi (zelaki/ReDi @ 58c65a8): latents ⊕ the first 8 PCA components of DINOv2 patch tokens.

    Recipe: DINOv2-B/14 **with registers** (``train_redi.py`` L67 ``dinov2_vitb14_reg``), its
    final-layer normed patch tokens (L300), standardised, PCA rank 8 (L396), bilinearly resized to
    the latent grid (L311); λs 1 (``transport/transport.py`` L161); no alignment, no [CLS]; no
    gradient clipping (``train_redi.py`` L337-339); 600 epochs (``README.md`` L76, the FID-1.64
    model) = 3,002,400 steps. Evaluation (``README.md`` L97): SDE 250 steps, cfg 2.4 with
    ``--cfg-vae True``: ``forward_with_cfg_vae`` (``models.py`` L309-327) guides the 4 VAE
    channels with the standard formula at every t; the semantic channels take the conditional
    prediction (the unconditional half of the state is discarded at every step): ``guide_channels=4``.

    Options, off as published: ``method.semantic_dropout_prob`` (``--dino-drop-prob``, README L135:
    0.2 to use) and ``sample.representation_guidance_scale`` (``--rg-scale``, README L101).

    Precision: fp32 with TF32 matmuls (``train_redi.py`` L9-10; no autocast, no scaler), DINOv2
    and the PCA in fp32 (L296-311), DDP with default arguments (L212): ``reference_precision="fp32"``.

    Differences: precision and parallelism (module docstring); ReDi checkpoints the activations of
    every block (``models.py`` L272); feature dropout is drawn per sample, not per GPU batch
    (``reglue.diffusion.transport.training_losses``).
    """
    return _recipe(
        size, MethodConfig(name="redi", semantic_channels=8, lambda_semantic=1.0),
        encoders=_dinov2(DINOV2_B14_REG4, (11,)), grad_clip=0.0, xl_steps=600 * STEPS_PER_EPOCH,
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=2.4, guide_channels=4), reference_precision="fp32",
    )


def reg(size: str) -> Config:
    """REG (Martinser/REG @ 021ea2e): latents + a noisy DINOv2 [CLS] token + alignment.

    Recipe: DINOv2-B/14 **without registers** (``--enc-type dinov2-vit-b``: ``utils.py`` L101
    ``dinov2_vit{b}14``; the ``_reg`` model only for an encoder type containing "reg"); [CLS]
    (``x_norm_clstoken``) as the entangled token and [CLS] + patch tokens as the alignment target
    (``train.py`` L304-308); λcls 0.03, λalign 0.5 (``train.sh`` L15, L21); clipping 1.0
    (``train.py`` L420); 4M iterations for the headline model (``eval.sh`` L4, README "4M (800
    epochs)"). Evaluation (``eval.sh`` L7-11, L23): SDE 250 steps, cfg 2.3 on all channels and
    [CLS] cfg 2.3, for t in [0, 0.85].

    Precision: accelerate fp16 mixed precision with TF32 (``train.sh`` L7-8; ``train.py`` L129-134,
    DDP with ``find_unused_parameters=True``), DINOv2 under the same autocast (L301):
    ``reference_precision="fp16"``.

    Differences: precision and parallelism (module docstring; fp16 autocast + DDP published).
    """
    return _recipe(
        size, MethodConfig(name="reg", lambda_cls=0.03, lambda_align=0.5),
        encoders=_dinov2(DINOV2_B14, (11,)), grad_clip=1.0, xl_steps=4_000_000,
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_interval=(0.0, 0.85)),
        reference_precision="fp16",
    )


def reglue(size: str) -> Config:
    """REGLUE (giorgospets/reglue @ 90a20d4): latents ⊕ compressed DINOv2 blocks 8-11 + [CLS] + alignment.

    Recipe: DINOv2-B/14 **with registers** (``utils.py`` L64 ``dinov2_vit{b}14_reg``); blocks 8-11
    after the final norm, standardised and compressed 3072 -> 256 -> 16 (``train.sh`` L21-23);
    λs 1, for XL halved from 250k and quartered from 500k steps (``train.py`` L349-355); λcls 0.03,
    λalign 0.5 (``train.sh`` L12, L18); clipping 1.0 (``train.py`` L458); 1M iterations for XL
    (``eval.sh`` L2, README "SiT-XL/2, 1M steps"), so both λs milestones are reached. Evaluation
    (``eval.sh`` L4-10, L23): SDE 250 steps, cfg 2.3 on all 20 channels (``VAE_CFG='false'``) and
    [CLS] cfg 2.3, for t in [0, 0.9]. The ``VAE_CFG='true'`` variant is
    ``--set sample.guidance_rule=reglue-vae-cfg --set sample.guide_channels=4``.

    Precision: accelerate fp16 mixed precision with TF32 (``train.sh`` L4-5; ``train.py`` L127-132,
    DDP with ``find_unused_parameters=True``), DINOv2 and the compressor (loaded as trained, its
    BatchNorms unfolded: ``load_compression_model`` L98-114) under the same autocast (L306-340):
    ``reference_precision="fp16"``.

    Differences: precision and parallelism (module docstring; fp16 autocast + DDP published).
    """
    milestones = ((250_000, 0.5), (500_000, 0.25)) if size == "XL" else ()
    return _recipe(
        size, MethodConfig(name="reglue", semantic_channels=16, lambda_semantic=1.0, semantic_milestones=milestones,
                           lambda_cls=0.03, lambda_align=0.5),
        encoders=_dinov2(DINOV2_B14_REG4, (8, 9, 10, 11), compressor_channels=(3072, 256, 16)),
        grad_clip=1.0, xl_steps=1_000_000,
        sample=SampleConfig(sampler="sde", steps=250, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_interval=(0.0, 0.9)),
        reference_precision="fp16",
    )


def tiny() -> Config:
    """The CPU demo (about a minute on 2 cores): REGLUE on a 4-block, 64-wide SiT with tiny random
    DINOv2 and compressor, a patch autoencoder fitted to the synthetic set at start
    (``reglue.models.autoencoder``), 64 px images: 8x8 latents, SiT patch 1, so 64 tokens (DINOv2
    patch 7 on its 56 px input gives the 8x8 grid the alignment loss needs).

    Shape match below: the share of 256 EMA samples (sample seed 0; cfg 2 unless said) the synthetic
    set's shape classifier puts in their class, measured on the 2-core VM. Patch 1 over patch 2 (16
    tokens of 2x2 latent cells at batch 64, 1000 steps, the demo until 2026-12): closed circles and
    rings where patch 2 drew blocky blobs, 54% against 48% (900 steps, 53 s of wall time, against
    1000 steps, 44 s). Batch 32 because a 64-token step is compute-bound (49 ms at batch 32; per
    image 2.7x a patch-2 step): batch 64 for 1000 steps reaches 60% but takes 107 s. Log-normal t
    (REPA's sigmoid of N(0,1)) over uniform: 60/57/55% against 54/53/46% (training seeds 0/1/2), and
    the bars lose the checkerboard seam uniform t leaves; mean +0.5 57%, -0.5 52%. No better (seed
    0, uniform t): lambda_semantic 0.5 54%; EMA 0.995 47%; 6 blocks of width 48 51% in 67 s; at 1000
    steps, lr 3e-3 48%, 8e-3 55% (5e-3: 55%) and 128 px images with patch 2 (64 tokens of 2x2 cells)
    36% in 99 s. Steps (cfg 4, seeds 0/1/2): 800 60/56/59%, 900 66/62/64%, 1000 69/63/72%. The
    encoders' targets are precomputed (``encoders.precompute_targets``, bit-identical): a step takes
    about 43 ms instead of 49-56, and 1000 steps run in 50-54 s of wall time (900 steps took 53-58 s
    without). Earlier, at patch 2, also no better: width 96 or 128, lr 1e-2, batch 128, Adam beta2
    0.99, a cosine schedule, whitened latents, thicker strokes. The published REGLUE recipe samples
    t uniformly (the ``reglue-*`` presets do). CFG 4 over 2 when sampling (the same three log-normal
    models): 66/62/64% against 60/57/55%; rings closed, 19-50% of rings classified right against
    0-12%. CFG 5: 67/59/68%, 6: 69/52/63% (diamonds and circles lose); 100 sampling steps instead of
    50 and an interval [0, 0.8] no better.
    Squares, triangles and crosses are drawn upright, tilted by up to 15 degrees
    (``reglue.data.synthetic.UPRIGHT``): at uniformly random angles this model drew crosses as
    scattered cells and triangles as blobs, at 1000 steps and still at 3000 (seed 0: crosses 69%
    and 91%, triangles 53% and 62% by the classifier, and not recognisable by eye). Upright, seeds
    0/1/2: 70/69/72% overall against 69/63/72%; seed 0 per class, upright against random angles:
    crosses 72 against 69% (seeds 1, 2: 97, 69%), triangles 62 against 53% (94, 94%), squares 81
    against 94%, circles 22 against 28% (the classifier takes rough circles for squares). Also no
    better, seed 0 at random angles: crosses with arms r/2 wide instead of r/3 (crosses 12%); batch
    16 for 1800 steps 67%; a decoder fitted on noised codes (it blurs: 60% against 71% at 0.3 sigma, upright); rescaling the
    guided prediction to the conditional one's spread (CFG rescale 0.7: 63%; CFG 4 widens the latent
    channels' spread 1.4-2x over the data's, which the rings need); guidance on t in [0.3, 1] 72%
    against 70% (upright). A linear lr decay to 0 over the second half: 72/69/73% against 69/63/72%
    (random angles), not adopted: a schedule tied to ``train.max_steps`` would change under a
    longer ``--max-steps``. For comparison, the same budget with ``method.name=sit`` 67%, ``repa``
    80% (random angles, seed 0).
    The MLP's GELU is the exact (erf) one, ``model.mlp_gelu=exact``, where SiT uses the tanh
    approximation: on this CPU tanh GELU takes ~3x as long (595 against 212 us forward, 656
    against 395 us backward at 2080 x 256) and the whole step 75-78 against 64-66 ms (measured in
    a slow hour of the VM). The demo, seeds 0/1/2: 72/72/69% shape match (64 samples) in 74/73/70 s
    of wall time and 130-136 s of CPU, against tanh 75/70/66% (seed 0 in the same hour: 79 s, 146 s of CPU).
    All figures above decode linearly (the least-squares 3x3 decoder). Since 2026-12-07 the
    autoencoder decodes by nearest exemplar (``reglue.models.autoencoder``): each 8x8 cell becomes
    the fit patch whose 3x3 code neighbourhood is nearest. The model and its training are unchanged,
    only the pixels of the same latents differ. Seeds 0/1/2 on 256 samples (50 sampling steps):
    83/80/85% shape match against 67/66/73% decoded linearly. By eye, squares, triangles, diamonds and dots have their
    shape and edges; crosses have thin, broken arms. Random latents decode to chance (12.5%).
    Sampling takes 25 SDE steps (50 until 2026-12-07): on the same three runs' 256 samples 82/82/84%
    shape match against 83/80/85% with 50 (35 steps: 85/82/82%), for half the 2.7 s the final grid
    took. 800 training steps instead of 1000 save 10 s but lose 4-5 points (79/76/80%; rings
    53/9/47%).
    ``--reference`` runs it as REGLUE's recipe (``reference_precision`` fp16 on CUDA).
    """
    return Config(
        model=ModelConfig(
            arch="custom", depth=4, hidden_size=64, num_heads=4, patch_size=1,
            num_classes=8, encoder_depth=2, projector_dim=128, mlp_gelu="exact",
        ),
        method=MethodConfig(name="reglue", semantic_channels=8, t_sampling="lognormal"),
        encoders=EncoderConfig(
            dinov2_weights=None,
            dinov2_overrides={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 7},
            feature_layers=(0, 1, 2, 3),
            compressor_channels=(128, 32, 8),
            vae="patch-pca",
            precompute_targets=True,
        ),
        data=DataConfig(image_size=64, synthetic_size=2048, synthetic_classes=8, num_workers=0),
        optim=OptimConfig(lr=5e-3),
        train=TrainConfig(
            name="tiny", max_steps=1000, global_batch_size=32, ema_decay=0.99, log_every=10,
            ckpt_every=500, keep_last=2, num_sample_images=64,
        ),
        sample=SampleConfig(sampler="sde", steps=25, cfg_scale=4.0, guidance_interval=(0.0, 1.0)),
    )


METHOD_PRESETS: Dict[str, Callable[[str], Config]] = {"sit": sit, "repa": repa, "redi": redi, "reg": reg, "reglue": reglue}

PRESETS: Dict[str, Callable[[], Config]] = {"tiny": tiny}
for _method, _build in METHOD_PRESETS.items():
    for _size in ("B", "XL"):
        PRESETS[_build(_size).train.name] = functools.partial(_build, _size)


def get_preset(name: str) -> Config:
    """The config of preset ``name``; a ConfigError suggesting the nearest names otherwise."""
    if name not in PRESETS:
        raise ConfigError(unknown_name("preset", name, PRESETS))
    return PRESETS[name]()
