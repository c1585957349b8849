#!/usr/bin/env bash
# One command on a CUDA machine (see ../shared/GPU.md): versions, measured ceilings, the GPU tests,
# the benchmarks at GPU sizes, and a markdown summary printed last.
#
#   bash bench/gpu_validate.sh [OUT_DIR]      # default: bench/results/<YYYY-MM-DD>-<gpu>
#   ONLY="ceilings gpu-tests" bash bench/gpu_validate.sh OUT_DIR   # a subset of the steps
#
# Missing optional packages (flash-attn, xformers, DALI) only skip their rows; a failing step is
# reported in the summary instead of stopping the run. Exit status: 0 when every step passed.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_validate: no CUDA device visible to torch; nothing to validate." >&2
    exit 2
fi

GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
GPU_SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
OUT="${1:-bench/results/$(date +%F)-${GPU_SLUG}}"
mkdir -p "$OUT"
STATUS="$OUT/steps.txt"
[ -n "${ONLY:-}" ] || : > "$STATUS"   # subsets (ONLY=...) add to the record of earlier calls

step() {  # step NAME CMD... : run, tee the log, record the exit status
    local name="$1"; shift
    # ONLY="ceilings bench" runs a subset (a lent GPU allows 10 minutes per command): the other
    # steps keep their logs from earlier calls into the same OUT_DIR.
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        echo "=== $name: skipped (ONLY=$ONLY)"
        return 0
    fi
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc" | tee -a "$STATUS"
    return 0
}

# 1. Versions and ceilings.
{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
        | sed 's/^/gpu: /' || echo "gpu: (nvidia-smi unavailable) $GPU_NAME"
    "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
try:
    cap = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
except Exception as e:
    print(f"device: unknown ({type(e).__name__}: {e})")
for name in ("triton", "flash_attn", "flash_attn_interface", "xformers", "nvidia.dali", "timm", "diffusers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name}: not available ({type(e).__name__})")
EOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

step ceilings "$PY" bench/_roofline.py --out "$OUT/ceilings.json"

# 2. The runtime self-check every run does on first CUDA use (each fused op against its reference,
# forward and backward, fp32 and bf16, SiT-XL/2 widths): which ops this GPU runs fused.
step selfcheck "$PY" -m reglue.kernels.selfcheck
# The static kernel report with this GPU's measured µs beside each roofline floor (SiT-XL/2
# REGLUE shapes, QK-norm rows included); compare with the committed docs/kernels-sm90.md.
step kernel-report "$PY" -m reglue.kernels.report --measure --preset reglue-sit-xl-2 --qk-norm \
    --json "$OUT/kernel-report.json" --markdown "$OUT/kernel-report.md"
# GPU tests: kernels compiled for real at SiT-XL/2 sizes, attention backends, model-level checks.
step gpu-tests "$PY" -m pytest -m gpu tests/ -q -rs
# The kernel and attention tests' small/odd shapes (D = 72, 100, 4096; partial tiles) on CUDA too:
# on a GPU they run the compiled kernels instead of the interpreter.
step kernel-tests-cuda "$PY" -m pytest -m "not gpu" tests/kernels tests/models/test_attention.py \
    tests/models/test_sit_kernels.py -q -rs

# A few training steps with the defaults (on CUDA: the self-checked fused kernels and regional
# compile; the log's "execution on cuda" line and the metrics' fused_ops/eager_ops say what ran):
# the tiny preset, and SiT-B/2 REGLUE at real shapes (random DINOv2-B and compressor: no downloads).
step train-smoke "$PY" train.py --preset tiny --max-steps 20 --out "$OUT/train-smoke"
step train-sit-b "$PY" train.py --preset reglue-sit-b-2 --max-steps 10 \
    --global-batch-size 32 --out "$OUT/train-smoke" --set encoders.dinov2_weights=none \
    --set encoders.vae=tiny-random --set data.synthetic_size=256 --set train.log_every=5 \
    --set sample.steps=10 --set train.num_sample_images=4 --set train.ckpt_every=10

# 3. Benchmarks at GPU sizes: kernels, attention and data; then whole train steps, the defaults
# against --reference (long: compiles SiT-B/2 and SiT-XL/2 in several variants; BENCH_STEP_K
# narrows it, e.g. "xl-2 and b32 and (defaults or reference)").
step bench "$PY" -m pytest bench/bench_kernels.py bench/bench_attention.py bench/bench_data.py -q -rs \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds
step bench-step "$PY" -m pytest bench/bench_step.py -q -rs ${BENCH_STEP_K:+-k "$BENCH_STEP_K"} \
    --benchmark-json="$OUT/bench-step.json" --benchmark-columns=median,iqr,rounds
# Sampling: SiT-XL/2 REGLUE, 250-step SDE with CFG on [0, 0.9], ours vs the published generate.py execution.
step bench-sample "$PY" -m pytest bench/bench_sample.py -q -rs \
    --benchmark-json="$OUT/bench-sample.json" --benchmark-columns=median,iqr,rounds
# Evaluation: Inception img/s and the whole evaluate of 50,000 samples (target <= 60 s on one H100).
step bench-evaluate "$PY" -m pytest bench/bench_evaluate.py -q -rs \
    --benchmark-json="$OUT/bench-evaluate.json" --benchmark-columns=median,iqr,rounds

# 4. Summary (printed last).
JSONS=$(for f in "$OUT/bench.json" "$OUT/bench-step.json" "$OUT/bench-sample.json" "$OUT/bench-evaluate.json"; do [ -s "$f" ] && echo "$f"; done)
if [ -n "$JSONS" ]; then
    # shellcheck disable=SC2086
    "$PY" bench/summarize.py $JSONS --ceilings "$OUT/ceilings.json" --versions "$OUT/versions.txt" \
        --log "$OUT/bench.log" --log "$OUT/bench-step.log" --log "$OUT/bench-sample.log" --log "$OUT/gpu-tests.log" --log "$OUT/kernel-tests-cuda.log" \
        --out "$OUT/summary.md" > /dev/null
else
    echo "# reglue GPU validation — $GPU_NAME (no benchmark JSON: see bench.log)" > "$OUT/summary.md"
fi
{
    echo ""
    echo "## Steps"
    echo ""
    sed 's/^/- /' "$STATUS"
    echo ""
    if [ -f "$OUT/selfcheck.log" ]; then
        echo "Kernel self-check on this GPU:"
        echo ""
        grep -E "^[a-z_0-9]+ +(fused|EAGER)" "$OUT/selfcheck.log" | sed 's/^/    /'
        echo ""
    fi
    if [ -s "$OUT/kernel-report.md" ]; then
        echo "Kernel variants, measured µs beside the roofline floor (kernel-report.md):"
        echo ""
        grep -E "^\| (adaln|rms|conv|column)" "$OUT/kernel-report.md" | awk -F'|' '{printf "    %-45s floor %8s µs  measured %8s µs\n", $2, $15, $16}'
        echo ""
    fi
    echo "Test result lines:"
    echo ""
    for log in gpu-tests kernel-tests-cuda train-smoke train-sit-b bench bench-step bench-sample bench-evaluate; do
        [ -f "$OUT/$log.log" ] && echo "    $log: $(grep -E "(passed|failed|error|skipped|deselected)[^ ]* .*in [0-9.]+s" "$OUT/$log.log" | tail -1)"
    done
} >> "$OUT/summary.md"

cat "$OUT/summary.md"
echo "gpu_validate: wrote $OUT (commit summary.md, bench*.json, versions.txt, ceilings.json)"
! grep -q "exit [1-9]" "$STATUS"
