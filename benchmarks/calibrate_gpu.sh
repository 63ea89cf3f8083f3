#!/usr/bin/env bash
# Issue 17's proof on one GPU (an H100 or an H200): `ringplan calibrate` timed, and the held-out rows of
# this GPU predicted before (from the other GPU's profiles: transferred) and after it (calibrated).
#   1. record the machine (nvidia-smi, torch) in $OUT/env.txt;
#   2. run benchmarks/calibrate_transfer.py: temp copy of profiles/ without this GPU's files, fit, predict,
#      `ringplan calibrate --budget-s $BUDGET` into it (timed), refit, predict again;
#   3. print `ringplan calibrate --help` and the files written.
# Usage (device machine, repository root; no install needed, the checkout is on PYTHONPATH):
#   OUT=dir bash benchmarks/calibrate_gpu.sh          # about 2-3 minutes; under 5 in every case
# Env: BUDGET (calibrate's --budget-s, default 90), RINGPLAN_GIT_SHA (default: git rev-parse HEAD).
# Files under $OUT: env.txt log.txt calibrate_transfer.json calibrate_transfer.md
set -u
OUT=${OUT:?set OUT}
BUDGET=${BUDGET:-90}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RINGPLAN_GIT_SHA=${RINGPLAN_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

{ date -u; echo "git $RINGPLAN_GIT_SHA"; nvidia-smi; nproc
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} > "$OUT/env.txt" 2>&1

start=$(date +%s)
timeout 300 python3 benchmarks/calibrate_transfer.py --out "$OUT" --budget-s "$BUDGET"
echo "calibrate_transfer rc=$? in $(( $(date +%s) - start )) s"
