#!/usr/bin/env bash
# Issue 15's GPU check on one GPU: a whole-model stack with the tiled MLP and parameter /
# optimizer-state offload (FSDP2 CPUOffloadPolicy) at the edge of the GPU's memory.
#   1. record nvidia-smi and the local GPU's catalog name (NVML driver name -> profiles/gpus.json);
#   2. predict capacity first (`ringplan capacity --gpus 1 --train --mlp-tile T --offload-params
#      --safety-margin 0`, JSON);
#   3. run `ringplan validate` at the predicted max tokens and at >= 1.04x (rounded up to a multiple
#      of the MLP tile; ring 1), each under `timeout 150`, neither failure stopping the other;
#   4. sample host memory (MemTotal - MemAvailable, largest process RSS) twice a second during each
#      validate: the runtime's tracker counts only offloaded checkpoints' pinned bytes, not the
#      offloaded parameters / optimizer states.
# Usage (device machine, repository root): OUT=dir bash benchmarks/tiling_offload_edge.sh
# Env: MODEL (default qwen3-0.6b), TILE (4096), CKPT (none), EXTRA (extra model args, e.g. "--layers 8").
# At most 8 files under $OUT: env.txt capacity.json max.json up.json host_max.tsv host_up.tsv edge.json log.txt
set -u
OUT=${OUT:?set OUT}
MODEL=${MODEL:-qwen3-0.6b}
TILE=${TILE:-4096}
CKPT=${CKPT:-none}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RP() { python3 -c "import sys; from ringplan.cli import main; sys.argv[0]='ringplan'; main()" "$@"; }
exec > >(tee -a "$OUT/log.txt") 2>&1

{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi; nproc; free -b; grep -E 'MemTotal|MemAvailable' /proc/meminfo
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1

DEVICE_ARGS=${DEVICE_ARGS:-}   # dry run on CPU: GPU=h100 DEVICE_ARGS="--device cpu" TOKENS="1024 2048"
[ -n "${GPU:-}" ] || GPU=$(python3 - <<'EOF'
from ringplan_runtime import nvml
from ringplan.hardware import load_catalog
name = nvml.gpu_name(nvml.first_visible_device())
spec = load_catalog().gpu_by_driver_name(name) if name else None
print(spec.name if spec else "")
EOF
)
echo "driver name: $(nvidia-smi 2>/dev/null --query-gpu=name --format=csv,noheader) -> catalog: ${GPU:-none}" | tee -a "$OUT/env.txt"
[ -n "$GPU" ] || { echo "GPU not in the catalog: stop"; exit 2; }

MODEL_ARGS="--model $MODEL $EXTRA --train --mlp-tile $TILE --offload-params --checkpointing $CKPT"
echo "=== capacity: ringplan capacity $MODEL_ARGS --gpus 1 --gpu $GPU --safety-margin 0 --format json"
RP capacity $MODEL_ARGS --gpus 1 --gpu "$GPU" --safety-margin 0 --format json > "$OUT/capacity.json"
echo "capacity rc=$?"
read -r MAX UP SETTINGS < <(python3 - "$OUT/capacity.json" "$TILE" <<'EOF'
import json, math, sys
d = json.load(open(sys.argv[1])); tile = int(sys.argv[2])
mx = int(d["answer"]["max_tokens"]); r = next(r for r in d["rows"] if r["tokens_per_rank"] == mx and r["feasible"])
up = math.ceil(mx * 1.04 / tile) * tile
s = f"--sharding {r['sharding']} --loss {r['loss']}" + (f" --loss-chunk {r['loss_chunk_tokens']}" if r["loss"] == "chunked" else "")
print(mx, up, s.replace(" ", ","))
print(f"predicted max {mx:,} tokens; need {r['total_bytes']/2**30:.2f} GiB + bound {r['residual_bound_bytes']/2**30:.2f} "
      f"of {r['usable_memory_bytes']/2**30:.2f} GiB usable; host {r['host_memory_bytes_per_gpu']/2**30:.2f} GiB pinned; "
      f"+4%: {up:,} (+{100*(up/mx-1):.2f}%)", file=sys.stderr)
EOF
)
SETTINGS=${SETTINGS//,/ }
[ -z "${TOKENS:-}" ] || read -r MAX UP <<< "$TOKENS"
[ -n "${MAX:-}" ] || { echo "no capacity answer: stop"; exit 3; }

sample() {  # host memory twice a second until the flag file goes
  echo -e "t_s\tused_bytes\tmax_rss_bytes"
  local t0=$EPOCHREALTIME rss
  while [ -e "$1" ]; do
    rss=$(cat /proc/[0-9]*/status 2>/dev/null | awk '/^VmRSS/{if ($2 > m) m = $2} END{print m + 0}')
    awk -v now="$EPOCHREALTIME" -v t0="$t0" -v rss="$rss" \
      '/^MemTotal/{tot=$2} /^MemAvailable/{av=$2} END{printf "%.1f\t%d\t%d\n", now - t0, (tot-av)*1024, rss*1024}' /proc/meminfo
    sleep 0.5
  done
}

for point in "max $MAX" "up $UP"; do
  set -- $point; tag=$1; tokens=$2
  echo "=== $tag: ringplan validate $MODEL_ARGS $SETTINGS --world-size 1 --tokens $tokens --warmup 1 --steps 1 --gpu $GPU"
  flag=$(mktemp); sample "$flag" > "$OUT/host_$tag.tsv" & spid=$!
  start=$(date +%s)
  timeout 150 python3 -c "import sys; from ringplan.cli import main; sys.argv[0]='ringplan'; main()" \
    validate $MODEL_ARGS $SETTINGS --world-size 1 --tokens "$tokens" --warmup 1 --steps 1 --gpu "$GPU" \
    $DEVICE_ARGS --timeout 140 --write /tmp/edge.json --format json > "$OUT/$tag.json"
  echo "$tag rc=$? $(( $(date +%s) - start )) s"
  rm -f "$flag"; wait $spid
done
cp /tmp/edge.json "$OUT/edge.json" 2>/dev/null

python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]; G = 2**30
for tag in ("max", "up"):
    try:
        d = json.load(open(f"{out}/{tag}.json"))
    except Exception as e:
        print(tag, "no JSON:", e); continue
    m = d.get("measured", {})
    print(f"--- {tag}: {d.get('plan')}")
    print(f"    feasible={m.get('feasible')} failure={m.get('failure')} step={m.get('step_time_s')}")
    for f in d.get("figures", []):
        p, v = f.get("predicted"), f.get("measured")
        sc = G if "bytes" in f["figure"] else 1
        fmt = lambda x: "-" if x is None else f"{x/sc:.3f}"
        print(f"    {f['figure']:<24} predicted {fmt(p):>10} measured {fmt(v):>10} error {f.get('error')}")
    try:
        rows = [l.split("\t") for l in open(f"{out}/host_{tag}.tsv").read().splitlines()[1:] if l]
        used = [int(r[1]) for r in rows]; rss = [int(r[2]) for r in rows]
        print(f"    host used: start {used[0]/G:.2f} GiB, peak {max(used)/G:.2f} GiB (+{(max(used)-used[0])/G:.2f}); "
              f"largest process RSS peak {max(rss)/G:.2f} GiB")
    except Exception as e:
        print("    host samples:", e)
EOF
