#!/usr/bin/env bash
# The GPU checks, as one run on a machine with a CUDA device (CI has none):
#   1. the GPU tests: tests/training/test_gpu.py (bf16 autocast + channels-last, fp16 with a
#      GradScaler, the report and the probe's features on the GPU, GPU vs CPU evaluation,
#      the auto recipe on the GPU, an NCCL process group) and tests/training/test_device.py;
#   2. benchmarks/gpu_path.py: one training step per precision/memory-format variant, for
#      resnet50 at 224 px and for the service's efficientnet_lite0 at 160 px;
#   3. benchmarks/quality.py --device cuda: the auto recipe against the hand-written
#      baselines at a 30 s budget on the GPU (one seed; two proxies).
# Each step has its own time limit, so a hang in one still leaves the others' figures.
# Everything lands in $OUT (default /tmp/gpu-check). Where the machine lacks some of the
# project's Python packages, put their wheels in .whl/ (see BENCHMARKS.md, "GPU").
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh [tests] [path] [quality]   # default: all
# QUALITY_PROXIES (default "digits-degraded lfw") and QUALITY_METHODS ("auto full_ft logreg")
# narrow step 3; GPU_PATH_MODELS ("resnet50 efficientnet_lite0") step 2.
set -u
STEPS=${*:-tests path quality}
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', torch.cuda.nccl.version(), 'bf16', torch.cuda.is_bf16_supported())"
    nproc
} 2>&1 | tee "$OUT/machine.txt"

if [[ " $STEPS " == *" tests "* ]]; then
timeout 300 $PY -m pytest -q -p no:cacheprovider -rs \
    tests/training/test_gpu.py tests/training/test_device.py 2>&1 | tee "$OUT/tests.log"
fi

declare -A SHAPE=(
    [resnet50]="--image-size 224 --batch-size 64"
    [efficientnet_lite0]="--image-size 160 --batch-size 128"
)
if [[ " $STEPS " == *" path "* ]]; then
    for name in ${GPU_PATH_MODELS:-resnet50 efficientnet_lite0}; do
        # shellcheck disable=SC2086  # the arguments split on purpose
        timeout 90 $PY benchmarks/gpu_path.py --backbone "$name" ${SHAPE[$name]:-} --steps 20 \
            --json "$OUT/gpu_path_$name.json" 2>&1 | tee -a "$OUT/gpu_path.md"
    done
fi

if [[ " $STEPS " == *" quality "* ]]; then
    # shellcheck disable=SC2086
    timeout 200 $PY benchmarks/quality.py --device cuda --seeds 0 --budgets 30 \
        --proxies ${QUALITY_PROXIES:-digits-degraded lfw} \
        --methods ${QUALITY_METHODS:-auto full_ft logreg} --json "$OUT/quality.json" 2>&1 |
        tee "$OUT/quality.log"
fi
echo "gpu_check done"
