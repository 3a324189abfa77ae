#!/usr/bin/env bash
# One prepared check for a CUDA machine, in one call: the card, bench/gpu.py, then a short train.py run under
# torchrun with mixed precision (cpu-demo, DSFF 0.2), its prediction and evaluation, and a few paper-preset
# iterations. Everything it prints goes to $OUT/gpu_check.log too.
#
#   bash bench/gpu_check.sh RAW_DATASET_DIR [BENCH_BUDGET_S]
#
# BENCH_BUDGET_S 0 skips the benchmark. RAW_DATASET_DIR is an nnU-Net raw dataset with imagesTs/labelsTs, e.g. one made by
# examples/e2enet/prepare_mni.py. PYTHON (default python3) names the interpreter; it needs torch, MONAI and nibabel.
set -uo pipefail
DATA=${1:?usage: bash bench/gpu_check.sh RAW_DATASET_DIR [BENCH_BUDGET_S]}
BUDGET=${2:-360}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
# sparsefuse and the e2enet package from this checkout, installed or not; MONAI from .gpu_deps if put there
export PYTHONPATH="$PWD:$PWD/examples:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/gpu_check.log") 2>&1

step() { echo; echo "== $* ($(date +%T))"; }

step card
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

if [ "$BUDGET" != 0 ]; then
    step "bench/gpu.py, budget ${BUDGET} s"
    "$PYTHON" bench/gpu.py --budget-s "$BUDGET"
fi

step "torchrun + AMP: cpu-demo DSFF 0.2, 4 epochs x 25 iterations"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 examples/e2enet/train.py --data "$DATA" \
    --out "$WORK/run" --fold 0 --density 0.2 --epochs 4 --iters-per-epoch 25 --no-progress
"$PYTHON" examples/e2enet/predict.py --model "$WORK/run" --input "$DATA/imagesTs" --output "$WORK/pred"
"$PYTHON" examples/e2enet/evaluate.py --ref "$DATA/labelsTs" --pred "$WORK/pred" --dataset-json "$DATA/dataset.json"

step "paper preset, AMP, DSFF 0.2: 1 epoch x 20 iterations"
"$PYTHON" examples/e2enet/train.py --data "$DATA" --out "$WORK/paper" --fold 0 --preset paper --density 0.2 \
    --epochs 1 --iters-per-epoch 20 --val-iters 4 --no-progress
cp "$WORK/run/fold_0/log.csv" "$OUT/cpu_demo_log.csv" 2>/dev/null
cp "$WORK/paper/fold_0/log.csv" "$OUT/paper_log.csv" 2>/dev/null
step done
