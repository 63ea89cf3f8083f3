#!/usr/bin/env bash
# Issue 15's leftover on one GPU: pinned host memory of whole-model offload runs (FSDP2 CPUOffloadPolicy,
# save_on_cpu checkpoints) against the planner's host terms (ringplan.memory.host_memory).
# Usage (device machine, repository root): OUT=dir bash benchmarks/pinned_host_check.sh
# ~3 minutes on one H100 (--budget-s 230 bounds the cases; the script adds nvidia-smi / env first).
# Writes under $OUT: env.txt, pinned_host_check.json, pinned_host_check.md, log.txt.
# Env: CASES (comma-separated case names, default all), BUDGET_S (230).
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export RINGPLAN_GIT_SHA=${RINGPLAN_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
exec > >(tee -a "$OUT/log.txt") 2>&1
{ date -u; echo "git $RINGPLAN_GIT_SHA"; nvidia-smi; nproc; free -b; grep -E 'MemTotal|MemAvailable' /proc/meminfo
  ulimit -l; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1
ARGS=(--out "$OUT" --budget-s "${BUDGET_S:-230}")
[ -z "${CASES:-}" ] || ARGS+=(--cases "$CASES")
python3 benchmarks/pinned_host_check.py "${ARGS[@]}" --command "OUT=$OUT bash benchmarks/pinned_host_check.sh (python3 benchmarks/pinned_host_check.py ${ARGS[*]})"
rc=$?; echo "rc=$rc"; exit $rc
