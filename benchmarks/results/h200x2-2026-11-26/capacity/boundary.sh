set -u
RP() { timeout 150 python -c "import sys; from ringplan.cli import main; sys.argv[0]='ringplan'; main()" "$@"; }
COMMON="--warmup 1 --steps 1 --world-size 2 --gpu h200 --train --sharding zero3 --no-offload --write $OUT/boundary.json"
for spec in "llama-3-8b --layers 8 --checkpointing none --loss chunked 197246" \
            "qwen3-0.6b --checkpointing none --loss chunked 201598" \
            "llama-3-8b --layers 4 --checkpointing full --loss full 160696" \
            "llama-3-8b --layers 8 --checkpointing none --loss chunked 205136" \
            "qwen3-0.6b --checkpointing none --loss chunked 209662"; do
  set -- $spec; tokens=${@: -1}; args=${spec% *}
  echo "=== $args --tokens $tokens"; start=$(date +%s)
  RP validate --model $args --tokens $tokens $COMMON 2>&1 | grep -v Warning | tail -9
  echo "rc=${PIPESTATUS[0]} $(( $(date +%s) - start )) s"
done
